"""What the benchmarks measure with: FLOPs of a training step, interleaved timing, the matmul peak.

Shared by `lab bench`'s step timing (lab/bench/suite.py) and its sweep figures (lab/bench/sweep.py).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from lab.config import ModelConfig


def step_flops(cfg: ModelConfig, batch: int, n_pos: int, causal_keys: int | None = None) -> int:
    """Matmul FLOPs one training step must do when the loss reads one position (2 per multiply-add),
    counted for the algorithm of `Transformer.forward_at`.

    Earlier layers run at every position; the last layer needs keys and values at the `causal_keys`
    positions the read position can see (all by default), and its query, attention output, MLP and
    unembedding at the read position only. A one-layer model without LayerNorm gets Q, K and V from
    per-token and per-position tables ((d_vocab + n_pos) rows instead of batch * positions), and its
    scores from a (query token, key position, key token) table where that table is the smaller work.
    Backward costs twice the forward (gradients of inputs and of weights; the first layer's input
    gradient is needed too, since the embeddings are trained). Element-wise work (softmax, ReLU,
    AdamW) and table look-ups are not counted.
    """
    d, he, h, e = cfg.d_model, cfg.n_heads * cfg.d_head, cfg.n_heads, cfg.d_head
    keys = n_pos if causal_keys is None else causal_keys
    mlp = 0 if cfg.attn_only else 2 * 2 * d * cfg.d_mlp
    forward = (cfg.n_layers - 1) * batch * _layer_flops(cfg, n_pos)
    if cfg.n_layers == 1 and cfg.normalization == "none":
        forward += (cfg.d_vocab + n_pos) * 2 * d * 3 * he  # the Q, K, V tables
        if cfg.d_vocab * cfg.d_vocab <= batch * e:  # scores from a (query token, key, key token) table
            forward += 2 * cfg.d_vocab * keys * cfg.d_vocab * he
            last = 2 * h * e * keys + 2 * he * d + mlp  # pattern·v per row; q·k is looked up
        else:
            last = 2 * 2 * h * e * keys + 2 * he * d + mlp
    else:
        last = keys * 2 * d * 2 * he + 2 * d * he + 2 * 2 * h * e * keys + 2 * he * d + mlp
    forward += batch * (last + 2 * d * cfg.d_vocab_out)
    return 3 * forward


def sequence_step_flops(cfg: ModelConfig, batch: int, n_pos: int) -> int:
    """Matmul FLOPs of one full-sequence training step (a language model: logits at every position), 2
    per multiply-add: every layer at every position, the unembedding at every position; backward twice
    the forward, as in `step_flops`. Attention counts every (query, key) pair, as a dense
    softmax(q k^T) v does and as `torch.utils.flop_counter` counts fused attention (a causal kernel
    may skip the masked half)."""
    return 3 * batch * (cfg.n_layers * _layer_flops(cfg, n_pos) + n_pos * 2 * cfg.d_model * cfg.d_vocab_out)


def _layer_flops(cfg: ModelConfig, n_pos: int) -> int:
    """Forward matmul FLOPs of one block over one input of `n_pos` positions: Q, K, V, O and the MLP at
    every position, q·k and pattern·v over every (query, key) pair."""
    d, he = cfg.d_model, cfg.n_heads * cfg.d_head
    mlp = 0 if cfg.attn_only else 2 * 2 * d * cfg.d_mlp
    return n_pos * (2 * d * 3 * he + 2 * he * d + mlp) + 2 * 2 * he * n_pos * n_pos


# --- timing --------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(fns: dict[str, Callable[[], object]], rounds: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """Call every function once per round, in turn, `rounds` times (after `warmup` rounds); seconds per call."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def matmul_n(device: torch.device) -> int:
    """The size of the peak-probing matmul: large enough to run at the device's peak, small enough to time often."""
    return 2048 if device.type == "cpu" else 8192


def matmul_sample(n: int, device: torch.device) -> tuple[int, Callable[[], object]]:
    """(FLOPs, a function doing one n x n x n fp32 matmul): the probe of the machine's matmul peak."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)
    return 2 * n**3, lambda: torch.mm(a, b, out=out)
