"""Nanda et al.'s progress measures at every checkpoint of a modular run, cached in the run folder.

`progress_measures(run)` returns one row per checkpoint: train/test loss and accuracy, restricted
and excluded loss (for the key frequencies of the run's *last* checkpoint, as in the paper), the
Gini coefficients of the Fourier-component norms of W_E and of W_out W_U, and the total sum of
squared weights. The rows are stored in `RUN/analysis/progress_measures.json` (written
atomically) and reused while a checkpoint file keeps its size and modification time and the key
frequencies stay the same; new or changed checkpoints are recomputed.
"""

from __future__ import annotations

import os
import warnings

import torch

from lab.analysis import fourier
from lab.analysis.probe import Target

CACHE_VERSION = 2  # 2: each checkpoint also stores its Fourier norms and key frequencies
CACHE_FILE = os.path.join("analysis", "progress_measures.json")
COLUMNS = ["step", "train_loss", "test_loss", "train_acc", "test_acc", "restricted_loss", "restricted_acc",
           "excluded_loss", "excluded_acc", "gini_embed", "gini_neuron_logit", "sum_sq_weights"]


def _fingerprint(run, step: int) -> list[int]:
    from lab.runs.storage import checkpoint_path

    stat = checkpoint_path(run.path, step).stat()
    return [stat.st_size, stat.st_mtime_ns]


@torch.no_grad()
def measures_at(target: Target, frequencies, details: dict | None = None) -> dict:
    """Every progress measure of one model (see the module docstring). If `details` is a dict, the
    checkpoint's own Fourier norms and key frequencies go into it too (what the dashboard's slider shows)."""
    from lab.training.losses import task_loss

    task, model, p = target.task, target.model, target.task.p
    logits, acts = fourier.grid_activations(target)
    row = {"step": target.step}
    for name in ("train", "test"):
        split = task.split(name)
        chosen = logits[split.tokens[:, 0] * p + split.tokens[:, 1]]
        row[f"{name}_loss"] = task_loss(chosen, split.labels, target.loss_kind, torch.float64).item()
        row[f"{name}_acc"] = float((chosen.argmax(-1) == split.labels).double().mean())
    row.update(fourier.restricted_and_excluded(target, frequencies, logits, acts))
    row["gini_embed"] = fourier.gini(fourier.embed_components(model, p))
    row["gini_neuron_logit"] = fourier.gini(fourier.neuron_logit_components(model, p))
    row["sum_sq_weights"] = fourier.sum_sq_weights(model)
    if details is not None:
        details["fourier_norms"] = fourier.fourier_norms(model, task=task).to_dict("list")
        details["key_frequencies"] = fourier.find_key_frequencies(acts, p).to_dict("list")
    return row


def _read_cache(path) -> dict:
    import json

    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):  # missing, unreadable, not UTF-8, not JSON: a cache, so recompute
        return {}
    if not isinstance(cache, dict) or cache.get("version") != CACHE_VERSION:
        return {}
    # a cache of the right version but the wrong shape (hand-edited, damaged) is ignored and rewritten, never trusted
    rows = cache.get("rows")
    frequencies = cache.get("key_frequencies")
    shaped = (isinstance(rows, dict) and isinstance(frequencies, list)
              and all(isinstance(f, int) and not isinstance(f, bool) for f in frequencies)
              and all(isinstance(entry, dict) and isinstance(entry.get("measures"), dict) for entry in rows.values()))
    return cache if shaped else {}


def progress_measures(run, progress: bool = False):
    """One row per checkpoint step of a modular run: step, train/test loss and accuracy, restricted_loss
    (test split), excluded_loss (train split), their accuracies, gini_embed, gini_neuron_logit,
    sum_sq_weights. The key frequencies used are in `frame.attrs["key_frequencies"]`.

    Cached in RUN/analysis/progress_measures.json; only new or changed checkpoints are recomputed."""
    import pandas as pd

    from lab.errors import RunError
    from lab.runs.run import Run, load_run
    from lab.runs.storage import atomic_write_json

    run = run if isinstance(run, Run) else load_run(run)
    steps = run.checkpoint_steps
    if not steps:
        raise RunError(f"{run.path / 'checkpoints'}: the run has no checkpoint yet")
    # fresh models, not kept in the Run's model cache: a run may have many checkpoints
    last = Target(run.model(steps[-1], cache=False), run.task, steps[-1], run.config.train.loss, run)
    fourier.check_fourier_model(last)

    path = run.path / CACHE_FILE
    cache = _read_cache(path)
    fingerprints = {str(step): _fingerprint(run, step) for step in steps}
    if cache.get("last_step") == steps[-1] and cache.get("last_fingerprint") == fingerprints[str(steps[-1])]:
        frequencies = cache["key_frequencies"]
    else:
        _, acts = fourier.grid_activations(last)
        frequencies = fourier.find_key_frequencies(acts, run.task.p)["frequency"].tolist()
    reusable = cache.get("rows", {}) if cache.get("key_frequencies") == frequencies else {}

    rows, todo = {}, []
    for step in steps:
        entry = reusable.get(str(step))
        if entry is not None and entry.get("fingerprint") == fingerprints[str(step)]:
            rows[str(step)] = entry
        else:
            todo.append(step)
    from tqdm.auto import tqdm

    # no bar when everything came from the cache: an empty bar says nothing
    for step in tqdm(todo, disable=not (progress and todo), unit="checkpoint", desc=f"progress measures of {run.name}"):
        target = last if step == steps[-1] else Target(run.model(step, cache=False), run.task, step, run.config.train.loss, run)
        details: dict = {}
        measures = measures_at(target, frequencies, details)
        rows[str(step)] = {"fingerprint": fingerprints[str(step)], "measures": measures, **details}

    if todo or rows.keys() != cache.get("rows", {}).keys():
        try:
            atomic_write_json(path, {"version": CACHE_VERSION, "key_frequencies": frequencies, "last_step": steps[-1],
                                     "last_fingerprint": fingerprints[str(steps[-1])], "rows": rows})
        except OSError as err:
            warnings.warn(f"{path}: could not store the progress measures ({err}); they were computed but not cached")

    frame = pd.DataFrame([rows[str(step)]["measures"] for step in steps], columns=COLUMNS)
    frame.attrs["key_frequencies"] = list(frequencies)
    return frame


def fourier_at(run, step: int):
    """(Fourier norms, key frequencies) of one checkpoint, as `lab.fourier_norms` and `lab.key_frequencies`
    return them: read from the progress-measures cache when `lab analyze` (or `lab demo`) stored them for
    this very checkpoint file, computed otherwise."""
    import pandas as pd

    from lab.runs.run import Run, load_run

    run = run if isinstance(run, Run) else load_run(run)
    step = run.resolve_step(step)
    entry = _read_cache(run.path / CACHE_FILE).get("rows", {}).get(str(step), {})
    try:
        if entry.get("fingerprint") == _fingerprint(run, step):
            return pd.DataFrame(entry["fourier_norms"]), pd.DataFrame(entry["key_frequencies"])
    except (KeyError, TypeError, ValueError, OSError):  # an older or damaged entry: compute instead
        pass
    return fourier.fourier_norms(run, step=step), fourier.key_frequencies(run, step=step)
