"""grokking-lab: train small transformers on toy tasks, watch them grok, open them up head by head.

    import lab
    run = lab.load_run("runs/modadd_quick")
    logits, cache = run.model().run_with_cache(run.task.encode_batch(["12 + 34 ="]))
    cache["pattern", 0]      # (batch, head, query, key)

Names are imported lazily so that `import lab` (and `lab --help`) stays fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "load_run": "lab.run",
    "list_runs": "lab.run",
    "Run": "lab.run",
    "RunError": "lab.runs",
    "ExperimentConfig": "lab.config",
    "ConfigError": "lab.config",
    "load_experiment": "lab.config",
    "make_task": "lab.tasks",
    "Transformer": "lab.model",
    "Trainer": "lab.training",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lab' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
