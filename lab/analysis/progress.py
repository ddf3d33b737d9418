"""Nanda et al.'s progress measures at every checkpoint of a modular run, cached in the run folder.

`progress_measures(run)` returns one row per checkpoint: train/test loss and accuracy, restricted
and excluded loss (for the key frequencies of the run's *last* checkpoint, as the paper's notebook
takes those of the checkpoint it analyses), the Gini coefficients of the Fourier-component norms of
W_E and of W_out W_U, and the total sum of squared weights. Restricted and excluded loss and the key
frequencies follow the paper's notebook by default (`definition="paper"`: the logits projected,
restricted loss on all p² pairs, excluded loss on the train split, every neuron's frequency a key
frequency); `definition="tl_demo"` is TransformerLens's demo (lab.analysis.fourier.ProgressDefinition).

The rows are stored in `RUN/analysis/progress_measures.json` (the paper's definition; other
definitions in `progress_measures.<name>.json`), written atomically, and reused while a checkpoint
file keeps its size and modification time and the definition and key frequencies stay the same; new
or changed checkpoints are recomputed. A cache of another version (older lab) is recomputed.
"""

from __future__ import annotations

import os
import warnings

import torch

from lab.analysis import fourier
from lab.analysis.probe import Target

# 2: each checkpoint also stores its Fourier norms and key frequencies
# 3: the paper's definitions (logits projected, restricted loss on all pairs, every neuron's frequency) and
#    the definition stored with the rows; a version-2 cache holds the TransformerLens-demo numbers, so it is recomputed
CACHE_VERSION = 3
CACHE_FILE = os.path.join("analysis", "progress_measures.json")


def cache_file(definition: "str | fourier.ProgressDefinition" = "paper") -> str:
    """The cache's path inside the run folder for this definition (the paper's: CACHE_FILE)."""
    name = fourier.progress_definition(definition).name
    return CACHE_FILE if name == "paper" else os.path.join("analysis", f"progress_measures.{name}.json")
COLUMNS = ["step", "train_loss", "test_loss", "train_acc", "test_acc", "restricted_loss", "restricted_acc",
           "excluded_loss", "excluded_acc", "gini_embed", "gini_neuron_logit", "sum_sq_weights"]


def _fingerprint(run, step: int) -> list[int]:
    from lab.runs.storage import checkpoint_path

    stat = checkpoint_path(run.path, step).stat()
    return [stat.st_size, stat.st_mtime_ns]


@torch.no_grad()
def measures_at(target: Target, frequencies, details: dict | None = None,
                definition: "str | fourier.ProgressDefinition" = "paper") -> dict:
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
    definition = fourier.progress_definition(definition)
    row.update(fourier.restricted_and_excluded(target, frequencies, logits, acts, definition))
    row["gini_embed"] = fourier.gini(fourier.embed_components(model, p))
    row["gini_neuron_logit"] = fourier.gini(fourier.neuron_logit_components(model, p))
    row["sum_sq_weights"] = fourier.sum_sq_weights(model)
    if details is not None:
        details["fourier_norms"] = fourier.fourier_norms(model, task=task).to_dict("list")
        details["key_frequencies"] = fourier.find_key_frequencies(acts, p, definition.key_frequencies).to_dict("list")
    return row


def _read_cache(path, definition: "fourier.ProgressDefinition") -> dict:
    import json
    from dataclasses import asdict

    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):  # missing, unreadable, not UTF-8, not JSON: a cache, so recompute
        return {}
    if not isinstance(cache, dict) or cache.get("version") != CACHE_VERSION or cache.get("definition") != asdict(definition):
        return {}
    # a cache of the right version but the wrong shape (hand-edited, damaged) is ignored and rewritten, never trusted
    rows = cache.get("rows")
    frequencies = cache.get("key_frequencies")
    shaped = (isinstance(rows, dict) and isinstance(frequencies, list)
              and all(isinstance(f, int) and not isinstance(f, bool) for f in frequencies)
              and all(isinstance(entry, dict) and isinstance(entry.get("measures"), dict) for entry in rows.values()))
    return cache if shaped else {}


def progress_measures(run, progress: bool = False, definition: "str | fourier.ProgressDefinition" = "paper"):
    """One row per checkpoint step of a modular run: step, train/test loss and accuracy, restricted_loss,
    excluded_loss, their accuracies, gini_embed, gini_neuron_logit, sum_sq_weights. `definition` says how
    restricted and excluded loss are computed and on which pairs (default "paper": Nanda et al.'s notebook,
    restricted loss on all p² pairs, excluded loss on the train split; "tl_demo": TransformerLens's demo,
    restricted loss on the test split). `frame.attrs` holds "key_frequencies" (those of the last
    checkpoint, used at every step) and "definition" (`ProgressDefinition.describe()`).

    Cached in RUN/analysis/ (`cache_file(definition)`); only new or changed checkpoints are recomputed."""
    import pandas as pd
    from dataclasses import asdict

    from lab.errors import RunError
    from lab.runs.run import Run, load_run
    from lab.runs.storage import atomic_write_json

    definition = fourier.progress_definition(definition)
    run = run if isinstance(run, Run) else load_run(run)
    steps = run.checkpoint_steps
    if not steps:
        raise RunError(f"{run.path / 'checkpoints'}: the run has no checkpoint yet")
    # fresh models, not kept in the Run's model cache: a run may have many checkpoints
    last = Target(run.model(steps[-1], cache=False), run.task, steps[-1], run.config.train.loss, run)
    fourier.check_fourier_model(last)

    path = run.path / cache_file(definition)
    cache = _read_cache(path, definition)
    fingerprints = {str(step): _fingerprint(run, step) for step in steps}
    if cache.get("last_step") == steps[-1] and cache.get("last_fingerprint") == fingerprints[str(steps[-1])]:
        frequencies = cache["key_frequencies"]
    else:
        _, acts = fourier.grid_activations(last)
        frequencies = fourier.find_key_frequencies(acts, run.task.p, definition.key_frequencies)["frequency"].tolist()
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
        measures = measures_at(target, frequencies, details, definition)
        rows[str(step)] = {"fingerprint": fingerprints[str(step)], "measures": measures, **details}

    if todo or rows.keys() != cache.get("rows", {}).keys():
        try:
            atomic_write_json(path, {"version": CACHE_VERSION, "definition": asdict(definition),
                                     "key_frequencies": frequencies, "last_step": steps[-1],
                                     "last_fingerprint": fingerprints[str(steps[-1])], "rows": rows})
        except OSError as err:
            warnings.warn(f"{path}: could not store the progress measures ({err}); they were computed but not cached")

    frame = pd.DataFrame([rows[str(step)]["measures"] for step in steps], columns=COLUMNS)
    frame.attrs["key_frequencies"] = list(frequencies)
    frame.attrs["definition"] = definition.describe()
    return frame


def fourier_at(run, step: int, definition: "str | fourier.ProgressDefinition" = "paper"):
    """(Fourier norms, key frequencies) of one checkpoint, as `lab.fourier_norms` and `lab.key_frequencies`
    (with the definition's key-frequency method) return them: read from the progress-measures cache when
    `lab analyze` (or `lab demo`) stored them for this very checkpoint file, computed otherwise."""
    import pandas as pd

    from lab.runs.run import Run, load_run

    definition = fourier.progress_definition(definition)
    run = run if isinstance(run, Run) else load_run(run)
    step = run.resolve_step(step)
    entry = _read_cache(run.path / cache_file(definition), definition).get("rows", {}).get(str(step), {})
    try:
        if entry.get("fingerprint") == _fingerprint(run, step):
            return pd.DataFrame(entry["fourier_norms"]), pd.DataFrame(entry["key_frequencies"])
    except (KeyError, TypeError, ValueError, OSError):  # an older or damaged entry: compute instead
        pass
    return fourier.fourier_norms(run, step=step), fourier.key_frequencies(run, step=step, method=definition.key_frequencies)
