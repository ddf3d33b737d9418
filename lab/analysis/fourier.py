"""Fourier analysis of modular-arithmetic models, after Nanda, Chan, Lieberum, Smith & Steinhardt 2023,
"Progress measures for grokking via mechanistic interpretability".

A model that has grokked a + b mod p embeds each number as cos/sin(w_k x) for a few *key
frequencies* w_k = 2πk/p, multiplies them in the MLP into cos/sin(w_k (a + b)), and reads the
answer c off cos(w_k (a + b − c)). This module measures that:

- `fourier_basis(p)`: the orthonormal basis of functions on Z_p: the constant, then cos w_k x and
  sin w_k x for k = 1 .. p//2 (for even p the all-zero sin at k = p/2 is left out).
- `fourier_norms`: per frequency, the norm of the embedding W_E and of the neuron-logit map
  W_L = W_out W_U in that basis.
- `neuron_frequencies` / `key_frequencies`: the 2-D Fourier transform of every neuron's activation
  (at the `=` position, last layer) over the p × p grid of (a, b); each neuron's dominant
  frequency is the k whose terms (cos/sin w_k a, cos/sin w_k b, and their products) hold the
  largest share of its variance; key frequencies are those dominant for a substantial share of
  neurons.
- `restricted_and_excluded`: as in Nanda et al.'s code, the neuron activations are projected onto
  cos/sin(w_k (a + b)) for the key frequencies (over the (a, b) grid) and passed through W_L.
  Restricted logits keep only those terms (plus the mean logits), evaluated on the test split;
  excluded logits subtract them from the real logits, evaluated on the train split.
- `gini` of Fourier-component norms, and `sum_sq_weights`.

The neuron-logit path is exact only without LayerNorm, so these analyses need a modular model
with an MLP and `normalization = "none"` (Nanda et al.'s setup); others raise ValueError.

The same analyses read the other architectures of the ladder (lab/models/architectures.py `readout`): for
`arch = "mlp"` the neurons are its last hidden layer and W_L is its unembedding W_U (the logits are
linear in them); for `arch = "cnn"` its max-pooled channels. Both embed tokens with a `W_E`, so the
embedding's Fourier norms are measured the same way. The perceptron has no neurons: ValueError.
"""

from __future__ import annotations

import math

import torch

from lab.analysis.probe import Target, resolve_target

NEURON_SHARE = 0.5  # a neuron counts for its dominant frequency when that frequency holds this share of its variance
KEY_SHARE = 0.05  # a key frequency is dominant for at least this share of the active neurons


# --- the basis ------------------------------------------------------------------------------------


def fourier_basis(p: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """(basis (p, p) float64 with orthonormal rows, a label per row ("const", "cos 3", "sin 3", ...),
    the frequency k of each row (0 for the constant))."""
    if p < 2:
        raise ValueError(f"p = {p}: the Fourier basis needs p >= 2")
    x = torch.arange(p, dtype=torch.float64)
    rows, labels, freqs = [torch.ones(p, dtype=torch.float64)], ["const"], [0]
    for k in range(1, p // 2 + 1):
        w = 2 * math.pi * k / p
        for kind, row in (("cos", torch.cos(w * x)), ("sin", torch.sin(w * x))):
            if row.norm() > 1e-6:  # sin at k = p/2 (even p) is zero
                rows.append(row)
                labels.append(f"{kind} {k}")
                freqs.append(k)
    basis = torch.stack(rows)
    return basis / basis.norm(dim=1, keepdim=True), labels, torch.tensor(freqs)


def gini(values) -> float:
    """Gini coefficient of non-negative values: 0 when all are equal, near 1 when one holds everything."""
    x = torch.as_tensor(values, dtype=torch.float64).flatten().abs().sort().values
    n, total = x.numel(), x.sum()
    if n == 0 or total == 0:
        return 0.0
    index = torch.arange(1, n + 1, dtype=torch.float64)
    return float(2 * (index * x).sum() / (n * total) - (n + 1) / n)


def sum_sq_weights(model) -> float:
    """Total sum of squared parameters (the quantity weight decay shrinks)."""
    return float(sum(param.detach().double().pow(2).sum() for param in model.parameters()))


# --- the model's pieces ---------------------------------------------------------------------------


def modular_target(run_or_model, step: int | None = None, task=None) -> Target:
    """Resolve and check that the model fits the Fourier analyses (modular task, all pairs, an MLP, no LayerNorm)."""
    target = resolve_target(run_or_model, step, task)
    check_fourier_model(target)
    return target


def check_fourier_model(target: Target) -> None:
    from lab.models.architectures import readout

    task, cfg = target.task, target.model.cfg
    if task.name != "modular":
        raise ValueError(f"Fourier analysis is for modular runs; this one is task {task.name!r}")
    if len(task.all_pairs()) != task.p * task.p:
        raise ValueError(f"Fourier analysis needs all p*p pairs; operator {task.operator!r} leaves some out")
    if cfg.arch != "transformer":
        readout(target.model)  # raises for an architecture without neurons
        return
    if cfg.attn_only:
        raise ValueError("Fourier analysis reads the MLP neurons; this model is attention-only")
    if cfg.normalization != "none":
        raise ValueError(f"Fourier analysis needs normalization = 'none' (the neuron-logit path is linear); "
                         f"this model uses {cfg.normalization!r}")


def neuron_logit_map(model) -> torch.Tensor:
    """W_L = W_out W_U of the last layer's MLP: (d_mlp, d_vocab_out), float64 (for other architectures the
    map from their last hidden features to the logits: lab.models.architectures.readout)."""
    from lab.models.architectures import readout

    return readout(model).logit_map


@torch.no_grad()
def grid_activations(target: Target) -> tuple[torch.Tensor, torch.Tensor]:
    """Over all (a, b) in row-major order: (logits (p*p, d_vocab_out), last-layer neuron activations
    (p*p, d_mlp)), both at the `=` position, float64 on CPU."""
    from lab.models.architectures import readout

    model = target.model
    neurons = readout(model)
    tokens = target.task.all_pairs().tokens.to(model.device)
    logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name == neurons.hook)
    acts = cache[neurons.hook] if neurons.position is None else cache[neurons.hook][:, neurons.position]
    return logits[:, -1].double().cpu(), acts.double().cpu()


# --- norms ----------------------------------------------------------------------------------------


def _per_frequency(component_norms: torch.Tensor, freqs: torch.Tensor, p: int) -> list[float]:
    """Combine the cos and sin component norms of each frequency: sqrt(cos^2 + sin^2)."""
    return [float(component_norms[freqs == k].pow(2).sum().sqrt()) for k in range(p // 2 + 1)]


def embed_components(model, p: int) -> torch.Tensor:
    """Norm of each Fourier component of the number embeddings W_E[:p]: (p,)."""
    basis, _, _ = fourier_basis(p)
    return (basis @ model.W_E.detach().double().cpu()[:p]).norm(dim=1)


def neuron_logit_components(model, p: int) -> torch.Tensor:
    """Norm (over neurons) of each Fourier component of the neuron-logit map W_L over the output c: (p,)."""
    basis, _, _ = fourier_basis(p)
    return (neuron_logit_map(model)[:, :p] @ basis.T).norm(dim=0)


def fourier_norms(run_or_model, step: int | None = None, task=None):
    """One row per frequency 0..p//2: `embed_norm` (of W_E) and `neuron_logit_norm` (of W_out W_U),
    each the norm of that frequency's cos and sin components together."""
    import pandas as pd

    target = modular_target(run_or_model, step, task)
    p = target.task.p
    _, _, freqs = fourier_basis(p)
    return pd.DataFrame({
        "frequency": list(range(p // 2 + 1)),
        "embed_norm": _per_frequency(embed_components(target.model, p), freqs, p),
        "neuron_logit_norm": _per_frequency(neuron_logit_components(target.model, p), freqs, p),
    })


# --- key frequencies ------------------------------------------------------------------------------


def frequency_shares(acts: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """acts (p*p, n) over the (a, b) grid -> (share (p//2 + 1, n): the share of each neuron's non-constant
    variance held by frequency k's terms (row 0 unused, zero), variance (n,): that non-constant variance)."""
    basis, _, freqs = fourier_basis(p)
    grid = acts.double().reshape(p, p, -1)
    coeffs = torch.einsum("ia,jb,abn->ijn", basis, basis, grid).pow(2)  # (p, p, n) squared 2-D Fourier coefficients
    coeffs[0, 0] = 0.0  # the mean is not variance
    variance = coeffs.sum((0, 1))
    fi, fj = freqs[:, None], freqs[None, :]
    share = torch.zeros(p // 2 + 1, grid.shape[-1], dtype=torch.float64)
    for k in range(1, p // 2 + 1):
        # cos/sin w_k a (times the constant in b), cos/sin w_k b, and the products of the two.
        terms = ((fi == k) & ((fj == 0) | (fj == k))) | ((fi == 0) & (fj == k))
        share[k] = coeffs[terms].sum(0) / variance.clamp(min=1e-30)
    return share, variance


def _active(variance: torch.Tensor) -> torch.Tensor:
    return variance > 1e-6 * variance.max().clamp(min=1e-30)


def neuron_frequencies(run_or_model, step: int | None = None, task=None):
    """One row per MLP neuron (last layer): `neuron`, `frequency` (dominant), `share` (of its variance that
    frequency holds), `variance` (non-constant variance over the (a, b) grid), `active`."""
    import pandas as pd

    target = modular_target(run_or_model, step, task)
    _, acts = grid_activations(target)
    share, variance = frequency_shares(acts, target.task.p)
    best_share, best = share.max(0)
    return pd.DataFrame({"neuron": range(acts.shape[1]), "frequency": best.tolist(), "share": best_share.tolist(),
                         "variance": variance.tolist(), "active": _active(variance).tolist()})


def find_key_frequencies(acts: torch.Tensor, p: int, neuron_share: float = NEURON_SHARE, key_share: float = KEY_SHARE):
    """The key-frequency finder on raw activations (p*p, n): a DataFrame with `frequency`, `n_neurons`
    (neurons it dominates with at least `neuron_share` of their variance), `variance_explained` (share of
    all neurons' non-constant variance its terms hold), `neuron_share` (n_neurons / active neurons);
    only frequencies dominant for at least `key_share` of the active neurons, most neurons first."""
    import pandas as pd

    share, variance = frequency_shares(acts, p)
    active = _active(variance)
    best_share, best = share.max(0)
    counted = active & (best_share >= neuron_share)
    n_active = max(int(active.sum()), 1)
    total = variance[active].sum().clamp(min=1e-30)
    rows = []
    for k in range(1, p // 2 + 1):
        n = int((counted & (best == k)).sum())
        if n and n >= key_share * n_active:
            explained = float((share[k] * variance)[active].sum() / total)
            rows.append({"frequency": k, "n_neurons": n, "variance_explained": explained, "neuron_share": n / n_active})
    frame = pd.DataFrame(rows, columns=["frequency", "n_neurons", "variance_explained", "neuron_share"])
    return frame.sort_values(["n_neurons", "variance_explained"], ascending=False, ignore_index=True)


def key_frequencies(run_or_model, step: int | None = None, task=None, neuron_share: float = NEURON_SHARE,
                    key_share: float = KEY_SHARE):
    """The key frequencies of a modular model (Nanda et al. 2023): one row per frequency that is the
    dominant frequency of at least `key_share` of the active neurons. Columns `frequency`, `n_neurons`,
    `variance_explained` (the share of the neurons' variance it explains), `neuron_share`; sorted by
    n_neurons, most first. A model that has not grokked may have none (an empty frame)."""
    target = modular_target(run_or_model, step, task)
    _, acts = grid_activations(target)
    return find_key_frequencies(acts, target.task.p, neuron_share, key_share)


# --- restricted and excluded loss -----------------------------------------------------------------


def sum_directions(p: int, frequencies) -> torch.Tensor:
    """Orthonormal directions cos/sin(w_k (a + b)) over the row-major (a, b) grid: (2 * n_freq, p*p)."""
    a, b = torch.meshgrid(torch.arange(p, dtype=torch.float64), torch.arange(p, dtype=torch.float64), indexing="ij")
    rows = []
    for k in frequencies:
        angle = (2 * math.pi * int(k) / p) * (a + b).flatten()
        for row in (torch.cos(angle), torch.sin(angle)):
            if row.norm() > 1e-6:
                rows.append(row / row.norm())
    return torch.stack(rows) if rows else torch.zeros(0, p * p, dtype=torch.float64)


def restricted_and_excluded(target: Target, frequencies, logits: torch.Tensor | None = None,
                            acts: torch.Tensor | None = None) -> dict:
    """Restricted loss/accuracy (test split) and excluded loss/accuracy (train split) for these key frequencies."""
    from lab.training.losses import task_loss

    check_fourier_model(target)
    task, p = target.task, target.task.p
    if logits is None or acts is None:
        logits, acts = grid_activations(target)
    directions = sum_directions(p, frequencies)  # (n_dir, p*p)
    key_part = (directions.T @ (directions @ acts)) @ neuron_logit_map(target.model)  # (p*p, vocab_out)
    restricted = logits.mean(0, keepdim=True) + key_part
    excluded = logits - key_part

    def loss_acc(all_logits: torch.Tensor, split_name: str) -> tuple[float, float]:
        split = task.split(split_name)
        index = split.tokens[:, 0] * p + split.tokens[:, 1]
        chosen = all_logits[index]
        loss = task_loss(chosen, split.labels, target.loss_kind, torch.float64).item()
        return loss, float((chosen.argmax(-1) == split.labels).double().mean())

    restricted_loss, restricted_acc = loss_acc(restricted, "test")
    excluded_loss, excluded_acc = loss_acc(excluded, "train")
    return {"restricted_loss": restricted_loss, "restricted_acc": restricted_acc,
            "excluded_loss": excluded_loss, "excluded_acc": excluded_acc}


def restricted_loss(run_or_model, frequencies=None, step: int | None = None, task=None) -> float:
    """Test loss of the logits restricted to the key-frequency terms (default: this checkpoint's key frequencies)."""
    target = modular_target(run_or_model, step, task)
    if frequencies is None:
        frequencies = key_frequencies(target.model, task=target.task)["frequency"].tolist()
    return restricted_and_excluded(target, frequencies)["restricted_loss"]


def excluded_loss(run_or_model, frequencies=None, step: int | None = None, task=None) -> float:
    """Train loss of the logits with the key-frequency terms removed (default: this checkpoint's key frequencies)."""
    target = modular_target(run_or_model, step, task)
    if frequencies is None:
        frequencies = key_frequencies(target.model, task=target.task)["frequency"].tolist()
    return restricted_and_excluded(target, frequencies)["excluded_loss"]
