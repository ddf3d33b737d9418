"""Which rows a step reads: chunks of a split that fit one memory budget (evaluation and analysis
alike), and the seeded mini-batch of a training step (the Trainer and every ensemble member alike).

The largest activation of a forward pass over (batch, pos) tokens is usually the attention scores,
batch * heads * pos^2 floats; a chunk holds at most ATTENTION_FLOATS of them (64 MB in float32).
"""

from __future__ import annotations

from typing import Iterator

import torch

ATTENTION_FLOATS = 1 << 24


def rows_per_chunk(n_heads: int, n_pos: int, budget: int = ATTENTION_FLOATS) -> int:
    """How many inputs of `n_pos` tokens fit the budget (at least one)."""
    return max(1, budget // max(1, n_heads * n_pos * n_pos))


def batches(tokens: torch.Tensor, n_heads: int, budget: int = ATTENTION_FLOATS) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, chunk) pairs that cover (batch, pos) tokens in order, each chunk within the budget."""
    size = rows_per_chunk(n_heads, tokens.shape[1], budget)
    for start in range(0, tokens.shape[0], size):
        yield start, tokens[start : start + size]


def rows_per_step(batch_size: int | None, n_train: int) -> int:
    """Training rows one step reads: the whole training split (batch_size None, or not smaller), else batch_size."""
    return n_train if batch_size is None else min(batch_size, n_train)


def minibatch_index(seed: int, step: int, n_train: int, batch_size: int) -> torch.Tensor:
    """The rows (indices into the training split) of step `step`'s mini-batch: a randperm drawn from a
    generator seeded by (model seed, step), so a resumed run draws the same batches as an uninterrupted one."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randperm(n_train, generator=generator)[:batch_size]


def evaluation_rows(n_rows: int, most: int | None) -> torch.Tensor | None:
    """The rows of a split an evaluation scores (`train.train_eval_rows`): None for every row, else `most` rows
    spread evenly over the split (row i * n_rows // most), the same rows at every evaluation."""
    if most is None or most >= n_rows:
        return None
    return torch.arange(most) * n_rows // most
