"""The training loss: cross-entropy of the logits at the read position (a classifier) or at every
target position (a language model: labels (batch, pos), IGNORE_INDEX where no loss is read), via
softmax or StableMax; and the accuracy that goes with it (per target token).

StableMax (Prieto et al. 2025, "Grokking at the edge of numerical stability", arXiv:2501.04697)
replaces exp by s(x) = x + 1 (x >= 0), 1 / (1 - x) (x < 0), so that the probabilities cannot
saturate into Softmax Collapse. Training, evaluation and every analysis that reports a loss use
`task_loss`, so the numbers agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lab.tasks.base import IGNORE_INDEX


def _s(logits: torch.Tensor) -> torch.Tensor:
    """StableMax's replacement for exp: x + 1 for x >= 0, 1 / (1 - x) for x < 0."""
    return torch.where(logits >= 0, logits + 1, 1 / (1 - logits.clamp(max=0)))


def stablemax(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """StableMax probabilities: s(x) / sum s(x)."""
    s = _s(logits)
    return s / s.sum(dim=dim, keepdim=True)


def log_stablemax(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log of StableMax probabilities, as log s(x) - log sum s(x) (no underflow of tiny probabilities)."""
    s = _s(logits)
    return s.log() - s.sum(dim=dim, keepdim=True).log()


def task_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str = "softmax", dtype=torch.float32) -> torch.Tensor:
    """Mean cross-entropy of logits (batch, vocab) against labels (batch,), or of logits (batch, pos,
    vocab) against labels (batch, pos) over the positions whose label is not IGNORE_INDEX (every target
    token weighs the same, as in a language model's loss), via softmax or StableMax, in `dtype`."""
    logits = logits.to(dtype).reshape(-1, logits.shape[-1])  # (targets, vocab); a no-op for (batch, vocab)
    labels = labels.reshape(-1)
    if kind == "softmax":
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    if kind == "stablemax":
        read = labels != IGNORE_INDEX
        picked = -log_stablemax(logits).gather(-1, labels.clamp(min=0)[:, None])[:, 0]  # (targets,)
        return (picked * read).sum() / read.sum()
    raise ValueError(f"unknown loss {kind!r}; valid: 'softmax', 'stablemax'")


def right_and_targets(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(number of targets the argmax gets right, number of targets) of logits (..., vocab) against labels
    (...), counting only labels that are not IGNORE_INDEX: accuracy is per target token."""
    read = labels != IGNORE_INDEX
    return ((logits.argmax(-1) == labels) & read).sum(), read.sum()
