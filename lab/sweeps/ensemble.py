"""Train many same-shape models at once: one stacked ensemble, one forward and one backward per step.

A sweep (weight decay x training fraction x seed, ...) trains dozens of models whose weights have
the same shapes. Trained one after another, a small model's step is mostly overhead: Python,
kernel launches, matmuls too small to keep a core busy. Stacked on a leading member axis they
share every kernel:

    flat          (members, n_params)        every weight of a member in one row
    W_in          (members, d_model, d_mlp)  a view into `flat`: one batched matmul for all members
    tokens        (members, batch, pos)      each member's own training rows (its own split)
    AdamW state   (members, n_params)        PyTorch's fused AdamW kernel on each member's row,
                                             with that member's lr, weight decay, betas and step

    summaries = train_ensemble([(config, run_dir), ...])      # the API `lab sweep` builds on
    groups = group_by_shape(configs)                          # which members can share a stack

Each member behaves as its own `lab train`: the same initial weights (built by `Transformer(cfg)`
from its seed), its own split (train_frac, data_seed: each member reads its rows of a table of the
distinct splits), its own mini-batches (the Trainer's seeded randperm), learning-rate warm-up,
AdamW (the Trainer's own fused kernel: decoupled decay lr * wd, bias corrections from the member's
own step count), loss kind and dtype, ⊥Grad and the Grokfast EMA filter; and it writes its own
ordinary run folder (config.json, metrics.jsonl with the Trainer's keys, checkpoints on the
Trainer's schedule, resume.safetensors, summary.json), so `lab.load_run`, `lab train --resume` and
the dashboard read it unchanged.

How exact: the forward and backward do the Trainer's arithmetic in another summation order, so a
member equals its standalone run to float rounding (~1e-7 relative per step; tests/test_ensemble.py
measures under 1e-5 over the first 80 steps of its runs), not bit for bit. Where the training
dynamics amplify rounding (Adam divides tiny gradients by their own tiny scale; grokking runs
have such phases) the two drift apart exactly as far as a standalone run whose initial W_E is
moved by one ulp drifts from itself. An ensemble resumed from its checkpoints equals the
uninterrupted ensemble bit for bit.

How it is fast (see lab/bench/sweep.py for the measured speed-ups):
- members sorted by rows per step, run in buckets of equal batch width: no padded rows; on a CPU
  a bucket's widest activation stays within the caches (`_CPU_BUCKET_FLOATS`);
- one layer without LayerNorm (the grokking models): Q, K, V and even the attention scores are
  tables over (position, token), looked up per row; lookups add their gradients with index_add_;
- gradients land in one (members, n_params) buffer, read by one fused AdamW call per group of
  members that share hyperparameters; no Python loop over members inside a step (except to draw
  mini-batches);
- a finished member is written out and dropped: the tensors are re-stacked without it, which
  costs about one of its steps (measured), where masking would keep paying for it every step;
- members' checkpoint and summary files are written on a few threads at once (each is fsync'ed).
torch.compile was tried on the bucket's forward and loss: it compiled offline (72 s) and made the
step slower (39 ms against 28 ms for the small sweep), so the step runs eagerly.

Also:
- A member whose folder holds a resumable run continues from its resume state (members may be at
  different steps in one stack); a finished or diverged one is skipped.
- Ctrl-C / SIGTERM (or `stop()` returning True) checkpoints every running member and marks it
  interrupted, exactly like `lab train`; a member whose loss turns NaN stops as "diverged".
- Members whose models differ in shape are trained in separate groups (`group_by_shape`), one
  group after another. Members the stack cannot hold train with the standalone `Trainer`, one
  after another (`vectorisable`): architectures other than the transformer, and the Grokfast MA
  filter (its ring of `window` past gradients per member would multiply memory by the member count).
- `elapsed_s` and `wall_time_s` of a member are the wall time of the ensemble that trained it.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lab.runs import storage
from lab.config import ExperimentConfig, ModelConfig, is_config_of
from lab.errors import ConfigError, RunError
from lab.training.losses import log_stablemax
from lab.models.transformer import Transformer
from lab.runs.storage import ResumeState
from lab.tasks import Split, Task, make_task
from lab.training.trainer import (
    Trainer,
    catch_stop_signals,
    checkpoint_schedule,
    progress_bar,
    resolve_device,
    run_summary,
    stop_after_grok_reached,
    warmup_lr,
)

# Model settings that change only the initial values of the weights, not their shapes or the forward pass.
_INIT_ONLY = ("seed", "init_scale")
# Rows of one evaluation chunk times members times the widest activation per row stays under this.
_EVAL_FLOATS = 1 << 23
# On a CPU, the members that run as one batched forward hold at most this many floats in their widest
# activation (8 MB): larger stacks stream from memory and gain nothing (measured on modadd_quick's model).
_CPU_BUCKET_FLOATS = 1 << 21
# Threads that write members' files at once (fsync waits on the disk, not on Python).
_WRITER_THREADS = 8

Member = tuple[ExperimentConfig, Path]


# --- grouping -------------------------------------------------------------------------------------


def shape_key(config: ExperimentConfig) -> tuple:
    """What members must share to train in one ensemble: the resolved model config except the
    settings that only change the initial values (seed), the task (its read position and tokens),
    and the device."""
    resolved = config.resolve()
    model = {k: v for k, v in resolved.model.model_dump().items() if k not in _INIT_ONLY}
    return (resolved.task.name, json.dumps(model, sort_keys=True), str(resolve_device(resolved.train.device)))


def vectorisable(config: ExperimentConfig) -> bool:
    """False for members the ensemble hands to the standalone Trainer: architectures other than the
    transformer (`model.arch`), and the Grokfast MA filter, whose ring of `window` past gradients
    per member would multiply memory by the member count."""
    return config.model.arch == "transformer" and config.train.grad_filter.kind != "ma"


def group_by_shape(configs: Sequence[ExperimentConfig]) -> list[list[int]]:
    """Indices of `configs` grouped into ensembles of same-shape members, in order of first appearance.

    Each member that cannot be vectorised (see `vectorisable`) is a group of its own."""
    groups: dict[tuple, list[int]] = {}
    for index, config in enumerate(configs):
        key = shape_key(config) if vectorisable(config) else ("standalone", index)
        groups.setdefault(key, []).append(index)
    return list(groups.values())


# --- the stacked forward pass -----------------------------------------------------------------------
# `Transformer.forward_at` (lab/models/transformer.py) for a stack of models: every weight carries a
# leading member axis, every activation a leading member axis and then the batch. The arithmetic is
# the same, matmul for matmul, with torch.baddbmm in place of torch.addmm.


class _Lookup(torch.autograd.Function):
    """rows = table[index] whose backward adds the gradients into the table with one `index_add_`
    (5-8x faster on a CPU than `F.embedding`'s backward at these sizes)."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.rows = table.shape[0]
        return F.embedding(index, table)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        width = grad.shape[-1]
        grad_table = grad.new_zeros(ctx.rows, width).index_add_(0, index.reshape(-1), grad.reshape(-1, width))
        return grad_table, None


class _Indices:
    """Row indices derived from one batch of tokens (which table row each input reads, per member),
    computed on first use and kept with the batch: a full-batch ensemble computes them once."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens  # (M, batch, pos)
        self._memo: dict = {}

    def get(self, key, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]


def _lookup(table: torch.Tensor, indices: _Indices, key: str, rows: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Per-member lookup: table (M, n, width) at rows() (M, ...) of each member's own table -> (M, ..., width)."""
    members, n, width = table.shape

    def flat_rows() -> torch.Tensor:  # member m's row r is row m * n + r of the flattened table
        index = rows()
        return index + torch.arange(members, device=index.device).view(members, *[1] * (index.ndim - 1)) * n

    return _Lookup.apply(table.reshape(members * n, width), indices.get((key, n), flat_rows))


def _layer_norm(x: torch.Tensor, params: dict, prefix: str, eps: float = 1e-5) -> torch.Tensor:
    """lab.models.transformer.LayerNorm per member: x (M, ..., d), weights (M, d)."""
    w, b = params[prefix + ".w"], params[prefix + ".b"]
    shape = (w.shape[0],) + (1,) * (x.ndim - 2) + (w.shape[1],)
    x = x - x.mean(-1, keepdim=True)
    scale = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    return (x / scale) * w.view(shape) + b.view(shape)


def _heads_to_columns(*weights: torch.Tensor) -> torch.Tensor:
    """(M, head, d_model, d_head) weights -> (M, d_model, n * head * d_head), the first weight's columns first."""
    members, _, d_model, _ = weights[0].shape
    return torch.cat(weights, dim=1).permute(0, 2, 1, 3).reshape(members, d_model, -1)


def _head_biases(*biases: torch.Tensor) -> torch.Tensor:
    """(M, head, d_head) biases -> (M, 1, n * head * d_head), broadcast over the batch."""
    return torch.cat(biases, dim=1).reshape(biases[0].shape[0], 1, -1)


def _mlp(params: dict, prefix: str, act_fn, x: torch.Tensor) -> torch.Tensor:
    """x (M, rows, d_model) -> (M, rows, d_model)."""
    pre = torch.baddbmm(params[prefix + "b_in"][:, None], x, params[prefix + "W_in"])  # (M, rows, d_mlp)
    post = F.relu_(pre) if act_fn is F.relu else act_fn(pre)  # in place: relu's backward needs only its output
    return torch.baddbmm(params[prefix + "b_out"][:, None], post, params[prefix + "W_out"])


def _block(params: dict, layer: int, cfg: ModelConfig, resid: torch.Tensor, key_padding: torch.Tensor | None) -> torch.Tensor:
    """A whole block at every position (the layers before the last): resid (M, batch, pos, d_model)."""
    p = f"blocks.{layer}."
    act_fn = {"relu": F.relu, "gelu": F.gelu}[cfg.act_fn]
    members, batch, n_pos, d_model = resid.shape
    heads, d_head = cfg.n_heads, cfg.d_head
    x = _layer_norm(resid, params, p + "ln1") if cfg.normalization == "LN" else resid
    W_QKV = _heads_to_columns(params[p + "attn.W_Q"], params[p + "attn.W_K"], params[p + "attn.W_V"])
    b_QKV = _head_biases(params[p + "attn.b_Q"], params[p + "attn.b_K"], params[p + "attn.b_V"])
    qkv = torch.baddbmm(b_QKV, x.reshape(members, batch * n_pos, d_model), W_QKV)
    q, k, v = qkv.view(members, batch, n_pos, 3, heads, d_head).unbind(3)  # each (M, batch, pos, head, d_head)
    scores = torch.einsum("mbqhe,mbkhe->mbhqk", q, k) / math.sqrt(d_head)
    mask = torch.zeros(n_pos, n_pos, dtype=torch.bool, device=resid.device)
    if cfg.causal:
        mask = torch.ones(n_pos, n_pos, dtype=torch.bool, device=resid.device).triu(1)
    mask = mask[None, None, None]
    if key_padding is not None:
        mask = mask | key_padding[:, :, None, None, :]
    pattern = scores.masked_fill(mask, float("-inf")).softmax(dim=-1)  # (M, batch, head, query, key)
    z = torch.einsum("mbhqk,mbkhe->mbqhe", pattern, v).reshape(members, batch * n_pos, heads * d_head)
    W_O = params[p + "attn.W_O"].reshape(members, heads * d_head, d_model)
    resid = resid + torch.baddbmm(params[p + "attn.b_O"][:, None], z, W_O).view(resid.shape)
    if not cfg.attn_only:
        x = _layer_norm(resid, params, p + "ln2") if cfg.normalization == "LN" else resid
        resid = resid + _mlp(params, p + "mlp.", act_fn, x.reshape(members, batch * n_pos, d_model)).view(resid.shape)
    return resid


def stacked_forward_at(params: dict[str, torch.Tensor], cfg: ModelConfig, tokens: torch.Tensor, position: int,
                       indices: _Indices | None = None) -> torch.Tensor:
    """`Transformer.forward_at` for a stack of same-shape models.

    params: name -> (members, *shape) as in `Transformer.named_parameters()`; tokens (members, batch, pos),
    each member's own inputs; `indices`: the batch's `_Indices`, to reuse across steps. Returns logits
    (members, batch, d_vocab_out) at `position`."""
    indices = indices if indices is not None else _Indices(tokens)
    members, batch, n_pos = tokens.shape
    pos = position % n_pos
    heads, d_head, d_model = cfg.n_heads, cfg.d_head, cfg.d_model
    he = heads * d_head
    act_fn = {"relu": F.relu, "gelu": F.gelu}[cfg.act_fn]
    key_padding = None  # (M, batch, pos), True at padding
    if cfg.pad_token_id is not None:
        key_padding = indices.get("padding", lambda: tokens == cfg.pad_token_id)
    last = cfg.n_layers - 1
    a = f"blocks.{last}.attn."
    n_keys = pos + 1 if cfg.causal else n_pos  # a causal query never sees later keys

    if cfg.n_layers == 1 and cfg.normalization == "none":
        scores, v, resid_at = _attention_inputs_from_tables(params, cfg, indices, pos, n_keys)
    else:
        W_E, W_pos = params["W_E"], params.get("W_pos")
        resid = _lookup(W_E, indices, "tokens", lambda: tokens)  # (M, batch, pos, d_model)
        if W_pos is not None:
            resid = resid + W_pos[:, None, :n_pos]
        for layer in range(last):
            resid = _block(params, layer, cfg, resid, key_padding)
        x = _layer_norm(resid, params, f"blocks.{last}.ln1") if cfg.normalization == "LN" else resid
        keys = x[:, :, :n_keys].reshape(members, batch * n_keys, d_model)
        W_KV = _heads_to_columns(params[a + "W_K"], params[a + "W_V"])  # (M, d_model, 2 he)
        kv = torch.baddbmm(_head_biases(params[a + "b_K"], params[a + "b_V"]), keys, W_KV)
        k, v = kv.view(members, batch, n_keys, 2, he).unbind(3)  # each (M, batch, key, he)
        q = torch.baddbmm(_head_biases(params[a + "b_Q"]), x[:, :, pos], _heads_to_columns(params[a + "W_Q"]))  # (M, batch, he)
        scores = _scores(q, k, heads)
        resid_at = resid[:, :, pos]

    # the read position's query attends over its keys
    if key_padding is not None:
        scores = scores.masked_fill(key_padding[:, :, :n_keys, None], float("-inf"))
    pattern = scores.softmax(dim=2)  # (M, batch, key, head)
    z = (pattern[..., None] * v.view(members, batch, n_keys, heads, d_head)).sum(2).reshape(members, batch, he)
    W_O = params[a + "W_O"].reshape(members, he, d_model)
    resid_at = resid_at + torch.baddbmm(params[a + "b_O"][:, None], z, W_O)  # (M, batch, d_model)
    if not cfg.attn_only:
        x = _layer_norm(resid_at, params, f"blocks.{last}.ln2") if cfg.normalization == "LN" else resid_at
        resid_at = resid_at + _mlp(params, f"blocks.{last}.mlp.", act_fn, x)
    x = _layer_norm(resid_at, params, "ln_final") if cfg.normalization == "LN" else resid_at
    return torch.baddbmm(params["b_U"][:, None], x, params["W_U"])  # (M, batch, d_vocab_out)


def _scores(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """q (M, batch, he), k (M, batch, key, he) -> q·k / sqrt(d_head) per head (M, batch, key, head)."""
    members, batch, n_keys, he = k.shape
    d_head = he // heads
    q = q.view(members, batch, 1, heads, d_head)
    return (k.view(members, batch, n_keys, heads, d_head) * q).sum(-1) / math.sqrt(d_head)


def _attention_inputs_from_tables(params: dict, cfg: ModelConfig, indices: _Indices, pos: int, n_keys: int):
    """One layer without LayerNorm: the attention's input at key position i holding token t is
    W_E[t] + W_pos[i], so Q, K and V are rows of tables with one row per (position, token), and
    each input row only looks its rows up (as `lab.models.transformer._qkv_at_from_tokens` does, with
    the positional part folded into the table). When the tables are small next to the batch
    (the modular tasks), the attention scores are tabulated too: for every (query token, key
    position, key token) one dot product per head, so no per-row q·k is computed at all.

    Returns scores (M, batch, key, head), values (M, batch, key, he), and the residual at the read
    position (M, batch, d_model)."""
    a = "blocks.0.attn."
    tokens = indices.tokens
    members, batch, _ = tokens.shape
    heads, d_head = cfg.n_heads, cfg.d_head
    he = heads * d_head
    W_E, W_pos = params["W_E"], params.get("W_pos")
    vocab = W_E.shape[1]
    # table rows: (key position, token) with learned positions, just the token without
    if W_pos is not None:
        inputs = (W_E[:, None] + W_pos[:, :n_keys, None]).flatten(1, 2)  # (M, key * vocab, d_model)
        query_rows = slice(pos * vocab, (pos + 1) * vocab)
    else:
        inputs, query_rows = W_E, slice(0, vocab)

    def key_rows() -> torch.Tensor:  # (M, batch, key): the table row of each key
        keys = tokens[:, :, :n_keys]
        return keys + torch.arange(n_keys, device=tokens.device) * vocab if W_pos is not None else keys

    def read() -> torch.Tensor:  # (M, batch): the token at the read position
        return tokens[:, :, pos]
    W_QKV = _heads_to_columns(params[a + "W_Q"], params[a + "W_K"], params[a + "W_V"])  # (M, d_model, 3 he)
    b_QKV = _head_biases(params[a + "b_Q"], params[a + "b_K"], params[a + "b_V"])
    table = torch.baddbmm(b_QKV, inputs, W_QKV)  # (M, rows, 3 he)
    q_table = table[:, query_rows, :he]  # (M, vocab, he): the query of each token at the read position
    rows = table.shape[1]
    if vocab * rows * heads <= batch * n_keys * he:
        # scores[m, t, r, h] = q(t)·k(r) / sqrt(d_head) for every query token t and key row r
        q = q_table.reshape(members, vocab, heads, d_head)
        k = table[:, :, he : 2 * he].reshape(members, rows, heads, d_head)
        score_table = torch.einsum("mthe,mrhe->mtrh", q, k) / math.sqrt(d_head)  # (M, vocab, rows, head)
        scores = _lookup(score_table.reshape(members, vocab * rows, heads), indices, "scores",
                         lambda: indices.get("read", read)[..., None] * rows + indices.get("key_rows", key_rows))
    else:
        k = _lookup(table[:, :, he : 2 * he], indices, "key_rows", key_rows)  # (M, batch, key, he)
        scores = _scores(_lookup(q_table, indices, "read", read), k, heads)
    v = _lookup(table[:, :, 2 * he :], indices, "key_rows", key_rows)  # (M, batch, key, he)
    resid_at = _lookup(inputs[:, query_rows], indices, "read", read)  # (M, batch, d_model)
    return scores, v, resid_at


def _row_losses(logits: torch.Tensor, labels: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """Per-row cross-entropy (M, batch) of logits (M, batch, vocab), as `lab.training.losses.task_loss` computes it before its mean."""
    logits = logits.to(dtype)
    if kind == "softmax":
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
    return -log_stablemax(logits).gather(-1, labels[..., None])[..., 0]


# --- data: each member's split as rows of a shared table ----------------------------------------------


@dataclass
class _Rows:
    """Every member's rows of one split (train or test), as indices into one table of distinct rows.

    Members with the same task config share their rows in the table. index (M, n_max) is padded
    with the member's first row and `count` says how many are real."""

    tokens: torch.Tensor  # (table rows, pos)
    labels: torch.Tensor  # (table rows,)
    index: torch.Tensor  # (M, n_max) into the table
    count: torch.Tensor  # (M,) real rows per member

    @classmethod
    def build(cls, splits: list[Split], pad_token: int | None, device: torch.device) -> _Rows:
        width = max(split.tokens.shape[1] for split in splits)
        distinct: dict[int, int] = {}  # id(split) -> offset in the table
        parts: list[Split] = []
        offset = 0
        for split in splits:
            if id(split) not in distinct:
                distinct[id(split)] = offset
                parts.append(split)
                offset += len(split)
        tokens = torch.cat([_widen(split.tokens, width, pad_token) for split in parts])
        labels = torch.cat([split.labels for split in parts])
        n_max = max(len(split) for split in splits)
        index = torch.zeros(len(splits), n_max, dtype=torch.long)
        for m, split in enumerate(splits):
            start = distinct[id(split)]
            index[m] = start  # padding rows repeat the member's first row (finite loss, weight 0)
            index[m, : len(split)] = torch.arange(start, start + len(split))
        count = torch.tensor([len(split) for split in splits])
        return cls(tokens.to(device), labels.to(device), index.to(device), count.to(device))

    def keep(self, slots: torch.Tensor) -> _Rows:
        index, count = self.index[slots], self.count[slots]
        return _Rows(self.tokens, self.labels, index[:, : int(count.max())], count)


def _widen(tokens: torch.Tensor, width: int, pad_token: int | None) -> torch.Tensor:
    if tokens.shape[1] == width:
        return tokens
    return F.pad(tokens, (0, width - tokens.shape[1]), value=pad_token)


# --- the stacked state --------------------------------------------------------------------------------


@dataclass
class _Layout:
    """Where each parameter lives in a member's row of `flat`."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    offsets: list[int]
    size: int

    @classmethod
    def of(cls, model: Transformer) -> _Layout:
        names, shapes, offsets, size = [], [], [], 0
        for name, param in model.named_parameters():
            names.append(name)
            shapes.append(tuple(param.shape))
            offsets.append(size)
            size += param.numel()
        return cls(names, shapes, offsets, size)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """name -> (M, *shape) view of flat (M, size)."""
        members = flat.shape[0]
        return {
            name: flat[:, offset : offset + math.prod(shape)].view(members, *shape)
            for name, shape, offset in zip(self.names, self.shapes, self.offsets)
        }

    def row(self, flat_row: torch.Tensor) -> dict[str, torch.Tensor]:
        """name -> a copy of one member's tensor, from its row (size,)."""
        return {
            name: flat_row[offset : offset + math.prod(shape)].view(shape).clone()
            for name, shape, offset in zip(self.names, self.shapes, self.offsets)
        }

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        missing = [name for name in self.names if name not in tensors]
        if missing:
            raise RunError(f"resume state lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        return torch.cat([tensors[name].reshape(-1).float() for name in self.names])


class StackedEnsemble:
    """The tensors of an ensemble and its update; no files (`train_ensemble` adds the run folders).

    `StackedEnsemble(configs)` starts every member from `Transformer(config.model)`; `states` (one
    `ResumeState` or None per member) continues members from their resume states. `update()` is one
    optimiser step of every member; `evaluate()` gives each member's train and test (loss, accuracy).
    """

    def __init__(self, configs: Sequence[ExperimentConfig], states: Sequence[ResumeState | None] | None = None,
                 tasks: Sequence[Task] | None = None):
        configs = [config.resolve() for config in configs]
        if not configs:
            raise ConfigError("an ensemble needs at least one member")
        keys = {shape_key(config) for config in configs}
        if len(keys) > 1:
            raise ConfigError(f"ensemble members differ in model shape, task or device ({len(keys)} kinds); split them with group_by_shape")
        for config in configs:
            if not vectorisable(config):
                raise ConfigError(f"{config.name}: model.arch = {config.model.arch!r} with train.grad_filter.kind = "
                                  f"{config.train.grad_filter.kind!r} is not vectorised; train it with lab.training.trainer.Trainer")
        states = list(states) if states is not None else [None] * len(configs)
        tasks = list(tasks) if tasks is not None else _make_tasks(configs)
        # Members that train on the same number of rows per step sit side by side, so the step can run
        # them in buckets of equal batch width instead of padding every member to the widest.
        rows_per_step = [_rows_per_step(c.train.batch_size, len(t.split("train"))) for c, t in zip(configs, tasks)]
        self.order = sorted(range(len(configs)), key=lambda m: rows_per_step[m])  # stack position -> given position
        configs, states, tasks = ([xs[m] for m in self.order] for xs in (configs, states, tasks))
        self.configs = configs
        self.cfg = configs[0].model
        self.device = resolve_device(configs[0].train.device)
        self.tasks = tasks
        self.read_position = self.tasks[0].read_position
        # a batched forward's largest activation stays within this many floats: a CPU's caches; a GPU wants it all
        self.bucket_floats = _CPU_BUCKET_FLOATS if self.device.type == "cpu" else 1 << 40

        # weights: the real Transformer builds each member's init from its seed, so it equals standalone's
        template = Transformer(configs[0].model)
        self.layout = _Layout.of(template)
        rows = []
        for m, (config, state) in enumerate(zip(configs, states)):
            if state is not None:
                rows.append(self.layout.flatten(state.model))
            else:
                model = template if m == 0 else Transformer(config.model)
                rows.append(self.layout.flatten(dict(model.named_parameters())).detach())
        self.flat = torch.stack(rows).to(self.device)  # (M, P)
        self.exp_avg = torch.zeros_like(self.flat)
        self.exp_avg_sq = torch.zeros_like(self.flat)
        self.ema = None  # Grokfast EMA (M, P), only if a member uses it
        self.ema_started = np.zeros(len(configs), dtype=bool)
        self.adam_steps = np.zeros(len(configs), dtype=np.int64)  # AdamW's own count, for bias correction
        self.steps = np.array([state.step if state is not None else 0 for state in states], dtype=np.int64)
        if any(c.train.grad_filter.kind == "ema" for c in configs):
            self.ema = torch.zeros_like(self.flat)
        for m, state in enumerate(states):
            if state is not None:
                self._load_optimizer_state(m, state)

        # per-member hyperparameters (float64, as PyTorch computes AdamW's scalars)
        tcs = [c.train for c in configs]
        self.lr = np.array([tc.lr for tc in tcs])
        self.weight_decay = np.array([tc.weight_decay for tc in tcs])
        self.beta1 = np.array([tc.betas[0] for tc in tcs])
        self.beta2 = np.array([tc.betas[1] for tc in tcs])
        self.eps = np.full(len(tcs), 1e-8)  # torch.optim.AdamW's default, which the Trainer uses
        self.warmup = np.array([tc.warmup_steps for tc in tcs])
        self.ema_alpha = np.array([tc.grad_filter.alpha if tc.grad_filter.kind == "ema" else 0.0 for tc in tcs])
        self.ema_lamb = np.array([tc.grad_filter.lamb if tc.grad_filter.kind == "ema" else 0.0 for tc in tcs])
        self.orthograd = np.array([tc.orthograd for tc in tcs])
        self.seeds = [c.model.seed for c in configs]
        self.batch_sizes = [tc.batch_size for tc in tcs]
        self.loss_kinds = [(tc.loss, torch.float64 if tc.loss_dtype == "float64" else torch.float32) for tc in tcs]

        pad = self.cfg.pad_token_id
        widths = {t.split(s).tokens.shape[1] for t in self.tasks for s in ("train", "test")}
        if len({t.split("train").tokens.shape[1] for t in self.tasks}) > 1 and (pad is None or self.read_position < 0):
            raise ConfigError(f"members' inputs differ in length ({sorted(widths)}) and task {self.tasks[0].name!r} cannot pad them")
        self.train_rows = _Rows.build([t.split("train") for t in self.tasks], pad, self.device)
        self.test_rows = _Rows.build([t.split("test") for t in self.tasks], pad, self.device)
        self._restack()

    # --- members in, members out ---

    @property
    def members(self) -> int:
        return self.flat.shape[0]

    def _load_optimizer_state(self, m: int, state: ResumeState) -> None:
        if state.optimizer:
            fields = {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}
            for key, target in fields.items():
                target[m] = self.layout.flatten({name: f[key] for name, f in state.optimizer.items()}).to(self.device)
            self.adam_steps[m] = int(next(iter(state.optimizer.values()))["step"])
        ema = {key[4:]: t for key, t in state.grad_filter.items() if key.startswith("ema.")}
        if ema and self.ema is not None:
            self.ema[m] = self.layout.flatten(ema).to(self.device)
            self.ema_started[m] = True

    def keep(self, slots: Sequence[int]) -> None:
        """Keep only these members (by their current position), in this order: re-stack every tensor."""
        index = torch.tensor(list(slots), dtype=torch.long, device=self.device)
        keep = np.asarray(list(slots), dtype=np.int64)
        self.flat = self.flat[index]
        self.exp_avg, self.exp_avg_sq = self.exp_avg[index], self.exp_avg_sq[index]
        if self.ema is not None:
            self.ema = self.ema[index]
        for name in ("ema_started", "adam_steps", "steps", "lr", "weight_decay", "beta1", "beta2", "eps", "warmup",
                     "ema_alpha", "ema_lamb", "orthograd"):
            setattr(self, name, getattr(self, name)[keep])
        for name in ("configs", "tasks", "seeds", "batch_sizes", "loss_kinds", "order"):
            setattr(self, name, [getattr(self, name)[i] for i in keep])
        self.train_rows, self.test_rows = self.train_rows.keep(index), self.test_rows.keep(index)
        self._restack()

    def _restack(self) -> None:
        """Rebuild the buckets, their leaf views and the per-member constants after the member axis changed."""
        self.flat_grad = torch.zeros_like(self.flat)
        widths = [_rows_per_step(size, n) for size, n in zip(self.batch_sizes, self.train_rows.count.tolist())]
        cfg = self.cfg
        row_floats = max(cfg.d_mlp, cfg.d_model, 3 * cfg.n_heads * cfg.d_head)  # the widest activation per input row
        self.buckets = _buckets(widths, row_floats, self.bucket_floats)
        self.bucket_params = []
        for start, end in self.buckets:
            views = self.layout.views(self.flat[start:end])
            for view, grad in zip(views.values(), self.layout.views(self.flat_grad[start:end]).values()):
                view.requires_grad_(True)
                view.grad = grad  # autograd adds into it in place: the gradients land in flat_grad
            self.bucket_params.append(views)
        self.loss_groups = []  # per bucket: [((kind, dtype), member positions within the bucket or None for all)]
        for start, end in self.buckets:
            groups: dict[tuple, list[int]] = {}
            for m in range(start, end):
                groups.setdefault(self.loss_kinds[m], []).append(m - start)
            self.loss_groups.append([(kind, None if len(ms) == end - start else torch.tensor(ms, device=self.device))
                                     for kind, ms in groups.items()])
        self._full_batch_cache = None
        # per member: its row of each flat buffer and its AdamW step count (0-d), as the fused kernel takes them
        self._adam_counts = torch.zeros(self.members, dtype=torch.float32, device=self.device)
        self._adam_rows = [list(t.unbind(0)) for t in (self.flat, self.flat_grad, self.exp_avg, self.exp_avg_sq, self._adam_counts)]

    # --- one update of every member ---

    def lr_now(self) -> np.ndarray:
        """Linear warm-up as in Nanda et al. (and `Trainer.lr_at`): lr * min(step / warmup_steps, 1)."""
        warm = np.where(self.warmup > 0, np.minimum(self.steps / np.maximum(self.warmup, 1), 1.0), 1.0)
        return self.lr * warm

    def batch(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, _Indices]]:
        """This step's training rows, per bucket: tokens (members, B, pos), labels (members, B), row weights
        (members, B): 1 / batch size on real rows, 0 on padding, so that a member's loss is its batch mean;
        and the tokens' `_Indices`."""
        rows = self.train_rows
        counts = rows.count.tolist()
        full = [size is None or size >= n for size, n in zip(self.batch_sizes, counts)]
        if all(full) and self._full_batch_cache is not None:
            return self._full_batch_cache
        picks, perms = [], {}
        for m, n in enumerate(counts):
            if full[m]:
                picks.append(rows.index[m, :n])
                continue
            # the Trainer's mini-batch: a randperm seeded by (model seed, step); members that share both share it
            key = (self.seeds[m], int(self.steps[m]), n)
            if key not in perms:
                generator = torch.Generator().manual_seed(self.seeds[m] * 1_000_003 + int(self.steps[m]))
                perms[key] = torch.randperm(n, generator=generator).to(self.device)
            picks.append(rows.index[m, perms[key][: self.batch_sizes[m]]])
        batches = []
        for start, end in self.buckets:
            bucket = picks[start:end]
            width = max(len(p) for p in bucket)
            index = torch.stack([F.pad(p, (0, width - len(p)), value=int(p[0])) for p in bucket])  # (members, B)
            count = torch.tensor([len(p) for p in bucket], device=self.device)
            real = torch.arange(width, device=self.device)[None] < count[:, None]  # (members, B)
            tokens = rows.tokens[index]
            batches.append((tokens, rows.labels[index], real / count[:, None], _Indices(tokens)))
        if all(full):
            self._full_batch_cache = batches
        return batches

    def update(self) -> None:
        """One optimiser step of every member: forward, backward, ⊥Grad, Grokfast EMA, AdamW."""
        self.flat_grad.zero_()
        loss = 0.0
        for params, groups, (tokens, labels, weights, indices) in zip(self.bucket_params, self.loss_groups, self.batch()):
            logits = stacked_forward_at(params, self.cfg, tokens, self.read_position, indices)  # (members, B, vocab)
            for (kind, dtype), slots in groups:
                if slots is None:
                    loss = loss + (_row_losses(logits, labels, kind, dtype) * weights.to(dtype)).sum()
                else:
                    loss = loss + (_row_losses(logits[slots], labels[slots], kind, dtype) * weights[slots].to(dtype)).sum()
        with warnings.catch_warnings():
            # The weights are views into rows of `flat` and their .grad views into rows of `flat_grad`, so
            # autograd adds the gradients in place into one buffer that AdamW then reads; PyTorch warns
            # that such strided gradients "may impair performance", a trade made on purpose.
            warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")
            loss.backward()  # the sum of the members' mean losses: each member's gradient is its own
        with torch.no_grad():
            if self.orthograd.any():
                self._orthogonalize()
            if self.ema is not None:
                self._ema_filter()
            self._adamw()
        self.steps += 1

    def _columns(self, *values: np.ndarray) -> list[torch.Tensor]:
        """Per-member float64 scalars -> float32 (M, 1) columns (as PyTorch casts AdamW's scalars to the parameter dtype)."""
        table = torch.from_numpy(np.stack(values, axis=1)).to(self.device, torch.float32)
        return list(table.T[..., None])

    def _adamw(self) -> None:
        """AdamW with each member's own hyperparameters: PyTorch's fused AdamW kernel (the one the Trainer's
        `torch.optim.AdamW(fused=True)` runs), called once per group of members that share (lr now, weight
        decay, betas, eps), on the members' rows of the flat buffers; the bias corrections come from each
        member's own step count. Same kernel, same order of operations: the update equals the Trainer's
        bit for bit, given the same gradient."""
        self.adam_steps += 1
        self._adam_counts.copy_(torch.from_numpy(self.adam_steps.astype(np.float32)))
        lr = self.lr_now()
        groups: dict[tuple, list[int]] = {}
        for m, key in enumerate(zip(lr.tolist(), self.weight_decay.tolist(), self.beta1.tolist(), self.beta2.tolist(), self.eps.tolist())):
            groups.setdefault(key, []).append(m)
        rows = self._adam_rows
        for (lr_m, weight_decay, beta1, beta2, eps), ms in groups.items():
            params, grads, exp_avgs, exp_avg_sqs, counts = ([rows[i][m] for m in ms] for i in range(5))
            torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], counts, lr=lr_m, beta1=beta1, beta2=beta2,
                                weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)

    def _ema_filter(self) -> None:
        """Grokfast EMA (lab.training.recipes.GradFilter) per member: mu <- alpha mu + (1 - alpha) g (mu starts at g); g += lamb mu.
        Members without the filter have lamb = 0."""
        g, mu = self.flat_grad, self.ema
        alpha, one_minus, lamb = self._columns(self.ema_alpha, 1 - self.ema_alpha, self.ema_lamb)
        started = torch.from_numpy(self.ema_started).to(self.device)[:, None]
        mu.copy_(torch.where(started, mu * alpha + g * one_minus, g))
        g.add_(mu * lamb)
        self.ema_started[:] = True

    def _orthogonalize(self) -> None:
        """⊥Grad (lab.training.recipes.orthogonalize_gradients) per member and parameter: g <- (g - (g.w / w.w) w) |g| / |g_perp|."""
        on = torch.from_numpy(self.orthograd).to(self.device)
        members = self.members
        for w, g in zip(self.layout.views(self.flat).values(), self.layout.views(self.flat_grad).values()):
            w_flat, g_flat = w.reshape(members, -1).double(), g.reshape(members, -1).double()
            w_sq = (w_flat * w_flat).sum(1)
            g_perp = g_flat - ((g_flat * w_flat).sum(1) / w_sq)[:, None] * w_flat
            perp_norm = g_perp.norm(dim=1)
            new = g_perp * (g_flat.norm(dim=1) / perp_norm)[:, None]
            use = on & (w_sq != 0) & (perp_norm != 0)
            g.copy_(torch.where(use[:, None], new, g_flat).view_as(g).to(g.dtype))

    # --- evaluation ---

    @torch.no_grad()
    def evaluate(self, slots: Sequence[int] | None = None) -> list[dict]:
        """Train and test (loss, accuracy) and weight norm of these members (all by default), as the Trainer reports them."""
        slots = list(range(self.members)) if slots is None else list(slots)
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        params = self.layout.views(self.flat if len(slots) == self.members else self.flat[index])
        kinds = [self.loss_kinds[m] for m in slots]
        results = [{} for _ in slots]
        for split, rows in (("train", self.train_rows), ("test", self.test_rows)):
            losses, correct = self._evaluate_rows(params, rows.keep(index), kinds)
            count = rows.count[index].double()
            for r, loss, right, n in zip(results, (losses / count).tolist(), (correct / count).tolist(), count.tolist()):
                r[f"{split}_loss"], r[f"{split}_acc"] = loss, right
        norms = self.flat[index].double().pow(2).sum(1).sqrt().tolist()
        for r, norm in zip(results, norms):
            r["weight_norm"] = norm
        return results

    def _evaluate_rows(self, params: dict, rows: _Rows, kinds: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed loss (float64) and number right per member over its rows, in chunks."""
        members, n_max = rows.index.shape
        cfg = self.cfg
        n_pos = rows.tokens.shape[1]
        widest = max(cfg.d_mlp, 3 * cfg.n_heads * cfg.d_head * n_pos, cfg.n_heads * n_pos * n_pos * max(cfg.n_layers - 1, 1),
                     cfg.d_vocab_out, cfg.d_model * n_pos)
        chunk = max(1, _EVAL_FLOATS // (members * widest))
        loss_sum = torch.zeros(members, dtype=torch.float64, device=self.device)
        correct = torch.zeros(members, dtype=torch.long, device=self.device)
        groups: dict[tuple, list[int]] = {}
        for m, kind in enumerate(kinds):
            groups.setdefault(kind, []).append(m)
        for start in range(0, n_max, chunk):
            index = rows.index[:, start : start + chunk]
            real = (torch.arange(start, start + index.shape[1], device=self.device)[None] < rows.count[:, None])
            tokens, labels = rows.tokens[index], rows.labels[index]
            logits = stacked_forward_at(params, cfg, tokens, self.read_position)
            correct += ((logits.argmax(-1) == labels) & real).sum(1)
            for (kind, dtype), ms in groups.items():
                sel = torch.tensor(ms, device=self.device)
                row_loss = _row_losses(logits[sel], labels[sel], kind, dtype).double()
                loss_sum[sel] += (row_loss * real[sel]).sum(1)
        return loss_sum, correct

    # --- one member's state, for its run folder ---

    def weights(self, m: int) -> dict[str, torch.Tensor]:
        return self.layout.row(self.flat[m].detach().cpu())

    def resume_state(self, m: int, elapsed_s: float) -> ResumeState:
        """Member m's state in the Trainer's resume layout: its AdamW state per parameter, its EMA if it has one."""
        moments = {key: self.layout.row(t[m].cpu()) for key, t in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq))}
        optimizer = {}
        if self.adam_steps[m] > 0:  # a fresh torch AdamW has no state before its first step
            optimizer = {name: {"step": torch.tensor(float(self.adam_steps[m])), "exp_avg": moments["exp_avg"][name],
                                "exp_avg_sq": moments["exp_avg_sq"][name]} for name in self.layout.names}
        grad_filter = {}
        if self.ema is not None and self.ema_started[m] and self.configs[m].train.grad_filter.kind == "ema":
            grad_filter = {f"ema.{name}": t for name, t in self.layout.row(self.ema[m].cpu()).items()}
        return ResumeState(int(self.steps[m]), elapsed_s, self.weights(m), optimizer, grad_filter)


def _rows_per_step(batch_size: int | None, n_train: int) -> int:
    return n_train if batch_size is None else min(batch_size, n_train)


def _buckets(widths: list[int], row_floats: int, budget: int, slack: float = 1.15) -> list[tuple[int, int]]:
    """Consecutive runs (start, end) of members, sorted by batch width, that run as one batched forward.

    A run pads to its widest member, so it holds only widths within `slack` of its first (fewer
    padded rows), and its largest activation (members x width x row_floats) stays within `budget`
    floats: past the caches, stacking more members buys no speed, only memory traffic."""
    buckets, start = [], 0
    for m in range(1, len(widths) + 1):
        full = (m - start + 1) * widths[m - 1 if m == len(widths) else m] * row_floats > budget
        if m == len(widths) or widths[m] > slack * widths[start] or full:
            buckets.append((start, m))
            start = m
    return buckets


def _make_tasks(configs: Sequence[ExperimentConfig]) -> list[Task]:
    """One Task per distinct task config: members that share it share its splits (and the table rows)."""
    cache: dict[str, Task] = {}
    tasks = []
    for config in configs:
        key = config.task.model_dump_json()
        if key not in cache:
            cache[key] = make_task(config.task)
        tasks.append(cache[key])
    return tasks


# --- run folders ------------------------------------------------------------------------------------


@dataclass
class _RunFolder:
    """One member's run folder and bookkeeping: what a `Trainer` keeps in its attributes."""

    config: ExperimentConfig
    run_dir: Path
    task: Task
    state: ResumeState | None = None  # where it starts from (None: fresh)
    rows: list[dict] = field(default_factory=list)
    step: int = 0
    elapsed_before: float = 0.0  # wall time of earlier sessions of a resumed run
    started_at: float = 0.0
    diverged_at: int | None = None
    schedule: set[int] = field(default_factory=set)

    def __post_init__(self):
        tc = self.config.train
        self.schedule = checkpoint_schedule(tc.steps, tc.checkpoint_every, tc.log_checkpoints)

    def lr_at(self, step: int) -> float:
        return warmup_lr(self.config.train, step)

    def due_eval(self) -> bool:
        tc = self.config.train
        due = self.step % tc.eval_every == 0 or self.step == tc.steps
        return due and not (self.rows and self.rows[-1]["step"] == self.step)

    def next_event(self) -> int:
        """The next step (after this one) at which something is written: a row, a checkpoint, the end."""
        tc = self.config.train
        later = [s for s in self.schedule if s > self.step]
        return min([(self.step // tc.eval_every + 1) * tc.eval_every, tc.steps, *later])

    def stop_after_grok_reached(self) -> bool:
        return stop_after_grok_reached(self.config.train, self.rows, self.step)

    def append_row(self, metrics: dict, elapsed: float) -> dict:
        """The Trainer's metrics row (`Trainer.evaluate_row`), appended to metrics.jsonl."""
        row = {"step": self.step, "train_loss": metrics["train_loss"], "train_acc": metrics["train_acc"],
               "test_loss": metrics["test_loss"], "test_acc": metrics["test_acc"], "weight_norm": metrics["weight_norm"],
               "lr": self.lr_at(self.step), "elapsed_s": round(self.elapsed_before + elapsed, 3)}
        self.rows.append(row)
        storage.append_jsonl(self.run_dir / "metrics.jsonl", row)
        return row

    def elapsed(self) -> float:
        return self.rows[-1]["elapsed_s"] if self.rows else self.elapsed_before

    def summary(self, status: str, device: torch.device, n_params: int) -> dict:
        """summary.json's contents, as a `Trainer` writes them."""
        return run_summary(self.run_dir, self.config, status, self.step, self.rows, device, n_params,
                           self.diverged_at, self.started_at)


_DONE = ("finished", "diverged")  # a member in one of these states is not trained again


def _check_state_fits(state: ResumeState, shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    """A resume state whose tensors do not fit the config's model is one RunError (as in `Trainer.load_resume_state`)."""
    tensors = [(f"model/{name}", t) for name, t in state.model.items()]
    tensors += [(f"optimizer/{name}/{key}", t) for name, fields in state.optimizer.items() for key, t in fields.items() if t.ndim]
    tensors += [(f"grad_filter/{key}", t) for key, t in state.grad_filter.items() if key.startswith("ema.")]
    for key, tensor in tensors:
        name = key.split("/")[1] if not key.startswith("grad_filter/") else key[len("grad_filter/ema."):]
        if name not in shapes or tuple(tensor.shape) != shapes[name]:
            want = f"a weight of shape {list(shapes[name])}" if name in shapes else "no such weight"
            raise RunError(f"{path}: does not fit this run's config.json ({key} has shape {list(tensor.shape)}; the model has {want})")
    missing = sorted(set(shapes) - set(state.model))
    if missing:
        raise RunError(f"{path}: does not fit this run's config.json (no model/{missing[0]})")


def _open_member(config: ExperimentConfig, run_dir: Path, task: Task, shapes: dict[str, tuple[int, ...]]) -> tuple[_RunFolder, dict | None]:
    """A member's folder: fresh, continued from its resume state, or already done (then its summary).
    The caller holds the folder's writer lock; `shapes` are the model's parameter shapes."""
    folder = _RunFolder(config, run_dir, task)
    saved_config = run_dir / "config.json"
    if saved_config.is_file():
        if not is_config_of(storage.read_json(saved_config), config):
            raise RunError(f"{run_dir} holds a run of a different config; give this member another folder")
        summary = _read_summary(run_dir)
        if summary.get("status") in _DONE:
            return folder, summary
        if (run_dir / storage.RESUME_FILE).is_file():
            # continue as `Trainer.load_resume_state` does: keep exactly the rows up to the checkpoint
            state = storage.load_resume_state(run_dir)
            _check_state_fits(state, shapes, run_dir / storage.RESUME_FILE)
            folder.state, folder.step, folder.elapsed_before = state, state.step, state.elapsed_s
            try:
                folder.started_at = float(summary.get("started_at") or time.time())
            except (TypeError, ValueError):
                folder.started_at = time.time()
            folder.rows = [row for row in storage.read_metrics(run_dir / "metrics.jsonl") if row["step"] <= state.step]
            storage.write_jsonl(run_dir / "metrics.jsonl", folder.rows)
            if folder.rows and folder.rows[-1]["step"] == state.step:
                folder.elapsed_before = folder.rows[-1]["elapsed_s"]
            return folder, None
    # fresh: nothing of this run yet (or it was killed before its first checkpoint)
    storage.atomic_write_json(saved_config, json.loads(config.model_dump_json()))
    storage.write_jsonl(run_dir / "metrics.jsonl", [])
    folder.started_at = time.time()
    return folder, None


def _read_summary(run_dir: Path) -> dict:
    try:
        return storage.read_json(Path(run_dir) / "summary.json")
    except RunError:  # missing or damaged: the run is rebuilt from its resume state
        return {}


def train_ensemble(members: Sequence[Member], progress: bool = True, stop: Callable[[], bool] | None = None) -> list[dict]:
    """Train every (config, run folder) member; same-shape members together, as stacked ensembles.

    Each folder becomes (or continues as) an ordinary run folder, exactly as `lab train` writes it.
    A folder that already holds a finished (or diverged) run of the same config is left alone; one
    holding an unfinished run continues from its resume state (as `lab train --resume` would); a
    folder holding another config is a RunError. Every member's writer lock is held while it trains.
    `stop`, if given, is asked between steps: when it returns True, or on Ctrl-C / SIGTERM, every
    running member is checkpointed and marked "interrupted", and no later group starts.

    Groups (see `group_by_shape`) train one after another; members the ensemble cannot vectorise
    (`vectorisable`) train with the standalone Trainer. Returns the members' summaries (the
    contents of their summary.json), in the order given.
    """
    members = [(config.resolve(), Path(run_dir)) for config, run_dir in members]
    dirs = [os.path.realpath(run_dir) for _, run_dir in members]
    if len(set(dirs)) != len(dirs):
        twice = next(d for d in dirs if dirs.count(d) > 1)
        raise RunError(f"two ensemble members share the run folder {twice}; give each member its own")
    summaries: list[dict | None] = [None] * len(members)
    stopped = False
    for group in group_by_shape([config for config, _ in members]):
        if stopped:  # stopped by the user: later groups do not start
            break
        with ExitStack() as locks:
            for i in group:
                members[i][1].mkdir(parents=True, exist_ok=True)
                locks.enter_context(storage.run_lock(members[i][1]))
            if not vectorisable(members[group[0]][0]):
                (i,) = group
                summaries[i], stopped = _train_standalone(*members[i], progress)
                continue
            tasks = _make_tasks([members[i][0] for i in group])
            shapes = {name: tuple(p.shape) for name, p in Transformer(members[group[0]][0].model).named_parameters()}
            folders, todo = [], []
            for i, task in zip(group, tasks):
                folder, done = _open_member(*members[i], task, shapes)
                if done is not None:
                    summaries[i] = done
                else:
                    folders.append(folder)
                    todo.append(i)
            if todo:
                results, stopped = _EnsembleRun(folders, progress, stop).run()
                for i, summary in zip(todo, results):
                    summaries[i] = summary
    return [s if s is not None else _read_summary(run_dir) or {"name": run_dir.name, "status": "not started"}
            for s, (_, run_dir) in zip(summaries, members)]


def _train_standalone(config: ExperimentConfig, run_dir: Path, progress: bool) -> tuple[dict, bool]:
    """The Trainer, for a member the ensemble cannot vectorise; same folder rules as an ensemble member."""
    resume = False
    if (run_dir / "config.json").is_file():
        if not is_config_of(storage.read_json(run_dir / "config.json"), config):
            raise RunError(f"{run_dir} holds a run of a different config; give this member another folder")
        summary = _read_summary(run_dir)
        if summary.get("status") in _DONE:
            return summary, False
        resume = True
    summary = Trainer(config, run_dir, progress=progress).run(resume=resume)
    return summary, summary["status"] == "interrupted"


class _EnsembleRun:
    """`Trainer.run`'s loop for an ensemble: rows, checkpoints and summaries per member, one stacked update per step.

    A step at which members write files snapshots their tensors, then writes every member's files at
    once on a few threads (each file is fsync'ed; one after another, 64 members' checkpoints cost
    more than their training), and waits for all of them before the next update."""

    def __init__(self, folders: list[_RunFolder], progress: bool, stop: Callable[[], bool] | None):
        self.folders = folders
        self.progress = progress
        self.stop = stop
        self.stack = StackedEnsemble([f.config for f in folders], [f.state for f in folders], [f.task for f in folders])
        for f in folders:
            f.state = None  # the stack holds it now
        self.active = [folders[i] for i in self.stack.order]  # parallel to the stack's member axis
        self.n_params = self.stack.layout.size
        self.writes: dict[int, list[Callable[[], None]]] = {}  # member slot -> file writes, in order

    def summary(self, f: _RunFolder, status: str) -> dict:
        """The member's summary now; summary.json is written with the step's other files."""
        summary = f.summary(status, self.stack.device, self.n_params)
        self.writes.setdefault(id(f), []).append(lambda: storage.atomic_write_json(f.run_dir / "summary.json", summary))
        return summary

    def checkpoint(self, slot: int) -> None:
        """The member's weights at its step and its resume state (`Trainer.save_checkpoint`), snapshot now."""
        f = self.active[slot]
        state = self.stack.resume_state(slot, f.elapsed())
        path = storage.checkpoint_path(f.run_dir, f.step)
        meta = {"step": str(f.step)}
        self.writes.setdefault(id(f), []).append(lambda: storage.save_tensors(path, state.model, meta))
        self.writes.setdefault(id(f), []).append(lambda: storage.save_resume_state(f.run_dir, state))

    def flush(self, pool: ThreadPoolExecutor) -> None:
        """Write every member's pending files, members in parallel, each member's in order."""
        jobs, self.writes = list(self.writes.values()), {}
        for _ in pool.map(lambda writes: [write() for write in writes], jobs):
            pass

    def run(self) -> tuple[list[dict], bool]:
        """Train every member to its end; returns (summaries in the folders' order, whether a stop was requested)."""
        with ThreadPoolExecutor(max_workers=_WRITER_THREADS) as pool:
            try:
                result = self._run(pool)
            except BaseException:
                with suppress(Exception):  # the first error is the one to report
                    self.flush(pool)  # what the error left unwritten: checkpoints, summaries saying "failed"
                raise
            self.flush(pool)
            return result

    def _run(self, pool: ThreadPoolExecutor) -> tuple[list[dict], bool]:
        started = time.perf_counter()
        summaries: dict[int, dict] = {}
        for f in self.active:
            self.summary(f, "running")
        self.flush(pool)
        bar = progress_bar(max(f.config.train.steps - f.step for f in self.active), 0, self.progress)
        bar.set_description(f"{len(self.active)} members")
        stopped = False
        next_event = [f.step for f in self.active]  # every member has something to do at its first step
        try:
            with catch_stop_signals() as signals:
                while self.active:
                    ended = []  # slots of members that finished or diverged at this step
                    at_event = [slot for slot, f in enumerate(self.active) if f.step >= next_event[slot]]
                    if at_event:
                        elapsed = time.perf_counter() - started
                        due = [slot for slot in at_event if self.active[slot].due_eval()]
                        for slot, metrics in zip(due, self.stack.evaluate(due) if due else []):
                            row = self.active[slot].append_row(metrics, elapsed)
                            if not (math.isfinite(row["train_loss"]) and math.isfinite(row["test_loss"])):
                                # diverged (as in the Trainer): stop it before checkpointing NaN weights
                                f = self.active[slot]
                                f.diverged_at = f.step
                                summaries[id(f)] = self.summary(f, "diverged")
                                ended.append(slot)
                        for slot in at_event:
                            if slot in ended:
                                continue
                            f = self.active[slot]
                            tc = f.config.train
                            done = f.step >= tc.steps or f.stop_after_grok_reached()
                            if f.step in f.schedule or (done and f.step < tc.steps):
                                self.checkpoint(slot)
                                self.summary(f, "running")
                            if done:
                                summaries[id(f)] = self.summary(f, "finished")
                                ended.append(slot)
                            else:
                                next_event[slot] = f.next_event()
                    if signals.signal is not None or (self.stop is not None and self.stop()):
                        stopped = True
                        for slot, f in enumerate(self.active):
                            if slot not in ended:
                                self.checkpoint(slot)
                                summaries[id(f)] = self.summary(f, "interrupted")
                        break
                    self.flush(pool)
                    if ended:
                        keep = [slot for slot in range(len(self.active)) if slot not in ended]
                        self.active = [self.active[slot] for slot in keep]
                        next_event = [next_event[slot] for slot in keep]
                        if not self.active:
                            break
                        self.stack.keep(keep)  # re-stack without them: they cost nothing from now on
                        bar.set_description(f"{len(self.active)} members")
                    self.stack.update()
                    for f in self.active:
                        f.step += 1
                    bar.update(1)
        except BaseException as err:
            # a second Ctrl-C: every member's last checkpoint stands, and it resumes from there
            status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
            for f in self.active:
                if id(f) not in summaries:
                    summaries[id(f)] = self.summary(f, status)
            raise
        finally:
            bar.close()
        return [summaries[id(f)] for f in self.folders], stopped
