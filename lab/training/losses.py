"""The training loss: cross-entropy of the logits at the read position, via softmax or StableMax.

StableMax (Prieto et al. 2025, "Grokking at the edge of numerical stability", arXiv:2501.04697)
replaces exp by s(x) = x + 1 (x >= 0), 1 / (1 - x) (x < 0), so that the probabilities cannot
saturate into Softmax Collapse. Training, evaluation and every analysis that reports a loss use
`task_loss`, so the numbers agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    """Mean cross-entropy of (batch, vocab) logits against labels, via softmax or StableMax, in `dtype`."""
    logits = logits.to(dtype)
    if kind == "softmax":
        return F.cross_entropy(logits, labels)
    if kind == "stablemax":
        return -log_stablemax(logits).gather(-1, labels[:, None]).mean()
    raise ValueError(f"unknown loss {kind!r}; valid: 'softmax', 'stablemax'")
