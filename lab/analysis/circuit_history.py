"""How the circuit forms over training: a summary of the patching, attribution, logit-lens and QK analyses at
every checkpoint, cached per checkpoint in the run folder.

    history = lab.circuit_history(run)      # step, measure, component, value: one row per number
    lab.plot_circuit_history(run, "patching")   # drawn under the run's accuracy curves

Each checkpoint's summary is computed on the task's default patching pair (`task.patching_pair()`:
"a cab" vs "a cac" for a_and_b, "12 + 5 =" vs "13 + 5 =" for modular), so every checkpoint answers the
same question and a checkpoint costs a few forwards of two short inputs:

- `patching`: the fraction of the clean logit difference each head's output (z) restores when patched
  into the corrupted run (`lab.activation_patching`, site "z"); left out (None) at checkpoints where the
  clean and corrupted runs' logit differences are less than MIN_SPAN apart, where that fraction is noise;
- `dla`: each head's and MLP's direct logit attribution on the clean input, towards its answer against
  the corrupted input's answer (`lab.logit_attribution(run, clean, against=...)`);
- `lens`: the clean answer's probability read after each stage (`lab.logit_lens(run, clean)`);
- `qk` (a_and_b): how much more each head's QK circuit scores `a` and `b` from `<cls>` than an average
  character (`lab.qk_circuit(run).preference()`).

Entries live in the run folder's per-checkpoint analysis cache (`RUN/analysis/heads/step_*.json`, shared
with the Heads page, keyed on the checkpoint file's size and modification time, written atomically) under
the versioned key CACHE_KEY; `precompute_circuits(run)` fills it for every checkpoint (`lab demo` does).
"""

from __future__ import annotations

from lab.analysis.ablation import _run_of, cached, is_cached, private_target
from lab.models.architectures import require_attention

CACHE_KEY = "circuits/v3"  # bump the version when what an entry holds changes (v3: patching left out under MIN_SPAN)
MEASURES = ("patching", "dla", "lens", "qk")
MIN_SPAN = 1.0  # logits: while clean and corrupted differ by less, "restored" is a ratio of two small noisy numbers


def summary_at(run_or_model, step: int | None = None, task=None) -> dict:
    """The summary of one checkpoint (or a bare model with `task=`): {"pair": [clean, corrupted],
    "patching": PatchingResult.to_dict(), "dla" and "lens": the clean input's frames (`frame_from_dict` reads
    them back), "rows": [{measure, component, value}, ...]}."""
    from lab.analysis.attribution import logit_attribution
    from lab.analysis.circuits import qk_circuit
    from lab.analysis.logit_lens import logit_lens
    from lab.analysis.patching import activation_patching

    target = private_target(run_or_model, step, task)
    model, task = target.model, target.task
    clean, corrupted = task.patching_pair()
    patching = activation_patching(model, clean, corrupted, task=task)
    defined = abs(patching.clean_value - patching.corrupted_value) >= MIN_SPAN
    rows = [{"measure": "patching", "component": row.component, "value": row.restored if defined else None}
            for row in patching.heads[patching.heads["site"] == "z"].itertuples()]
    dla = logit_attribution(model, clean, task=task, against=patching.wrong)
    rows += [{"measure": "dla", "component": row.component, "value": row.attribution}
             for row in dla.itertuples() if row.kind in ("head", "mlp")]
    lens = logit_lens(model, clean, task=task)
    rows += [{"measure": "lens", "component": row.stage, "value": row.answer_prob} for row in lens.itertuples()]
    dla.attrs["step"] = lens.attrs["step"] = target.step
    if task.name == "a_and_b":
        preference = qk_circuit(model, task=task).preference()
        rows += [{"measure": "qk", "component": f"{row.component} → {row.key}", "value": row.score}
                 for row in preference.itertuples() if row.key in ("a", "b")]
    return {"pair": [clean, corrupted], "patching": patching.to_dict(), "dla": frame_to_dict(dla),
            "lens": frame_to_dict(lens), "rows": rows}


def frame_to_dict(frame) -> dict:
    """A DataFrame with its attrs as JSON-able data (missing integers as None); `frame_from_dict` reads it back."""
    return {"records": frame.astype(object).where(frame.notna(), None).to_dict("records"), "attrs": dict(frame.attrs)}


def frame_from_dict(data: dict):
    import pandas as pd

    frame = pd.DataFrame(data["records"])
    for column in ("layer", "head", "neuron"):
        if column in frame:
            frame[column] = frame[column].astype("Int64")
    frame.attrs.update(data["attrs"])
    return frame


def cached_summary(run, step: int) -> dict:
    """`summary_at` of a Run's checkpoint, from the run folder's cache when it is there (computed and stored otherwise)."""
    return cached(run, step, CACHE_KEY, lambda: {CACHE_KEY: summary_at(run, step)})


def circuit_history(run, progress: bool = False):
    """One row per (checkpoint step, measure, component): see the module docstring for the measures.
    Cached per checkpoint in the run folder; only checkpoints not cached yet are computed."""
    import pandas as pd
    from tqdm.auto import tqdm

    owner = _run_of(run, None)
    if owner is None:
        raise TypeError(f"circuit_history needs a Run or a run folder, got {type(run).__name__}")
    require_attention(owner, "the circuit history")
    rows = []
    for step in tqdm(owner.checkpoint_steps, disable=not progress, unit="checkpoint", desc=f"circuits of {owner.name}"):
        rows += [{"step": step, **row} for row in cached_summary(owner, step)["rows"]]
    frame = pd.DataFrame(rows, columns=["step", "measure", "component", "value"])
    frame.attrs["pair"] = owner.task.patching_pair()
    return frame


def precompute_circuits(run, progress: bool = False) -> int:
    """Fill the run folder's circuit cache at every checkpoint (last first, so the page's default step is
    ready soonest). Returns how many checkpoints were computed."""
    from tqdm.auto import tqdm

    owner = _run_of(run, None)
    if owner is None:
        raise TypeError(f"precompute_circuits needs a Run or a run folder, got {type(run).__name__}")
    require_attention(owner, "precompute_circuits")
    todo = [step for step in reversed(owner.checkpoint_steps) if not is_cached(owner, step, CACHE_KEY)]
    for step in tqdm(todo, disable=not progress, unit="checkpoint", desc=f"circuits of {owner.name}"):
        cached_summary(owner, step)
    return len(todo)
