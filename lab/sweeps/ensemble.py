"""Train many same-shape models at once: one stacked ensemble, one forward and one backward per step.

A sweep (weight decay x training fraction x seed, ...) trains dozens of models whose weights have
the same shapes. Trained one after another, a small model's step is mostly overhead: Python,
kernel launches, matmuls too small to keep a core busy. Stacked on a leading member axis they
share every kernel:

    flat          (members, n_params)        every weight of a member in one row
    W_in          (members, d_model, d_mlp)  a view into `flat`, what the model's forward reads
    tokens        (members, batch, pos)      each member's own training rows (its own split)
    AdamW state   (members, n_params)        PyTorch's fused AdamW kernel on each member's row,
                                             with that member's lr, weight decay, betas and step

    summaries = train_ensemble([(config, run_dir), ...])      # the API `lab sweep` builds on
    groups = group_by_shape(configs)                          # which members can share a stack

The forward is the model's own: `torch.func.vmap` over `torch.func.functional_call` of the one
model (`build_model(config.model)`: the transformer's `forward_at`, the MLP's, CNN's or perceptron's
forward), so every architecture stacks and there is no second copy of any model's arithmetic.
vmap runs each operation once for all members (a matmul becomes one batched matmul).

Each member is its own `lab train`: the same initial weights (built from its seed), its own split
(train_frac, data_seed), its own mini-batches (`lab.training.batching.minibatch_index`), warm-up,
AdamW (the Trainer's fused kernel, called once per group of members that share hyperparameters,
with each member's own step count), loss kind and dtype, ⊥Grad and the Grokfast filters (the
Trainer's own functions, on each member's rows); and the run loop that writes its folder is the
Trainer's (`lab.training.trainer.train_members`): the same rows, checkpoints, resume state and
summary; `lab train --resume` continues a member, and a resumed ensemble equals the uninterrupted
one bit for bit.

How exact: the arithmetic is the standalone run's, operation for operation, but not always its
rounding: on a CPU, MKL's batched matmul rounds some shapes differently from the single matmul
(measured with torch 2.13 / MKL 2024.2: 49 of 486 (rows, inner, outer) shapes differ in the last bit,
mostly at 7 rows), and vmap computes `addmm` (matmul and bias in one kernel) as a batched matmul
and then the bias. So a member equals its `lab train` to ~1e-7 relative per step (tests/test_sweep_members.py),
as two machines would, not bit for bit; chaotic phases of training amplify that as they amplify any ulp.

How it is fast (see lab/bench/sweep.py for the measured speed-ups):
- members are sorted by rows per step (and loss), and run in buckets of equal batch width: no
  padded rows; on a CPU a bucket's widest activation stays within the caches (`_CPU_BUCKET_FLOATS`);
- gradients land in one (members, n_params) buffer (the weights are views into `flat`, their
  gradients views into `flat_grad`), read by one fused AdamW call per group of members that share
  hyperparameters; no Python loop over members inside a step, except to draw mini-batches and for
  the gradient recipes (⊥Grad, Grokfast), which run the Trainer's code member by member;
- a finished member is written out and dropped: the tensors are re-stacked without it, which
  costs about one of its steps (measured), where masking would keep paying for it every step.

Members whose models differ in shape train in separate groups (`group_by_shape`), one group after
another; Grokfast MA members, whose rings of `window` past gradients multiply memory by the member
count, are split into groups whose rings fit `_MA_RING_BYTES`.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from lab.config import ExperimentConfig, is_config_of
from lab.errors import ConfigError, RunError
from lab.models.architectures import build_model
from lab.runs import storage
from lab.runs.storage import ResumeState
from lab.tasks import Split, Task, make_task
from lab.training.allocator import keep_freed_memory
from lab.training.batching import batches, minibatch_index, rows_per_chunk, rows_per_step
from lab.training.losses import task_loss
from lab.training.recipes import GradFilter, orthogonalize_gradients
from lab.training.trainer import (
    RunFolder,
    evaluated_rows,
    loss_dtype,
    read_summary,
    resolve_device,
    score,
    train_members,
    warmup_lr,
    weight_norm,
)

# Model settings that change only the initial values of the weights, not their shapes or the forward pass.
_INIT_ONLY = ("seed", "init_scale")
# On a CPU, the members that run as one batched forward hold at most this many floats in their widest
# activation (8 MB): larger stacks stream from memory and gain nothing (measured on modadd_quick's model).
_CPU_BUCKET_FLOATS = 1 << 21
# One evaluation forward (members x chunk rows x the widest activation per row) stays under this many floats.
_EVAL_FLOATS = 1 << 25
# Grokfast MA members of one group hold at most this many bytes of gradient rings together.
_MA_RING_BYTES = 1 << 30

Member = tuple[ExperimentConfig, Path]


# --- grouping -------------------------------------------------------------------------------------


def shape_key(config: ExperimentConfig) -> tuple:
    """What members must share to train in one ensemble: the resolved model config except the
    settings that only change the initial values (seed), the task (its read position and tokens),
    and the device."""
    resolved = config.resolve()
    model = {k: v for k, v in resolved.model.model_dump().items() if k not in _INIT_ONLY}
    return (resolved.task.name, json.dumps(model, sort_keys=True), str(resolve_device(resolved.train.device)))


def group_by_shape(configs: Sequence[ExperimentConfig]) -> list[list[int]]:
    """Indices of `configs` grouped into ensembles of same-shape members, in order of first appearance.
    Grokfast MA members are split further, so that one group's gradient rings fit `_MA_RING_BYTES`."""
    groups: dict[tuple, list[int]] = {}
    ring_bytes: dict[tuple, int] = {}
    for index, config in enumerate(configs):
        key = shape_key(config)
        tc = config.train
        if tc.grad_filter.kind == "ma":
            ring = tc.grad_filter.window * _n_params(config) * 4
            part = 0
            while ring_bytes.get((*key, "ma", part), 0) + ring > _MA_RING_BYTES and (*key, "ma", part) in groups:
                part += 1
            key = (*key, "ma", part)
            ring_bytes[key] = ring_bytes.get(key, 0) + ring
        groups.setdefault(key, []).append(index)
    return list(groups.values())


def _n_params(config: ExperimentConfig) -> int:
    return sum(p.numel() for p in build_model(config.resolve().model).parameters())


# --- the stacked model ------------------------------------------------------------------------------


class _ReadPosition(nn.Module):
    """A model's logits at the task's read position, as `forward`: what `functional_call` calls."""

    def __init__(self, model: nn.Module, position: int):
        super().__init__()
        self.model = model
        self.position = position

    def forward(self, tokens: torch.Tensor, key_padding: torch.Tensor | None) -> torch.Tensor:
        return self.model.forward_at(tokens, self.position, key_padding)  # (batch, d_vocab_out)


class _Layout:
    """Where each parameter lives in a member's row of `flat`: `named_parameters` order."""

    def __init__(self, model: nn.Module):
        self.names = [name for name, _ in model.named_parameters()]
        self.shapes = [tuple(p.shape) for _, p in model.named_parameters()]
        self.offsets = np.cumsum([0] + [math.prod(s) for s in self.shapes]).tolist()
        self.size = self.offsets[-1]

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """(M, size) -> per parameter an (M, *shape) view; (size,) -> per parameter a (*shape) view."""
        lead = flat.shape[:-1]
        return [flat[..., a:b].view(*lead, *shape) for a, b, shape in zip(self.offsets, self.offsets[1:], self.shapes)]

    def row(self, flat_row: torch.Tensor) -> dict[str, torch.Tensor]:
        """name -> a CPU copy of one member's tensor, from its row (size,)."""
        return {name: view.detach().cpu().clone() for name, view in zip(self.names, self.views(flat_row))}

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[name].detach().reshape(-1).float().cpu() for name in self.names])


def _leaf_views(flat: torch.Tensor, grad: torch.Tensor, layout: _Layout) -> list[torch.Tensor]:
    """Views of `flat` as trainable leaves whose .grad are the same views of `grad`: autograd adds the
    gradients in place into the one buffer that AdamW then reads."""
    views = layout.views(flat)
    for view, g in zip(views, layout.views(grad)):
        view.requires_grad_(True)
        view.grad = g
    return views


def _bucket_key(config: ExperimentConfig, task: Task) -> tuple:
    """Members that can share one batched forward and loss: rows per step, input width, loss kind and dtype."""
    train = task.split("train")
    return (rows_per_step(config.train.batch_size, len(train)), train.tokens.shape[1], config.train.loss, config.train.loss_dtype)


def _widest(config: ExperimentConfig) -> int:
    """The widest activation at one position of one input row, in floats, for any architecture."""
    m = config.model
    return max(m.d_model, 3 * m.n_heads * m.d_head, m.d_mlp, getattr(m, "mlp_width", 0) or 0, getattr(m, "cnn_channels", 0) or 0)


def _row_floats(config: ExperimentConfig, n_pos: int, every_position: bool = False) -> int:
    """About the widest activation of one input row, in floats, for any architecture; `every_position`:
    logits at every position (a next-token task), not at one."""
    m = config.model
    he = m.n_heads * m.d_head
    widths = [m.d_model, 3 * he, m.d_mlp, getattr(m, "mlp_width", 0) or 0, getattr(m, "cnn_channels", 0) or 0, m.d_vocab or 0]
    return n_pos * max(widths) + m.n_heads * n_pos * n_pos + (n_pos if every_position else 1) * (m.d_vocab_out or 0)


class StackedEnsemble:
    """The tensors of an ensemble and its update: the run loop's engine for many members (no files).

    `StackedEnsemble(configs)` starts every member from `build_model(config.model)`; `states` (one
    `ResumeState` or None per member) continues members from their resume states. The members sit on
    the stack in `order` (stack position -> given position), sorted into buckets. `update()` is one
    optimiser step of every member; `evaluate(slots, reuse)` gives members' metrics rows.
    """

    def __init__(self, configs: Sequence[ExperimentConfig], states: Sequence[ResumeState | None] | None = None,
                 tasks: Sequence[Task] | None = None):
        configs = [config.resolve() for config in configs]
        if not configs:
            raise ConfigError("an ensemble needs at least one member")
        keep_freed_memory()  # each step reuses the last one's activation memory (lab/training/allocator.py)
        keys = {shape_key(config) for config in configs}
        if len(keys) > 1:
            raise ConfigError(f"ensemble members differ in model shape, task or device ({len(keys)} kinds); split them with group_by_shape")
        states = list(states) if states is not None else [None] * len(configs)
        tasks = list(tasks) if tasks is not None else _make_tasks(configs)
        bucket_keys = [_bucket_key(c, t) for c, t in zip(configs, tasks)]
        self.order = sorted(range(len(configs)), key=lambda m: bucket_keys[m])  # stack position -> given position
        self.configs, self.tasks, states = ([xs[m] for m in self.order] for xs in (configs, tasks, states))
        self.bucket_keys = [bucket_keys[m] for m in self.order]
        self.device = resolve_device(self.configs[0].train.device)
        self.read_position = self.tasks[0].read_position
        self.pad = self.configs[0].model.pad_token_id
        # a batched forward's largest activation stays within this many floats: a CPU's caches; a GPU wants it all
        self.bucket_floats = _CPU_BUCKET_FLOATS if self.device.type == "cpu" else 1 << 40

        # weights: each member's init is built by its own model from its seed, so it equals standalone's
        template = build_model(self.configs[0].model).to(self.device)
        self.layout = _Layout(template)
        self.n_params = self.layout.size
        self.model = _ReadPosition(template, self.read_position)
        self._names = [f"model.{name}" for name in self.layout.names]  # as functional_call sees them
        rows = [self.layout.flatten(state.model if state is not None else dict(
                (build_model(c.model) if m else template).named_parameters())) for m, (c, state) in enumerate(zip(self.configs, states))]
        self.flat = torch.stack(rows).to(self.device)  # (M, P)
        self.exp_avg = torch.zeros_like(self.flat)
        self.exp_avg_sq = torch.zeros_like(self.flat)
        self.adam_steps = np.zeros(len(configs), dtype=np.int64)  # AdamW's own count, for bias correction
        self.steps = np.array([state.step if state is not None else 0 for state in states], dtype=np.int64)
        tcs = [c.train for c in self.configs]
        self.filters = [GradFilter(tc.grad_filter, []) if tc.grad_filter.kind != "none" else None for tc in tcs]
        for m, state in enumerate(states):
            if state is not None:
                self._load_state(m, state)

        # per-member hyperparameters (float64, as PyTorch computes AdamW's scalars)
        self.lr = np.array([tc.lr for tc in tcs])
        self.weight_decay = np.array([tc.weight_decay for tc in tcs])
        self.beta1 = np.array([tc.betas[0] for tc in tcs])
        self.beta2 = np.array([tc.betas[1] for tc in tcs])
        self.eps = np.full(len(tcs), 1e-8)  # torch.optim.AdamW's default, which the Trainer uses
        self.warmup = np.array([tc.warmup_steps for tc in tcs])
        self.orthograd = [tc.orthograd for tc in tcs]
        self.train = [self._to_device(t.split("train")) for t in self.tasks]
        self.test = [self._to_device(t.split("test")) for t in self.tasks]
        # what an evaluation scores of the training split: every row, or `train.train_eval_rows` of them (as the Trainer)
        self.train_eval = [evaluated_rows(split, c.train.train_eval_rows) for split, c in zip(self.train, self.configs)]
        self._restack()

    def _to_device(self, split: Split) -> Split:
        return Split(split.tokens.to(self.device), split.labels.to(self.device))

    def _load_state(self, m: int, state: ResumeState) -> None:
        if state.optimizer:
            for key, target in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
                target[m] = self.layout.flatten({name: f[key] for name, f in state.optimizer.items()}).to(self.device)
            self.adam_steps[m] = int(next(iter(state.optimizer.values()))["step"])
        if self.filters[m] is not None:
            self.filters[m].load_state_tensors({k: v.to(self.device) for k, v in state.grad_filter.items()})

    # --- members in, members out ---

    @property
    def members(self) -> int:
        return self.flat.shape[0]

    def keep(self, slots: Sequence[int]) -> None:
        """Keep only these members (by their current position), in this order: re-stack every tensor."""
        slots = list(slots)
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        self.flat, self.exp_avg, self.exp_avg_sq = self.flat[index], self.exp_avg[index], self.exp_avg_sq[index]
        for name in ("adam_steps", "steps", "lr", "weight_decay", "beta1", "beta2", "eps", "warmup"):
            setattr(self, name, getattr(self, name)[np.asarray(slots, dtype=np.int64)])
        for name in ("configs", "tasks", "bucket_keys", "order", "filters", "orthograd", "train", "test", "train_eval"):
            setattr(self, name, [getattr(self, name)[i] for i in slots])
        self._restack()

    def _restack(self) -> None:
        """Rebuild the buckets, their leaf views and the per-member views after the member axis changed."""
        self.flat_grad = torch.zeros_like(self.flat)
        self.buckets: list[tuple[int, int]] = []  # consecutive members (start, end) that share one batched forward
        start = 0
        for m in range(1, self.members + 1):
            if m == self.members or self.bucket_keys[m] != self.bucket_keys[start] or \
                    (m - start + 1) * self.bucket_keys[start][0] * _widest(self.configs[start]) > self.bucket_floats:
                self.buckets.append((start, m))
                start = m
        self.bucket_params = []
        for start, end in self.buckets:
            views = _leaf_views(self.flat[start:end], self.flat_grad[start:end], self.layout)
            self.bucket_params.append(dict(zip(self._names, views)))
        # per member: its weights as leaves (for the gradient recipes, which run the Trainer's code on them)
        self.member_params = [None] * self.members
        for m in range(self.members):
            if self.orthograd[m] or self.filters[m] is not None:
                self.member_params[m] = _leaf_views(self.flat[m], self.flat_grad[m], self.layout)
                if self.filters[m] is not None:
                    self.filters[m].named_params = list(zip(self.layout.names, self.member_params[m]))
        self._full_batch = None
        self._pending: list[torch.Tensor] | None = None  # this step's forward (logits per bucket), if already computed
        # per member: its parameters' views of each flat buffer and its AdamW step count (0-d, once per parameter),
        # as the fused kernel takes them: tensor by tensor, as the Trainer's optimizer hands it each parameter
        # (the kernel's vectorised and scalar paths round alike only on the same tensor boundaries)
        self._adam_counts = torch.zeros(self.members, dtype=torch.float32, device=self.device)
        n = len(self.layout.names)
        self._adam_lists = [[self.layout.views(t[m]) for t in (self.flat, self.flat_grad, self.exp_avg, self.exp_avg_sq)]
                            + [[self._adam_counts[m]] * n] for m in range(self.members)]

    # --- the forward: the model's own, vmapped over members ---

    def _member_logits(self, params: dict, tokens: torch.Tensor, key_padding: torch.Tensor | None) -> torch.Tensor:
        return functional_call(self.model, params, (tokens, key_padding))

    def forward(self, params: dict, tokens: torch.Tensor) -> torch.Tensor:
        """params name -> (M, *shape), tokens (M, batch, pos), each member's own rows -> logits (M, batch, d_vocab_out).
        The padding is passed explicitly (vmap cannot ask the data whether there is any)."""
        key_padding = tokens == self.pad if self.pad is not None else None
        return vmap(self._member_logits, in_dims=(0, 0, 0 if key_padding is not None else None))(params, tokens, key_padding)

    # --- one update of every member ---

    def full_batch(self, slot: int) -> bool:
        return self.bucket_keys[slot][0] == len(self.train[slot])

    def lr_now(self) -> np.ndarray:
        """Each member's learning rate at its step (`warmup_lr`)."""
        return np.array([warmup_lr(c.train, int(s)) for c, s in zip(self.configs, self.steps)])

    def batch(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This step's training rows per bucket: tokens (members, B, pos), labels (members, B)."""
        if self._full_batch is not None:
            return self._full_batch
        picks, perms = [], {}
        for m, split in enumerate(self.train):
            if self.full_batch(m):
                picks.append(split)
                continue
            # the Trainer's mini-batch; members that share (seed, step, rows) share it
            key = (self.configs[m].model.seed, int(self.steps[m]), len(split))
            if key not in perms:
                perms[key] = minibatch_index(*key, self.bucket_keys[m][0]).to(self.device)
            picks.append(Split(split.tokens[perms[key]], split.labels[perms[key]]))
        result = [(torch.stack([p.tokens for p in picks[a:b]]), torch.stack([p.labels for p in picks[a:b]])) for a, b in self.buckets]
        if all(self.full_batch(m) for m in range(self.members)):
            self._full_batch = result
        return result

    def _train_logits(self) -> list[torch.Tensor]:
        return [self.forward(params, tokens) for params, (tokens, _) in zip(self.bucket_params, self.batch())]

    def update(self) -> None:
        """One optimiser step of every member: forward (unless `evaluate` computed it), backward, ⊥Grad, Grokfast, AdamW."""
        self.flat_grad.zero_()
        logits = self._pending if self._pending is not None else self._train_logits()
        self._pending = None
        total = 0.0
        for (start, _), bucket_logits, (_, labels) in zip(self.buckets, logits, self.batch()):
            tc = self.configs[start].train
            member_loss = lambda lg, lb: task_loss(lg, lb, tc.loss, loss_dtype(self.configs[start]))  # noqa: E731
            total = total + vmap(member_loss)(bucket_logits, labels).sum()  # each member's gradient is its own
        with warnings.catch_warnings():
            # The weights' .grad are views into rows of `flat_grad`; PyTorch warns that such strided gradients
            # "may impair performance", a trade made on purpose (one buffer for AdamW).
            warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")
            total.backward()
        with torch.no_grad():
            for m, params in enumerate(self.member_params):  # the Trainer's recipes, in the Trainer's order
                if params is not None and self.orthograd[m]:
                    orthogonalize_gradients(params)
                if self.filters[m] is not None:
                    self.filters[m].apply()
            self._adamw()
        self.steps += 1

    def _adamw(self) -> None:
        """AdamW with each member's own hyperparameters: PyTorch's fused AdamW kernel (the one the Trainer's
        `torch.optim.AdamW(fused=True)` runs), called once per group of members that share (lr now, weight
        decay, betas, eps), on the members' views of the flat buffers; the bias corrections come from each
        member's own step count. Same kernel, same element-wise arithmetic: the Trainer's update bit for bit."""
        self.adam_steps += 1
        self._adam_counts.copy_(torch.from_numpy(self.adam_steps.astype(np.float32)))
        groups: dict[tuple, list[int]] = {}
        for m, key in enumerate(zip(self.lr_now().tolist(), self.weight_decay.tolist(), self.beta1.tolist(),
                                    self.beta2.tolist(), self.eps.tolist())):
            groups.setdefault(key, []).append(m)
        lists = self._adam_lists
        for (lr, weight_decay, beta1, beta2, eps), ms in groups.items():
            params, grads, exp_avgs, exp_avg_sqs, counts = ([t for m in ms for t in lists[m][i]] for i in range(5))
            torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], counts, lr=lr, beta1=beta1, beta2=beta2,
                                weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)

    # --- evaluation ---

    def evaluate(self, slots: Sequence[int] | None = None, reuse: Sequence[bool] | None = None) -> list[dict]:
        """Train and test (loss, accuracy) and weight norm of these members (all by default), as the Trainer
        reports them; a member's train figures come from this step's update forward where `reuse` says so
        (full batch, and an update follows)."""
        slots = list(range(self.members)) if slots is None else list(slots)
        reuse = list(reuse) if reuse is not None else [False] * len(slots)
        # the update's forward covers every training row: reused only where the evaluation scores them all
        reuse = [again and self.train_eval[slot] is self.train[slot] for again, slot in zip(reuse, slots)]
        results = [{} for _ in slots]
        if any(reuse):
            self._pending = self._train_logits()
            with torch.no_grad():
                for r, slot, again in zip(results, slots, reuse):
                    if again:
                        bucket = next(b for b, (a, e) in enumerate(self.buckets) if a <= slot < e)
                        loss, right, n = score(self._pending[bucket][slot - self.buckets[bucket][0]], self.train[slot].labels, self.configs[slot])
                        r["train_loss"], r["train_acc"] = loss / n, right / n
        with torch.no_grad():
            for split in ("train", "test"):
                todo = [(r, slot) for r, slot, again in zip(results, slots, reuse) if split == "test" or not again]
                self._evaluate_split(split, todo)
            for r, slot in zip(results, slots):
                r["weight_norm"] = weight_norm(self.layout.views(self.flat[slot]))
        return results

    def _evaluate_split(self, split: str, todo: list[tuple[dict, int]]) -> None:
        """The Trainer's `evaluate` of each member on its split (same chunks, same sums), members that share
        the split's size in one vmapped forward, at most `_EVAL_FLOATS` of activations at once."""
        data = self.train_eval if split == "train" else self.test
        groups: dict[tuple, list[tuple[dict, int]]] = {}
        for r, slot in todo:
            groups.setdefault(tuple(data[slot].tokens.shape), []).append((r, slot))
        for (n, n_pos), members in groups.items():
            config = self.configs[members[0][1]]
            chunk = rows_per_chunk(config.model.n_heads, n_pos)
            per_forward = max(1, _EVAL_FLOATS // (min(chunk, n) * _row_floats(config, n_pos, self.read_position is None)))
            for part in range(0, len(members), per_forward):
                group = members[part : part + per_forward]
                index = torch.tensor([slot for _, slot in group], device=self.device)
                params = dict(zip(self._names, self.layout.views(self.flat[index])))
                tokens = torch.stack([data[slot].tokens for _, slot in group])  # (members, n, pos)
                sums = [[0.0, 0, 0] for _ in group]  # summed loss, right, targets: as the Trainer's `evaluate`
                for start, chunk_tokens in batches(tokens[0], config.model.n_heads):
                    logits = self.forward(params, tokens[:, start : start + len(chunk_tokens)])  # (members, chunk, [pos,] vocab)
                    for total, (_, slot), member_logits in zip(sums, group, logits):
                        loss, right, targets = score(member_logits, data[slot].labels[start : start + len(chunk_tokens)], self.configs[slot])
                        total[0], total[1], total[2] = total[0] + loss, total[1] + right, total[2] + targets
                for (r, _), (loss, right, targets) in zip(group, sums):
                    r[f"{split}_loss"], r[f"{split}_acc"] = loss / max(targets, 1), right / max(targets, 1)

    # --- one member's state, for its run folder ---

    def resume_state(self, m: int, elapsed_s: float) -> ResumeState:
        """Member m's state in the Trainer's resume layout: its weights, AdamW state per parameter, its filter's state."""
        optimizer = {}
        if self.adam_steps[m] > 0:  # a fresh torch AdamW has no state before its first step
            moments = {key: self.layout.row(t[m]) for key, t in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq))}
            optimizer = {name: {"step": torch.tensor(float(self.adam_steps[m])), "exp_avg": moments["exp_avg"][name],
                                "exp_avg_sq": moments["exp_avg_sq"][name]} for name in self.layout.names}
        grad_filter = {k: v.detach().cpu().clone() for k, v in self.filters[m].state_tensors().items()} if self.filters[m] is not None else {}
        return ResumeState(int(self.steps[m]), elapsed_s, self.layout.row(self.flat[m]), optimizer, grad_filter)


def _make_tasks(configs: Sequence[ExperimentConfig]) -> list[Task]:
    """One Task per distinct task config: members that share it share its splits."""
    cache: dict[str, Task] = {}
    for config in configs:
        key = config.task.model_dump_json()
        if key not in cache:
            cache[key] = make_task(config.task)
    return [cache[config.task.model_dump_json()] for config in configs]


# --- run folders ------------------------------------------------------------------------------------


def _open_member(config: ExperimentConfig, run_dir: Path, shapes: dict[str, tuple[int, ...]]) -> tuple[RunFolder | None, dict | None]:
    """A member's folder, opened as `lab train` opens it (fresh, or continued from its resume state), or
    None and its summary when it already holds a finished or diverged run. The caller holds the writer lock."""
    if not (run_dir / "config.json").is_file():
        return RunFolder.open(config, run_dir, False, shapes), None
    if not is_config_of(storage.read_json(run_dir / "config.json"), config):
        raise RunError(f"{run_dir} holds a run of a different config; give this member another folder")
    summary = read_summary(run_dir)
    if summary.get("status") in ("finished", "diverged"):
        return None, summary
    return RunFolder.open(config, run_dir, True, shapes), None


def train_ensemble(members: Sequence[Member], progress: bool = True, stop: Callable[[], bool] | None = None) -> list[dict]:
    """Train every (config, run folder) member; same-shape members together, as stacked ensembles.

    Each folder becomes (or continues as) an ordinary run folder, exactly as `lab train` writes it.
    A folder that already holds a finished (or diverged) run of the same config is left alone; one
    holding an unfinished run continues from its resume state (as `lab train --resume` would); a
    folder holding another config is a RunError. Every member's writer lock is held while it trains.
    `stop`, if given, is asked between steps: when it returns True, or on Ctrl-C / SIGTERM, every
    running member is checkpointed and marked "interrupted", and no later group starts.

    Groups (see `group_by_shape`) train one after another. Returns the members' summaries (the
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
            shapes = {name: tuple(p.shape) for name, p in build_model(members[group[0]][0].model).named_parameters()}
            folders, todo = [], []
            for i in group:
                folder, done = _open_member(*members[i], shapes)
                if done is not None:
                    summaries[i] = done
                else:
                    folders.append(folder)
                    todo.append(i)
            if not todo:
                continue
            stack = StackedEnsemble([f.config for f in folders], [f.state for f in folders])
            for f in folders:
                f.state = None  # the stack holds it now
            order = list(stack.order)  # the stack's order as it starts (it drops members as they finish)
            results, stopped = train_members([folders[m] for m in order], stack, progress, stop)
            for m, summary in zip(order, results):
                summaries[todo[m]] = summary
    return [s if s is not None else read_summary(run_dir) or {"name": run_dir.name, "status": "not started"}
            for s, (_, run_dir) in zip(summaries, members)]
