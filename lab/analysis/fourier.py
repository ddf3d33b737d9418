"""Fourier analysis of modular-arithmetic models, after Nanda, Chan, Lieberum, Smith & Steinhardt 2023,
"Progress measures for grokking via mechanistic interpretability" (arXiv:2301.05217).

A model that has grokked a + b mod p embeds each number as cos/sin(w_k x) for a few *key
frequencies* w_k = 2πk/p, multiplies them in the MLP into cos/sin(w_k (a + b)), and reads the
answer c off cos(w_k (a + b − c)). This module measures that. Where the paper defines a quantity we
follow the code that made its figures, the notebook `Grokking_Analysis.ipynb` of
github.com/mechanistic-interpretability-grokking/progress-measures-paper ("the paper's notebook"):

- `fourier_basis(p)`: the orthonormal basis of functions on Z_p: the constant, then cos w_k x and
  sin w_k x for k = 1 .. p//2 (for even p the all-zero sin at k = p/2 is left out).
- `fourier_norms`: per frequency, the norm of the embedding W_E and of the neuron-logit map
  W_L = W_out W_U in that basis.
- `neuron_frequencies`: the 2-D Fourier transform of every neuron's activation (at the `=` position,
  last layer) over the p × p grid of (a, b); a neuron's frequency is the k whose terms (cos/sin w_k a,
  cos/sin w_k b, and their four products) hold the largest share of its variance (the notebook's
  `neuron_freqs`, an argmax over k = 1 .. p//2).
- `key_frequencies`, method "paper" (the default): every frequency that is some neuron's frequency,
  no threshold (the notebook's `np.unique(neuron_freqs)`). Method "thresholded" (the lab's earlier
  view): only frequencies that hold `NEURON_SHARE` of the variance of at least `KEY_SHARE` of the neurons.
  One departure from the notebook: a neuron whose activation never varies over the grid (a dead ReLU)
  has no frequency and is left out (the notebook's 0/0 would make it frequency 1); a neuron that varies
  at all, however little, counts, as in the notebook.
- `restricted_and_excluded` under a `ProgressDefinition`. Definition "paper" (the default): the
  logits over the (a, b) grid are projected onto cos/sin(w_k (a + b)) for the key frequencies (the
  notebook's `get_component_cos_xpy` / `_sin_xpy`). Restricted logits keep only those terms plus the
  mean logits (`trig_loss`, scored on all p² pairs); excluded logits subtract them from the logits
  (`excluded_loss_2D_full`, scored on the train split). Definition "tl_demo" (TransformerLens's
  `Grokking_Demo.ipynb`): the *neuron activations* are projected instead and passed through W_L, and
  restricted loss is scored on the test split; the direct and attention paths' key-frequency terms then
  stay in the excluded logits, so its excluded loss is lower than the paper's. (The demo's excluded
  logits also leave out the biases b_out and b_U; here they stay in, as in the model's logits.)
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
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from lab.analysis.probe import Target, resolve_target
from lab.errors import ConfigError

# the "thresholded" key frequencies only (the paper's take every neuron's frequency):
NEURON_SHARE = 0.5  # a neuron counts for its dominant frequency when that frequency holds this share of its variance
KEY_SHARE = 0.05  # a key frequency is dominant for at least this share of the active neurons
KEY_FREQUENCY_METHODS = ("paper", "thresholded")


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


def find_key_frequencies(acts: torch.Tensor, p: int, method: str = "paper", neuron_share: float = NEURON_SHARE,
                         key_share: float = KEY_SHARE):
    """The key-frequency finder on raw activations (p*p, n): a DataFrame with `frequency`, `n_neurons`
    (the neurons whose frequency it is; "thresholded": only those where it holds at least `neuron_share`
    of their variance), `variance_explained` (share of all neurons' non-constant variance its terms hold),
    `neuron_share` (n_neurons / active neurons); most neurons first.

    method "paper": every frequency that is some active neuron's frequency (the paper's notebook);
    "thresholded": only frequencies counted for at least `key_share` of the active neurons."""
    import pandas as pd

    if method not in KEY_FREQUENCY_METHODS:
        raise ConfigError(f"key-frequency method {method!r} is not known; valid: {', '.join(KEY_FREQUENCY_METHODS)}")
    share, variance = frequency_shares(acts, p)
    # the paper counts every neuron that varies at all (a dead ReLU is exactly constant); the threshold
    # view ignores neurons whose variance is negligible next to the largest
    active = variance > 0 if method == "paper" else _active(variance)
    best_share, best = share.max(0)
    counted = active if method == "paper" else active & (best_share >= neuron_share)
    n_active = max(int(active.sum()), 1)
    total = variance[active].sum().clamp(min=1e-30)
    rows = []
    for k in range(1, p // 2 + 1):
        n = int((counted & (best == k)).sum())
        if n and (method == "paper" or n >= key_share * n_active):
            explained = float((share[k] * variance)[active].sum() / total)
            rows.append({"frequency": k, "n_neurons": n, "variance_explained": explained, "neuron_share": n / n_active})
    frame = pd.DataFrame(rows, columns=["frequency", "n_neurons", "variance_explained", "neuron_share"])
    return frame.sort_values(["n_neurons", "variance_explained"], ascending=False, ignore_index=True)


def key_frequencies(run_or_model, step: int | None = None, task=None, method: str = "paper",
                    neuron_share: float = NEURON_SHARE, key_share: float = KEY_SHARE):
    """The key frequencies of a modular model (Nanda et al. 2023). method "paper" (default): every
    frequency that is the frequency of some neuron, as the paper's notebook picks them (`np.unique` of the
    neurons' frequencies); "thresholded": only those dominant (`neuron_share` of a neuron's variance) for
    at least `key_share` of the active neurons. Columns `frequency`, `n_neurons`, `variance_explained` (the
    share of the neurons' variance it explains), `neuron_share`; sorted by n_neurons, most first. Under
    "thresholded" a model that has not grokked may have none (an empty frame)."""
    target = modular_target(run_or_model, step, task)
    _, acts = grid_activations(target)
    return find_key_frequencies(acts, target.task.p, method, neuron_share, key_share)


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


PAIRS = ("all", "train", "test")


@dataclass(frozen=True)
class ProgressDefinition:
    """Which definition of restricted and excluded loss to compute (see the module docstring).

    projection: "logits" (the paper's notebook: the logits' cos/sin(w_k (a + b)) components) or "neurons"
    (TransformerLens's demo: the neuron activations' components, through W_L). key_frequencies: "paper"
    or "thresholded" (`key_frequencies`). restricted_pairs / excluded_pairs: the pairs each loss is
    scored on, "all" (the p² pairs), "train" or "test"."""

    projection: Literal["logits", "neurons"] = "logits"
    key_frequencies: Literal["paper", "thresholded"] = "paper"
    restricted_pairs: Literal["all", "train", "test"] = "all"
    excluded_pairs: Literal["all", "train", "test"] = "train"

    def __post_init__(self):
        for field, value, valid in (("projection", self.projection, ("logits", "neurons")),
                                    ("key_frequencies", self.key_frequencies, KEY_FREQUENCY_METHODS),
                                    ("restricted_pairs", self.restricted_pairs, PAIRS),
                                    ("excluded_pairs", self.excluded_pairs, PAIRS)):
            if value not in valid:
                raise ConfigError(f"progress definition: {field} {value!r} is not known; valid: {', '.join(valid)}")

    @property
    def name(self) -> str:
        """"paper", "tl_demo", or the fields joined by "-" for any other combination."""
        named = [name for name, definition in DEFINITIONS.items() if definition == self]
        return named[0] if named else "-".join(str(value) for value in asdict(self).values())

    def describe(self) -> str:
        """One line for captions and CLI output: what is projected and which pairs each loss is scored on."""
        projected = "logits" if self.projection == "logits" else "neuron activations through W_L"
        return (f"{self.name}: {projected} projected on the {self.key_frequencies} key frequencies; "
                f"restricted loss on {self.restricted_pairs} pairs, excluded loss on {self.excluded_pairs} pairs")


DEFINITIONS = {
    "paper": ProgressDefinition(),  # Nanda et al.'s notebook: trig_loss (all pairs), excluded_loss_2D_full (train)
    "tl_demo": ProgressDefinition(projection="neurons", restricted_pairs="test"),  # TransformerLens Grokking_Demo
}


def progress_definition(definition: "str | ProgressDefinition" = "paper") -> ProgressDefinition:
    """A definition by name ("paper", "tl_demo") or as given."""
    if isinstance(definition, ProgressDefinition):
        return definition
    if definition not in DEFINITIONS:
        raise ConfigError(f"progress definition {definition!r} is not known; valid: {', '.join(DEFINITIONS)} "
                          f"(or a lab.analysis.fourier.ProgressDefinition)")
    return DEFINITIONS[definition]


def _pairs_index(task, pairs: str) -> torch.Tensor:
    """Row indices into the row-major (a, b) grid of the pairs a loss is scored on."""
    if pairs == "all":
        return torch.arange(task.p * task.p)
    tokens = task.split(pairs).tokens
    return tokens[:, 0] * task.p + tokens[:, 1]


def restricted_and_excluded(target: Target, frequencies, logits: torch.Tensor | None = None,
                            acts: torch.Tensor | None = None, definition: "str | ProgressDefinition" = "paper") -> dict:
    """Restricted and excluded loss and accuracy for these key frequencies, under `definition` (default the
    paper's: the logits' key-frequency terms, restricted loss on all pairs, excluded loss on the train split)."""
    from lab.training.losses import task_loss

    check_fourier_model(target)
    definition = progress_definition(definition)
    task, p = target.task, target.task.p
    if logits is None or acts is None:
        logits, acts = grid_activations(target)
    directions = sum_directions(p, frequencies)  # (n_dir, p*p), orthonormal
    if definition.projection == "logits":
        key_part = directions.T @ (directions @ logits)  # (p*p, vocab_out)
    else:
        key_part = (directions.T @ (directions @ acts)) @ neuron_logit_map(target.model)  # (p*p, vocab_out)
    # the paper's bias correction: the restricted logits get back the input-independent part they lost
    restricted = key_part + (logits - key_part).mean(0, keepdim=True)
    excluded = logits - key_part
    labels = task.all_pairs().labels

    def loss_acc(all_logits: torch.Tensor, pairs: str) -> tuple[float, float]:
        index = _pairs_index(task, pairs)
        chosen = all_logits[index]
        loss = task_loss(chosen, labels[index], target.loss_kind, torch.float64).item()
        return loss, float((chosen.argmax(-1) == labels[index]).double().mean())

    restricted_loss, restricted_acc = loss_acc(restricted, definition.restricted_pairs)
    excluded_loss, excluded_acc = loss_acc(excluded, definition.excluded_pairs)
    return {"restricted_loss": restricted_loss, "restricted_acc": restricted_acc,
            "excluded_loss": excluded_loss, "excluded_acc": excluded_acc}


def _key_frequencies_for(target: Target, frequencies, definition: ProgressDefinition) -> list[int]:
    if frequencies is not None:
        return list(frequencies)
    return key_frequencies(target.model, task=target.task, method=definition.key_frequencies)["frequency"].tolist()


def restricted_loss(run_or_model, frequencies=None, step: int | None = None, task=None,
                    definition: "str | ProgressDefinition" = "paper") -> float:
    """Loss of the logits restricted to the key-frequency terms (default: this checkpoint's key frequencies;
    the paper's definition: logits projected, scored on all pairs; see `ProgressDefinition`)."""
    target = modular_target(run_or_model, step, task)
    definition = progress_definition(definition)
    return restricted_and_excluded(target, _key_frequencies_for(target, frequencies, definition),
                                   definition=definition)["restricted_loss"]


def excluded_loss(run_or_model, frequencies=None, step: int | None = None, task=None,
                  definition: "str | ProgressDefinition" = "paper") -> float:
    """Loss of the logits with the key-frequency terms removed (default: this checkpoint's key frequencies;
    the paper's definition: logits projected, scored on the train split; see `ProgressDefinition`)."""
    target = modular_target(run_or_model, step, task)
    definition = progress_definition(definition)
    return restricted_and_excluded(target, _key_frequencies_for(target, frequencies, definition),
                                   definition=definition)["excluded_loss"]
