"""Ablations: loss and accuracy on a split with one attention head, or some MLP neurons, knocked out.

`method="zero"` sets the component's output to zero; `method="mean"` replaces it, at every
position, by its mean over the split (padding excluded), which keeps the average signal and
removes only what depends on the input.
"""

from __future__ import annotations

import torch

from lab.probe import Target, batches, resolve_target

METHODS = ("zero", "mean")
SPLITS = ("train", "test")


def _check(split: str, method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown ablation method {method!r}; valid: {', '.join(map(repr, METHODS))}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(map(repr, SPLITS))}")


def _token_mask(target: Target, tokens: torch.Tensor) -> torch.Tensor:
    """(batch, pos) float: 1 on real tokens, 0 on padding."""
    if target.task.pad_token_id is None:
        return torch.ones(tokens.shape, dtype=torch.float32)
    return (tokens != target.task.pad_token_id).float()


@torch.no_grad()
def _position_means(target: Target, tokens: torch.Tensor, hook_name: str) -> torch.Tensor:
    """Mean of a hook's activation over the batch at each position, padding excluded: (pos, ...)."""
    model = target.model
    total = count = None
    for _, chunk in batches(tokens, model.cfg.n_heads):
        _, cache = model.run_with_cache(chunk.to(model.device), names_filter=lambda name: name == hook_name)
        act = cache[hook_name].float().cpu()  # (batch, pos, ...)
        mask = _token_mask(target, chunk).reshape(*chunk.shape, *([1] * (act.ndim - 2)))
        part, n = (act * mask).sum(0), mask.sum(0)
        total, count = (part, n) if total is None else (total + part, count + n)
    return total / count.clamp(min=1)


@torch.no_grad()
def _evaluate(target: Target, tokens: torch.Tensor, labels: torch.Tensor, hooks: list) -> tuple[float, float]:
    """(mean loss, accuracy) on the read position, with the given forward hooks applied."""
    from lab.recipes import task_loss

    model = target.model
    loss_sum, correct = 0.0, 0
    for start, chunk in batches(tokens, model.cfg.n_heads):
        target_labels = labels[start : start + len(chunk)].to(model.device)
        logits = model.run_with_hooks(chunk.to(model.device), fwd_hooks=hooks)[:, target.task.read_position]
        loss_sum += task_loss(logits, target_labels, target.loss_kind, torch.float64).item() * len(chunk)
        correct += (logits.argmax(-1) == target_labels).sum().item()
    return loss_sum / len(tokens), correct / len(tokens)


def _replace_hook(index, value):
    """A forward hook that overwrites `act[index]` with `value`: 0, or a (pos, ...) mean per position."""

    def hook(act, hook):
        act = act.clone()
        if isinstance(value, torch.Tensor):
            mean = value[: act.shape[1]].to(act.device, act.dtype)  # the positions this batch has
            act[index] = mean.expand(act.shape[0], *mean.shape)[index]
        else:
            act[index] = value
        return act

    return hook


def ablate_heads(run_or_model, split: str = "test", method: str = "zero", step: int | None = None, task=None):
    """One row per attention head (and one for "none"): the loss and accuracy on `split` with that head's
    output (its `hook_z`) zeroed or mean-replaced. Columns: component ("none", "L0H0", ...), layer, head,
    loss, accuracy, delta_loss, delta_accuracy (relative to "none")."""
    import pandas as pd

    _check(split, method)
    target = resolve_target(run_or_model, step, task)
    data = target.task.split(split)
    cfg = target.model.cfg
    base_loss, base_acc = _evaluate(target, data.tokens, data.labels, [])
    rows = [{"component": "none", "layer": None, "head": None, "loss": base_loss, "accuracy": base_acc}]
    for layer in range(cfg.n_layers):
        hook_name = f"blocks.{layer}.attn.hook_z"  # (batch, pos, head, d_head)
        means = _position_means(target, data.tokens, hook_name) if method == "mean" else None
        for head in range(cfg.n_heads):
            index = (slice(None), slice(None), head)
            hook = _replace_hook(index, means if means is not None else 0.0)
            loss, acc = _evaluate(target, data.tokens, data.labels, [(hook_name, hook)])
            rows.append({"component": f"L{layer}H{head}", "layer": layer, "head": head, "loss": loss, "accuracy": acc})
    frame = pd.DataFrame({key: pd.Series([row[key] for row in rows], dtype=object if key in ("layer", "head") else None)
                          for key in rows[0]})
    frame["delta_loss"] = frame["loss"] - base_loss
    frame["delta_accuracy"] = frame["accuracy"] - base_acc
    return frame


def ablate_neurons(run_or_model, neurons: list[int], layer: int = 0, split: str = "test", method: str = "zero",
                   step: int | None = None, task=None) -> dict:
    """Loss and accuracy on `split` with the MLP neurons `neurons` of `layer` (their `hook_post`) zeroed or
    mean-replaced: {"loss", "accuracy", "base_loss", "base_accuracy"}."""
    _check(split, method)
    target = resolve_target(run_or_model, step, task)
    cfg = target.model.cfg
    if cfg.attn_only:
        raise ValueError("this model is attention-only: it has no MLP neurons to ablate")
    if not 0 <= layer < cfg.n_layers:
        raise ValueError(f"layer {layer} does not exist: this model's layers are 0..{cfg.n_layers - 1}")
    neurons = [int(n) for n in neurons]
    bad = [n for n in neurons if not 0 <= n < cfg.d_mlp]
    if bad:
        raise ValueError(f"neuron {bad[0]} does not exist: this model's neurons are 0..{cfg.d_mlp - 1}")
    data = target.task.split(split)
    hook_name = f"blocks.{layer}.mlp.hook_post"  # (batch, pos, d_mlp)
    means = _position_means(target, data.tokens, hook_name) if method == "mean" else None
    index = (slice(None), slice(None), torch.tensor(neurons, dtype=torch.long))
    base_loss, base_acc = _evaluate(target, data.tokens, data.labels, [])
    loss, acc = _evaluate(target, data.tokens, data.labels, [(hook_name, _replace_hook(index, means if means is not None else 0.0))])
    return {"loss": loss, "accuracy": acc, "base_loss": base_loss, "base_accuracy": base_acc}
