"""grokking-lab: train small transformers on toy tasks, watch them grok, open them up head by head.

    import lab
    run = lab.load_run("runs/modadd_quick")
    logits, cache = run.model().run_with_cache(run.task.encode_batch(["12 + 34 ="]))
    cache["pattern", 0]      # (batch, head, query, key)

Names are imported lazily so that `import lab` (and `lab --help`) stays fast.
"""

from __future__ import annotations

import importlib
import os

# Bit-for-bit reproducible CPU training across processes: MKL otherwise chooses code paths by
# memory alignment, so two runs of the same seed drift apart by an ulp within a few steps.
# It must be set before torch loads MKL; users who need the last few percent can override it.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "load_run": "lab.runs.run",
    "list_runs": "lab.runs.run",
    "Run": "lab.runs.run",
    "load_sweep": "lab.sweeps.sweep",
    "list_sweeps": "lab.sweeps.sweep",
    "Sweep": "lab.sweeps.sweep",
    "LabError": "lab.errors",
    "RunError": "lab.errors",
    "ConfigError": "lab.errors",
    "RunLockedError": "lab.errors",
    "StorageError": "lab.errors",
    "ExperimentConfig": "lab.config",
    "load_experiment": "lab.config",
    "make_task": "lab.tasks",
    "Transformer": "lab.models.transformer",
    "build_model": "lab.models.architectures",
    "MLPClassifier": "lab.models.mlp",
    "CNNClassifier": "lab.models.cnn",
    "LinearClassifier": "lab.models.linear",
    "LSTMModel": "lab.models.lstm",
    "Trainer": "lab.training.trainer",
    "predict": "lab.analysis.probe",
    "Prediction": "lab.models.prediction",
    "attention": "lab.analysis.attention",
    "AttentionResult": "lab.analysis.attention",
    "modular_attention_grid": "lab.analysis.attention",
    "ablate_heads": "lab.analysis.ablation",
    "ablate_neurons": "lab.analysis.ablation",
    "letter_attention": "lab.analysis.heads",
    "fourier_basis": "lab.analysis.fourier",
    "fourier_norms": "lab.analysis.fourier",
    "key_frequencies": "lab.analysis.fourier",
    "neuron_frequencies": "lab.analysis.fourier",
    "restricted_loss": "lab.analysis.fourier",
    "excluded_loss": "lab.analysis.fourier",
    "progress_measures": "lab.analysis.progress",
    "ProgressDefinition": "lab.analysis.fourier",
    "activation_patching": "lab.analysis.patching",
    "PatchingResult": "lab.analysis.patching",
    "logit_attribution": "lab.analysis.attribution",
    "logit_lens": "lab.analysis.logit_lens",
    "qk_circuit": "lab.analysis.circuits",
    "ov_circuit": "lab.analysis.circuits",
    "composition_scores": "lab.analysis.circuits",
    "QKCircuit": "lab.analysis.circuits",
    "OVCircuit": "lab.analysis.circuits",
    "circuit_history": "lab.analysis.circuit_history",
    "induction_history": "lab.analysis.induction",
    "InductionHistory": "lab.analysis.induction",
    "head_detector_scores": "lab.analysis.induction",
    "induction_loss": "lab.analysis.induction",
    "to_transformer_lens": "lab.models.export",
    "ExportError": "lab.models.export",
    "plot_patching": "lab.plots",
    "plot_logit_attribution": "lab.plots",
    "plot_logit_lens": "lab.plots",
    "plot_qk_circuit": "lab.plots",
    "plot_ov_circuit": "lab.plots",
    "plot_composition_scores": "lab.plots",
    "plot_circuit_history": "lab.plots",
    "plot_curves": "lab.plots",
    "plot_weight_norm": "lab.plots",
    "plot_attention": "lab.plots",
    "plot_read_attention": "lab.plots",
    "plot_modular_attention": "lab.plots",
    "plot_next_tokens": "lab.plots",
    "plot_progress": "lab.plots",
    "plot_induction": "lab.plots",
    "plot_fourier_norms": "lab.plots",
    "plot_key_frequencies": "lab.plots",
    "plot_ablation": "lab.plots",
    "plot_letter_attention": "lab.plots",
    "plot_phase_diagram": "lab.plots",
    "plot_grok_steps": "lab.plots",
    "plot_sweep_outcome": "lab.plots",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lab' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
