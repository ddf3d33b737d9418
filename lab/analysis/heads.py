"""Which head finds which letter, in an a_and_b run.

For each head: the attention mass the `<cls>` position puts on `a` characters (averaged over the
split's strings that contain an `a`) and on `b` characters (over those that contain a `b`), and
the accuracy with that head zeroed. A head with most of its mass on `a`, whose removal costs
accuracy, is the model's `a` finder.
"""

from __future__ import annotations

import torch

from lab.analysis.ablation import SPLITS, ablate_heads
from lab.probe import batches, resolve_target

FINDS_RATIO = 1.5


@torch.no_grad()
def letter_attention(run, step: int | None = None, split: str = "test"):
    """One row per head: component, layer, head, mass_on_a, mass_on_b, ablated_accuracy (head zeroed),
    finds ("a" or "b" when the head puts more than FINDS_RATIO times as much mass on that letter, else "-")."""
    import pandas as pd

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(map(repr, SPLITS))}")
    target = resolve_target(run, step)
    task = target.task
    if task.name != "a_and_b":
        raise ValueError(f"letter_attention is for a_and_b runs; this one is task {task.name!r}")
    model, cfg = target.model, target.model.cfg
    tokens = task.split(split).tokens
    a_id, b_id = task.vocab.index("a"), task.vocab.index("b")
    mass = {letter: torch.zeros(cfg.n_layers, cfg.n_heads, dtype=torch.float64) for letter in "ab"}
    count = {letter: 0 for letter in "ab"}
    for _, chunk in batches(tokens, cfg.n_heads):
        _, cache = model.run_with_cache(chunk.to(model.device), names_filter=lambda name: name.endswith("hook_pattern"))
        cls_rows = torch.stack([cache["pattern", layer][:, :, task.read_position] for layer in range(cfg.n_layers)], 1)
        cls_rows = cls_rows.double().cpu()  # (batch, layer, head, key)
        for letter, letter_id in (("a", a_id), ("b", b_id)):
            is_letter = (chunk == letter_id).double()  # (batch, key)
            has = is_letter.sum(-1) > 0
            per_string = (cls_rows * is_letter[:, None, None, :]).sum(-1)  # (batch, layer, head)
            mass[letter] += per_string[has].sum(0)
            count[letter] += int(has.sum())
    ablated = ablate_heads(target.run if target.run is not None else model, split=split, step=step,
                           task=None if target.run is not None else task).set_index("component")
    rows = []
    for layer in range(cfg.n_layers):
        for head in range(cfg.n_heads):
            on_a = float(mass["a"][layer, head] / max(count["a"], 1))
            on_b = float(mass["b"][layer, head] / max(count["b"], 1))
            finds = "a" if on_a > FINDS_RATIO * on_b else "b" if on_b > FINDS_RATIO * on_a else "-"
            component = f"L{layer}H{head}"
            rows.append({"component": component, "layer": layer, "head": head, "mass_on_a": on_a, "mass_on_b": on_b,
                         "ablated_accuracy": float(ablated.loc[component, "accuracy"]), "finds": finds})
    return pd.DataFrame(rows)
