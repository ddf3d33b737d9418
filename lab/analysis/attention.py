"""Attention patterns: every head over one encoded text, and the `=`-to-`a` attention over the modular grid."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lab.models.architectures import require_attention
from lab.models.prediction import prediction_from_logits
from lab.analysis.ablation import private_target  # run_with_cache hooks stay on a private copy of the model
from lab.analysis.probe import Target, encode_input


@dataclass(frozen=True)
class AttentionResult:
    """`pattern` (layer, head, query, key) on CPU; `tokens`: one display label per position;
    `token_ids`; the model's `prediction` (label name) and its `probability`; the checkpoint `step`."""

    pattern: torch.Tensor
    tokens: list[str]
    token_ids: list[int]
    prediction: str
    probability: float
    step: int | None

    def __repr__(self) -> str:  # readable in a REPL and a notebook: the pattern's shape, not its numbers
        layers, heads = self.pattern.shape[:2]
        return (f"AttentionResult({' '.join(self.tokens)!r} -> {self.prediction!r} ({self.probability:.3f}); "
                f"pattern (layer, head, query, key) = ({layers}, {heads}, {len(self.tokens)}, {len(self.tokens)}); step {self.step})")


def _patterns(model, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (batch, pos, vocab) and patterns stacked as (batch, layer, head, query, key)."""
    logits, cache = model.run_with_cache(tokens.to(model.device), names_filter=lambda name: name.endswith("hook_pattern"))
    pattern = torch.stack([cache["pattern", layer] for layer in range(model.cfg.n_layers)], dim=1)
    return logits, pattern


@torch.no_grad()
def attention(model_or_run, text: str, step: int | None = None, task=None) -> AttentionResult:
    """The attention of every head over `text` (e.g. `"a cab"` for a_and_b, `"12 + 34 ="` for modular).

    Pass a Run (its task is used) or a bare model with `task=`. Bad text raises ValueError with the
    task's message (character not in the alphabet, text too long, number out of range).
    """
    target = private_target(model_or_run, step, task)
    require_attention(target.model, "lab.attention")
    tokens = encode_input(target, text)
    logits, pattern = _patterns(target.model, tokens)
    prediction = prediction_from_logits(target.task, logits[0, target.task.read_position].cpu())
    ids = tokens[0].tolist()
    return AttentionResult(
        pattern=pattern[0].float().cpu(),
        tokens=target.task.token_labels(ids),
        token_ids=ids,
        prediction=prediction.label,
        probability=prediction.probability,
        step=target.step,
    )


def _modular_target(run_or_model, step, task) -> Target:
    target = private_target(run_or_model, step, task)
    if target.task.name != "modular":
        raise ValueError(f"this analysis is for modular runs; this one is task {target.task.name!r}")
    return target


@torch.no_grad()
def modular_attention_grid(run_or_model, step: int | None = None, task=None) -> torch.Tensor:
    """(layer, head, p, p): attention from the `=` position to the `a` position for every (a, b);
    rows a, columns b. Pairs the task excludes (b = 0 for division) are NaN."""
    target = _modular_target(run_or_model, step, task)
    require_attention(target.model, "the attention grid")
    p = target.task.p
    pairs = target.task.all_pairs()
    _, pattern = _patterns(target.model, pairs.tokens)  # (pair, layer, head, query, key)
    values = pattern[:, :, :, -1, 0].float().cpu()  # (pair, layer, head)
    grid = torch.full((p * p, *values.shape[1:]), float("nan"))
    grid[pairs.tokens[:, 0] * p + pairs.tokens[:, 1]] = values
    return grid.reshape(p, p, *values.shape[1:]).permute(2, 3, 0, 1).contiguous()
