"""Ablations: loss and accuracy on a split with one attention head, or some MLP neurons, knocked out.

`method="zero"` sets the component's output to zero; `method="mean"` replaces it, at every
position, by its mean over the split (padding excluded), which keeps the average signal and
removes only what depends on the input.

How it is computed, and why it is fast. Only the logits at the task's read position count, so the
last block runs at that position alone, through the model's own one-position path (the one training
uses, `Transformer.read_at` then `Transformer.logits_at`, lab/models/transformer.py section 5). A
head of the last block changes the output only through its `z` at the read position, and attention's
output is a sum over heads through W_O, so every "one head ablated" variant is the same `z` with one
head's slice replaced: all variants go through `logits_at` together, in one batched pass, after a
single `read_at` over the split. A head of an earlier layer changes every later position, so each of
those is a `read_at` with that head's `hook_z` patched (hooks on the earlier blocks apply there).
The numbers equal the plain `run_with_hooks` forward up to float rounding (tests/test_probe.py checks
it against that reference).

Results for a Run are cached per checkpoint in `RUN/analysis/heads/step_<step>.json`, keyed on the
checkpoint file's size and modification time (so a rewritten checkpoint is recomputed), written
atomically; `precompute_heads(run)` (lab/analysis/heads.py) fills the cache for every checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import threading
import warnings
from dataclasses import dataclass

import torch

from lab.runs import storage
from lab.models.prediction import integer_list
from lab.models.architectures import require_attention
from lab.models.transformer import ReadAt
from lab.analysis.probe import Target, resolve_target

METHODS = ("zero", "mean")
SPLITS = ("train", "test")
ROWS_FLOATS = 1 << 24  # per chunk: rows * positions * width of the widest per-position activation


def _check(split: str, method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown ablation method {method!r}; valid: {', '.join(map(repr, METHODS))}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(map(repr, SPLITS))}")


# --- per-checkpoint cache in the run folder --------------------------------------------------------
# One JSON file per checkpoint: {"version", "fingerprint": [size, mtime_ns], "entries": {key: value}}.
# A lookup needs no model and no data (only a stat of the checkpoint), so a cached answer costs
# milliseconds. Two writers (the dashboard's background thread, `lab demo`) may race: writes are
# atomic and a lost entry is recomputed later; a lock keeps one process's writers in order.

CACHE_VERSION = 1
CACHE_DIR = "analysis/heads"
_CACHE_LOCK = threading.Lock()


def _cache_path(run, step: int):
    return run.path / CACHE_DIR / f"step_{step:06d}.json"


def _fingerprint(run, step: int) -> list[int] | None:
    try:
        stat = storage.checkpoint_path(run.path, step).stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def _read_entries(run, step: int, fingerprint) -> dict:
    try:
        cache = json.loads(_cache_path(run, step).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(cache, dict) or cache.get("version") != CACHE_VERSION or cache.get("fingerprint") != fingerprint:
        return {}
    entries = cache.get("entries")
    return entries if isinstance(entries, dict) else {}


def cached(run, step: int | None, key: str, compute):
    """The value stored under `key` for checkpoint `step` of `run` in the run folder's per-checkpoint cache;
    on a miss `compute()` returns {key: value, ...}: every entry it computed in the same pass is stored
    (values JSON-able). Unwritable folders only warn."""
    step = run.resolve_step(step)
    fingerprint = _fingerprint(run, step)
    if fingerprint is not None:
        entries = _read_entries(run, step, fingerprint)
        if key in entries:
            return entries[key]
    computed = compute()
    if fingerprint is None or _fingerprint(run, step) != fingerprint:
        return computed[key]  # the checkpoint changed while we computed: do not store a stale answer under its stamp
    path = _cache_path(run, step)
    with _CACHE_LOCK:
        entries = _read_entries(run, step, fingerprint)  # another writer may have added entries meanwhile
        entries.update(computed)
        try:
            storage.atomic_write_json(path, {"version": CACHE_VERSION, "fingerprint": fingerprint, "entries": entries})
        except OSError as err:
            warnings.warn(f"{path}: could not store the head analysis ({err}); it was computed but not cached")
    return computed[key]


def is_cached(run, step: int, key: str) -> bool:
    """True if `key` is stored for checkpoint `step` (and the checkpoint is unchanged since)."""
    fingerprint = _fingerprint(run, step)
    return fingerprint is not None and key in _read_entries(run, step, fingerprint)


def private_target(run_or_model, step: int | None = None, task=None) -> Target:
    """`resolve_target` with a private copy of the model (milliseconds for these models). The analyses attach
    hooks to it; a model shared with another thread (the dashboard computes in the background while the
    page runs `lab.attention`) must neither see those hooks nor pass its own hooks' effects on to ours."""
    target = resolve_target(run_or_model, step, task)
    return dataclasses.replace(target, model=copy.deepcopy(target.model))


# --- the forward pass, read position only in the last block -----------------------------------------
# `Transformer.read_at` / `logits_at` (lab/models/transformer.py, section 5): the one-position path
# training uses, in its two steps. Hooks on the earlier blocks apply inside `read_at`.


def _read_chunk(model, tokens: torch.Tensor, position: int) -> ReadAt:
    """`model.read_at` on one chunk, with the attention row padded to every key (batch, head, pos): zero on
    the keys a causal query cannot see."""
    read = model.read_at(tokens.to(model.device), position)
    n_pos = tokens.shape[-1]
    return ReadAt(read.resid, read.z, torch.nn.functional.pad(read.pattern, (0, n_pos - read.pattern.shape[-1])))


def _chunks(model, tokens: torch.Tensor):
    """(start, chunk) pairs small enough for the widest activation: full attention patterns in an earlier
    layer, or keys/values/LayerNorm over every position in the last."""
    cfg = model.cfg
    n_pos = tokens.shape[1]
    per_row = n_pos * max(4 * cfg.d_model, 3 * cfg.n_heads * cfg.d_head)
    if cfg.n_layers > 1:
        per_row = max(per_row, cfg.n_heads * n_pos * n_pos)
    size = max(1, ROWS_FLOATS // per_row)
    for start in range(0, tokens.shape[0], size):
        yield start, tokens[start : start + size]


def _score(target: Target, logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(mean loss, accuracy) of (batch, vocab) logits, the loss in float64 as in training's evaluation."""
    from lab.training.losses import task_loss

    loss = task_loss(logits, labels, target.loss_kind, torch.float64).item()
    return loss, (logits.argmax(-1) == labels).double().mean().item()


def _real(target: Target, tokens: torch.Tensor) -> torch.Tensor:
    """(batch, pos) float: 1 on real tokens, 0 on padding."""
    if target.task.pad_token_id is None:
        return torch.ones(tokens.shape, dtype=torch.float32)
    return (tokens != target.task.pad_token_id).float()


@dataclass
class CleanPass:
    """One forward over a split, nothing ablated: `read` (ReadAt of every input, on CPU, rows padded to every key);
    `patterns` (batch, layer, head, key): every layer's attention row at the read position; `z_means`
    {earlier layer: (pos, head, d_head)}: per-position means of hook_z, padding excluded."""

    read: ReadAt
    patterns: torch.Tensor
    z_means: dict


@torch.no_grad()
def clean_pass(target: Target, tokens: torch.Tensor) -> CleanPass:
    """The one forward every head analysis of a split starts from (see CleanPass)."""
    model = target.model
    position = target.task.read_position
    pieces, rows, sums, counts = [], [], {}, {}
    for _, chunk in _chunks(model, tokens):
        z_acts, pattern_rows = {}, {}
        hooks = []
        for layer in range(model.cfg.n_layers - 1):
            hooks.append((f"blocks.{layer}.attn.hook_z", lambda act, hook, layer=layer: z_acts.__setitem__(layer, act)))
            hooks.append((f"blocks.{layer}.attn.hook_pattern",
                          lambda act, hook, layer=layer: pattern_rows.__setitem__(layer, act[:, :, position])))
        with model.hooks(fwd_hooks=hooks):
            piece = _read_chunk(model, chunk, position)
        pieces.append(ReadAt(piece.resid.cpu(), piece.z.cpu(), piece.pattern.cpu()))
        rows.append(torch.stack([pattern_rows[layer].cpu() for layer in sorted(pattern_rows)] + [pieces[-1].pattern], 1))
        real = _real(target, chunk)[:, :, None, None]  # (batch, pos, 1, 1)
        for layer, act in z_acts.items():
            part, n = (act.float().cpu() * real).sum(0), real.sum(0)
            sums[layer] = part if layer not in sums else sums[layer] + part
            counts[layer] = n if layer not in counts else counts[layer] + n
    read = ReadAt(*(torch.cat([getattr(p, name) for p in pieces]) for name in ("resid", "z", "pattern")))
    return CleanPass(read, torch.cat(rows), {layer: sums[layer] / counts[layer].clamp(min=1) for layer in sums})


def _read_mean(target: Target, tokens: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Mean over the inputs of values (batch, ...) at the read position, inputs whose read token is padding excluded."""
    real = _real(target, tokens)[:, target.task.read_position].reshape(-1, *([1] * (values.ndim - 1)))
    return (values.float() * real).sum(0) / real.sum(0).clamp(min=1)


@torch.no_grad()
def _last_layer_variants(model, clean: ReadAt, means: torch.Tensor | None) -> torch.Tensor:
    """z for "none" and each last-layer head ablated: (1 + head, batch, head, d_head)."""
    n_heads = clean.z.shape[1]
    variants = clean.z[None].repeat(1 + n_heads, 1, 1, 1)
    for head in range(n_heads):
        variants[1 + head, :, head] = 0.0 if means is None else means[head].to(variants.dtype)
    return variants


@torch.no_grad()
def _earlier_layer_logits(target: Target, tokens: torch.Tensor, layer: int, head: int, mean) -> torch.Tensor:
    """Logits (batch, vocab) with head `head` of an earlier layer zeroed or set to its per-position mean."""
    model = target.model

    def patch(act, hook):
        act = act.clone()  # (batch, pos, head, d_head)
        act[:, :, head] = 0.0 if mean is None else mean[: act.shape[1], head].to(act.device, act.dtype)
        return act

    logits = []
    for _, chunk in _chunks(model, tokens):
        with model.hooks(fwd_hooks=[(f"blocks.{layer}.attn.hook_z", patch)]):
            piece = model.read_at(chunk.to(model.device), target.task.read_position)
        logits.append(model.logits_at(piece.resid, piece.z).cpu())
    return torch.cat(logits)


def _logits_in_rows(model, resid: torch.Tensor, z: torch.Tensor, replace_post=None) -> torch.Tensor:
    """`model.logits_at` over (variant, batch, ...) in row chunks (the MLP's d_mlp can be wide)."""
    size = max(1, ROWS_FLOATS // max(model.cfg.d_mlp or 0, model.cfg.d_model, model.cfg.d_vocab_out))
    out = []
    for start in range(0, resid.shape[-2], size):
        out.append(model.logits_at(resid[..., start : start + size, :].to(model.device),
                                   z[..., start : start + size, :, :].to(model.device), replace_post).cpu())
    return torch.cat(out, dim=-2)


@torch.no_grad()
def head_ablation_rows(target: Target, split: str, method: str, clean: CleanPass | None = None) -> list[dict]:
    """[{component, layer, head, loss, accuracy}] for "none" and every head, computed as the module docstring
    says. `clean`: the split's clean_pass, if already computed."""
    model, cfg = target.model, target.model.cfg
    data = target.task.split(split)
    last = cfg.n_layers - 1
    clean = clean if clean is not None else clean_pass(target, data.tokens)
    read = clean.read
    means = _read_mean(target, data.tokens, read.z) if method == "mean" else None  # (head, d_head)
    variants = _last_layer_variants(model, read, means)  # (1 + head, batch, head, d_head)
    logits = _logits_in_rows(model, read.resid.expand(len(variants), *read.resid.shape), variants)
    scores = [_score(target, variant_logits, data.labels) for variant_logits in logits]
    rows = [{"component": "none", "layer": None, "head": None, "loss": scores[0][0], "accuracy": scores[0][1]}]
    for layer in range(cfg.n_layers):
        for head in range(cfg.n_heads):
            if layer == last:
                loss, accuracy = scores[1 + head]
            else:
                mean = clean.z_means[layer] if method == "mean" else None
                loss, accuracy = _score(target, _earlier_layer_logits(target, data.tokens, layer, head, mean), data.labels)
            rows.append({"component": f"L{layer}H{head}", "layer": layer, "head": head, "loss": loss, "accuracy": accuracy})
    return rows


def _frame(rows: list[dict], what: str = "head"):
    """The ablation table: component, layer, `what` (head, or neurons), loss, accuracy, and the deltas relative to
    the first row ("none"). layer and `what` are None on that row (object columns, so they stay None)."""
    import pandas as pd

    frame = pd.DataFrame({key: pd.Series([row[key] for row in rows], dtype=object if key in ("layer", what) else None)
                          for key in ("component", "layer", what, "loss", "accuracy")})
    frame["delta_loss"] = frame["loss"] - rows[0]["loss"]
    frame["delta_accuracy"] = frame["accuracy"] - rows[0]["accuracy"]
    return frame


def _run_of(run_or_model, task):
    """The Run behind `run_or_model` (loaded from a path or name), or None for a bare model."""
    import os

    from lab.runs.run import Run, load_run

    if isinstance(run_or_model, (str, os.PathLike)):
        run_or_model = load_run(run_or_model)
    if isinstance(run_or_model, Run):
        if task is not None and task is not run_or_model.task:
            raise ValueError("task= is only for a bare model; a run brings its own task")
        return run_or_model
    return None


FINDS_RATIO = 1.5  # a head "finds" a letter when it puts this many times more mass on it than on the other


@torch.no_grad()
def letter_masses(target: Target, split: str, clean: CleanPass | None = None) -> list[dict]:
    """[{component, layer, head, mass_on_a, mass_on_b}]: the mean attention <cls> pays to each letter, per head.
    `clean`: the split's clean_pass, if already computed."""
    task, cfg = target.task, target.model.cfg
    tokens = task.split(split).tokens
    clean = clean if clean is not None else clean_pass(target, tokens)
    cls_rows = clean.patterns.double()  # (batch, layer, head, key)
    masses = {}
    for letter in "ab":
        is_letter = (tokens == task.vocab.index(letter)).double()  # (batch, key)
        has = is_letter.sum(-1) > 0
        per_string = (cls_rows * is_letter[:, None, None, :]).sum(-1)  # (batch, layer, head)
        masses[letter] = per_string[has].sum(0) / max(int(has.sum()), 1)
    return [{"component": f"L{layer}H{head}", "layer": layer, "head": head,
             "mass_on_a": float(masses["a"][layer, head]), "mass_on_b": float(masses["b"][layer, head])}
            for layer in range(cfg.n_layers) for head in range(cfg.n_heads)]


def split_entries(target: Target, split: str) -> dict:
    """Every cached head analysis of one split, from one clean pass: {"ablate_heads/SPLIT/zero": rows,
    "ablate_heads/SPLIT/mean": rows, and for a_and_b "letter_attention/SPLIT": rows}."""
    clean = clean_pass(target, target.task.split(split).tokens)
    entries = {f"ablate_heads/{split}/{method}": head_ablation_rows(target, split, method, clean) for method in METHODS}
    if target.task.name == "a_and_b":
        entries[f"letter_attention/{split}"] = letter_masses(target, split, clean)
    return entries


def ablate_heads(run_or_model, split: str = "test", method: str = "zero", step: int | None = None, task=None,
                 cache: bool = True):
    """One row per attention head (and one for "none"): the loss and accuracy on `split` with that head's
    output (its `hook_z`) zeroed or mean-replaced. Columns: component ("none", "L0H0", ...), layer, head,
    loss, accuracy, delta_loss, delta_accuracy (relative to "none").

    Exact: every input of the split is used. For a Run the rows are cached per checkpoint in the run
    folder (`cache=False` recomputes without reading or writing the cache)."""
    _check(split, method)
    require_attention(_run_of(run_or_model, task) or run_or_model, "lab.ablate_heads")
    run = _run_of(run_or_model, task) if cache else None
    if run is not None:
        rows = cached(run, step, f"ablate_heads/{split}/{method}", lambda: split_entries(private_target(run, step), split))
    else:
        rows = head_ablation_rows(private_target(run_or_model, step, task), split, method)
    return _frame(rows)


@torch.no_grad()
def ablate_neurons(run_or_model, neurons: list[int], layer: int = 0, split: str = "test", method: str = "zero",
                   step: int | None = None, task=None):
    """Loss and accuracy on `split` with the MLP neurons `neurons` of `layer` (their `hook_post`) zeroed or
    mean-replaced, as a table like `ablate_heads`'s: a "none" row (nothing ablated) and one row with the
    neurons ablated, e.g. "L0 MLP (64 neurons)". Columns: component, layer, neurons (the list), loss,
    accuracy, delta_loss, delta_accuracy (relative to "none")."""
    _check(split, method)
    target = private_target(run_or_model, step, task)
    model, cfg = target.model, target.model.cfg
    if cfg.arch != "transformer":  # the MLP's and CNN's hidden layers (lab/models/architectures.py)
        from lab.models.architectures import ablate_hidden_neurons

        scores = ablate_hidden_neurons(target, neurons, layer, split, method,
                                       lambda logits, labels: _score(target, logits, labels))
        return _neuron_frame(layer, neurons, (scores["base_loss"], scores["base_accuracy"]),
                             (scores["loss"], scores["accuracy"]))
    if cfg.attn_only:
        raise ValueError("this model is attention-only: it has no MLP neurons to ablate")
    if not 0 <= layer < cfg.n_layers:
        raise ValueError(f"layer {layer} does not exist: this model's layers are 0..{cfg.n_layers - 1}")
    neurons = integer_list(neurons, "neuron", "a list of integer neuron indices")  # 1.9 is refused, not truncated
    bad = [n for n in neurons if not 0 <= n < cfg.d_mlp]
    if bad:
        raise ValueError(f"neuron {bad[0]} does not exist: this model's neurons are 0..{cfg.d_mlp - 1}")
    data = target.task.split(split)
    index = torch.tensor(neurons, dtype=torch.long)
    if layer == cfg.n_layers - 1:
        # The last layer's neurons reach the output only at the read position: patch them there.
        clean = clean_pass(target, data.tokens).read
        base = _logits_in_rows(model, clean.resid, clean.z)
        post = None
        if method == "mean":
            grabbed = []  # the MLP's activations at the read position, (rows, 1, d_mlp) per chunk
            _logits_in_rows(model, clean.resid, clean.z, replace_post=lambda act: grabbed.append(act[:, 0]) or act)
            post = _read_mean(target, data.tokens, torch.cat(grabbed).cpu())  # (d_mlp,)

        def patch(act):
            act = act.clone()
            act[..., index] = 0.0 if post is None else post[index].to(act.device, act.dtype)
            return act

        ablated = _logits_in_rows(model, clean.resid, clean.z, replace_post=patch)
    else:
        ablated, base = _earlier_neuron_logits(target, data.tokens, layer, index, method)
    return _neuron_frame(layer, neurons, _score(target, base, data.labels), _score(target, ablated, data.labels))


def _neuron_frame(layer: int, neurons: list[int], base: tuple[float, float], ablated: tuple[float, float]):
    """ablate_neurons' table from the (loss, accuracy) pairs without and with the neurons ablated."""
    neurons = [int(n) for n in neurons]
    label = f"L{layer} MLP ({len(neurons)} neuron{'s' * (len(neurons) != 1)})"
    return _frame([{"component": "none", "layer": None, "neurons": None, "loss": base[0], "accuracy": base[1]},
                   {"component": label, "layer": layer, "neurons": neurons, "loss": ablated[0], "accuracy": ablated[1]}],
                  what="neurons")


def _earlier_neuron_logits(target: Target, tokens: torch.Tensor, layer: int, index: torch.Tensor, method: str):
    """(ablated, clean) logits with neurons of an earlier layer patched at every position."""
    model = target.model
    hook_name = f"blocks.{layer}.mlp.hook_post"  # (batch, pos, d_mlp)
    mean = None
    if method == "mean":
        total = count = None
        for _, chunk in _chunks(model, tokens):
            captured = []
            with model.hooks(fwd_hooks=[(hook_name, lambda act, hook: captured.append(act))]):
                model.read_at(chunk.to(model.device), target.task.read_position)
            real = _real(target, chunk)[:, :, None]
            part, n = (captured[0].float().cpu() * real).sum(0), real.sum(0)
            total, count = (part, n) if total is None else (total + part, count + n)
        mean = total / count.clamp(min=1)  # (pos, d_mlp)

    def patch(act, hook):
        act = act.clone()
        act[:, :, index] = 0.0 if mean is None else mean[: act.shape[1]][:, index].to(act.device, act.dtype)
        return act

    ablated, base = [], []
    for _, chunk in _chunks(model, tokens):
        chunk = chunk.to(model.device)
        piece = model.read_at(chunk, target.task.read_position)
        base.append(model.logits_at(piece.resid, piece.z).cpu())
        with model.hooks(fwd_hooks=[(hook_name, patch)]):
            piece = model.read_at(chunk, target.task.read_position)
        ablated.append(model.logits_at(piece.resid, piece.z).cpu())
    return torch.cat(ablated), torch.cat(base)
