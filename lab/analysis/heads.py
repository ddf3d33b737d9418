"""Which head finds which letter, in an a_and_b run; and `precompute_heads`, which fills the Heads cache.

For each head: the attention mass the `<cls>` position puts on `a` characters (averaged over the
split's strings that contain an `a`) and on `b` characters (over those that contain a `b`), and
the accuracy with that head zeroed. A head with most of its mass on `a`, whose removal costs
accuracy, is the model's `a` finder.

Like the ablations, the masses are exact (every string of the split), computed with the last block
at the `<cls>` position only, and cached per checkpoint in the run folder (lab/analysis/ablation.py).
"""

from __future__ import annotations


from lab.analysis.ablation import (FINDS_RATIO, METHODS, SPLITS, _run_of, ablate_heads, cached, is_cached,
                                   letter_masses, private_target, split_entries)
from lab.models.architectures import require_attention
from lab.analysis.probe import Target


def letter_attention(run, step: int | None = None, split: str = "test", cache: bool = True, task=None):
    """One row per head: component, layer, head, mass_on_a, mass_on_b, ablated_accuracy (head zeroed),
    finds ("a" or "b" when the head puts more than FINDS_RATIO times as much mass on that letter, else "-").

    Pass a Run (or its folder), or a bare model with `task=` as for `lab.ablate_heads`. Exact (every
    string of the split); for a Run cached per checkpoint in the run folder (`cache=False` recomputes
    without the cache)."""
    import pandas as pd

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(map(repr, SPLITS))}")
    require_attention(_run_of(run, task) or run, "lab.letter_attention")
    owner = _run_of(run, task) if cache else None
    target = None if owner is not None else private_target(run, step, task)
    task = owner.task if owner is not None else target.task
    if task.name != "a_and_b":
        raise ValueError(f"letter_attention is for a_and_b runs; this one is task {task.name!r}")
    if owner is not None:
        rows = cached(owner, step, f"letter_attention/{split}", lambda: split_entries(private_target(owner, step), split))
        ablated = ablate_heads(owner, split=split, step=step)
    else:
        rows = letter_masses(target, split)
        ablated = ablate_heads(target.run if target.run is not None else target.model, split=split, step=step,
                               task=None if target.run is not None else task, cache=False)
    ablated_accuracy = ablated.set_index("component")["accuracy"]
    frame = pd.DataFrame(rows)
    frame["ablated_accuracy"] = [float(ablated_accuracy[c]) for c in frame["component"]]
    frame["finds"] = ["a" if a > FINDS_RATIO * b else "b" if b > FINDS_RATIO * a else "-"
                      for a, b in zip(frame["mass_on_a"], frame["mass_on_b"])]
    return frame


def precompute_heads(run, steps: list[int] | None = None, progress: bool = False) -> int:
    """Fill the run folder's Heads cache: head ablations (both splits, both methods) and, for a_and_b, letter
    attention, at every checkpoint (or `steps`), so the dashboard's Heads page answers from disk. One clean
    pass per checkpoint and split; what is already cached is skipped. Returns how many (checkpoint, split)
    pairs were computed."""
    from tqdm.auto import tqdm

    owner = _run_of(run, None)
    if owner is None:
        raise TypeError(f"precompute_heads needs a Run or a run folder, got {type(run).__name__}")
    require_attention(owner, "precompute_heads")
    steps = owner.checkpoint_steps if steps is None else [owner.resolve_step(step) for step in steps]
    letters = owner.task.name == "a_and_b"
    todo = [(step, split) for step in reversed(steps) for split in SPLITS
            if not all(is_cached(owner, step, key) for key in
                       [f"ablate_heads/{split}/{method}" for method in METHODS] + ([f"letter_attention/{split}"] * letters))]
    for step, split in tqdm(todo, disable=not progress, unit="split", desc=f"head analyses of {owner.name}"):
        cached(owner, step, f"ablate_heads/{split}/zero",
               lambda: split_entries(Target(owner.model(step, cache=False), owner.task, step, owner.config.train.loss, owner), split))
    return len(todo)
