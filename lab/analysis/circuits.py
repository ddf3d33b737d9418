"""Circuits read from the weights: each head's QK circuit (which token it attends to), OV circuit (what it
writes towards each answer when it attends there), and composition scores between layers.

    qk = lab.qk_circuit(ab)             # a_and_b: scores from <cls> to every key token, per head
    qk.read_scores                      # (layer, head, key token)
    lab.qk_circuit(run, fourier=True)   # modular: both token axes in the Fourier basis of Z_p
    lab.ov_circuit(run)                 # (layer, head, source token, output)
    lab.composition_scores(run)         # Q-, K- and V-composition between heads of different layers

Definitions (Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits"; TransformerLens's
`FactoredMatrix`, `model.QK`, `model.OV` and `all_composition_scores`):

- *Full QK circuit*: the attention score a head gives a key token from a query token, from the weights
  alone: (ln1(x_q) W_Q + b_Q) . (ln1(x_k) W_K + b_K) / sqrt(d_head), with x the token's embedding W_E.
  The query also gets the positional embedding of the read position; keys get the mean positional
  embedding over the positions the read position sees (exact for a_and_b, which has no positions). For a
  first-layer head these are the real pre-softmax scores (tests/test_circuits.py checks them against
  `hook_attn_scores`); for a later layer it is the direct path from the embeddings only.
- *Full OV circuit*: what the head adds to each output logit when it attends fully to a token,
  ln1(x) W_V W_O W_U (TransformerLens's `W_E @ model.OV @ W_U` when there is no LayerNorm and no positions;
  value and output biases, which do not depend on the token, and the final LayerNorm are left out).
- *Composition scores*: ||W_OV^A W^B|| / (||W_OV^A|| ||W^B||) (Frobenius norms) for a head A of an earlier
  layer and a head B of a later one, with W^B its QK matrix (Q-composition), its transposed QK matrix
  (K-composition) or its OV matrix (V-composition), by TransformerLens's own `composition_scores`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import einsum

from lab.analysis.ablation import private_target
from lab.models.architectures import require_attention


@dataclass(frozen=True)
class QKCircuit:
    """`scores` (layer, head, query, key) over `tokens` (or Fourier components, `basis == "fourier"`);
    `read_scores` (layer, head, key): the row of the task's read token (`read_token`, e.g. <cls> or =);
    `key_tokens`: the labels of the key axis of `read_scores`."""

    scores: torch.Tensor
    tokens: list[str]
    read_scores: torch.Tensor
    key_tokens: list[str]
    read_token: str
    basis: str
    step: int | None

    def preference(self):
        """One row per (head, key token): the read token's score for it, relative to the mean over keys
        (how much more this head attends there than to an average token, in logits of the softmax)."""
        import pandas as pd

        layers, heads, keys = self.read_scores.shape
        centred = self.read_scores - self.read_scores.mean(-1, keepdim=True)
        return pd.DataFrame([{"component": f"L{l}H{h}", "layer": l, "head": h, "key": self.key_tokens[k],
                              "score": float(centred[l, h, k])}
                             for l in range(layers) for h in range(heads) for k in range(keys)])

    def __repr__(self) -> str:
        tops = []
        for l in range(self.read_scores.shape[0]):
            for h in range(self.read_scores.shape[1]):
                tops.append(f"L{l}H{h}->{self.key_tokens[int(self.read_scores[l, h].argmax())]}")
        return (f"QKCircuit({self.basis} basis, scores {tuple(self.scores.shape)}, from {self.read_token!r} "
                f"each head likes most: {', '.join(tops)}; step {self.step})")

    def _repr_html_(self) -> str:
        return f"<p>{self.__repr__()}</p>"


@dataclass(frozen=True)
class OVCircuit:
    """`values` (layer, head, source, output): what a head attending fully to a source token adds to each
    output logit (in the Fourier basis of Z_p on both axes when `basis == "fourier"`); `tokens`, `outputs`."""

    values: torch.Tensor
    tokens: list[str]
    outputs: list[str]
    basis: str
    step: int | None

    def __repr__(self) -> str:
        return f"OVCircuit({self.basis} basis, values {tuple(self.values.shape)} (layer, head, source, output); step {self.step})"

    def _repr_html_(self) -> str:
        return f"<p>{self.__repr__()}</p>"


def _target(run_or_model, step, task, what: str):
    target = private_target(run_or_model, step, task)  # a private copy: LayerNorm hook points fire here
    require_attention(target.model, what)
    score = getattr(target.model.cfg, "attn_score", "scaled_dot")
    if score != "scaled_dot":  # the circuits below are written for softmax(q.k / sqrt(d_head))
        raise ValueError(f"{what} reads the scaled dot-product score q.k/sqrt(d_head); this model has "
                         f"model.attn_score = {score!r}")
    return target


def read_token_id(task) -> int:
    """The token at the read position of the task's inputs (<cls> for a_and_b, = for modular and S5)."""
    return int(task.split("test").tokens[0, task.read_position])


def _token_ids(task) -> list[int]:
    """Every token but padding (which attention never reads)."""
    return [t for t in range(task.d_vocab) if t != task.pad_token_id]


def _residuals(model, task, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(query residual of the read token (d_model,), key residuals of `ids` (token, d_model)): embeddings,
    plus positional embeddings as the module docstring says."""
    W_E = model.W_E.detach().float()
    query, keys = W_E[read_token_id(task)], W_E[ids]
    if model.W_pos is not None:
        n_ctx = task.n_ctx
        read = task.read_position % n_ctx if task.read_position >= 0 else n_ctx + task.read_position
        seen = read + 1 if model.cfg.causal else n_ctx
        query = query + model.W_pos[read].detach().float()
        keys = keys + model.W_pos[:seen].detach().float().mean(0)
    return query, keys


def _fourier(task) -> torch.Tensor | None:
    """The Fourier basis (p, p) float32 for modular tasks, or None."""
    from lab.analysis.fourier import fourier_basis

    return fourier_basis(task.p)[0].float() if task.name == "modular" else None


def _check_fourier(task, fourier: bool) -> None:
    if fourier and task.name != "modular":
        raise ValueError(f"fourier=True is for modular runs (numbers 0..p-1); this one is task {task.name!r}")


@torch.no_grad()
def qk_circuit(run_or_model, step: int | None = None, task=None, *, fourier: bool = False) -> QKCircuit:
    """Every head's full QK circuit (see the module docstring), token x token, and the read token's row.
    `fourier=True` (modular runs): number tokens only, both axes in the Fourier basis of Z_p."""
    from lab.analysis.fourier import fourier_basis

    target = _target(run_or_model, step, task, "the QK circuit")
    model, task = target.model, target.task
    _check_fourier(task, fourier)
    ids = _token_ids(task)
    query, keys = _residuals(model, task, ids)
    scores, read = [], []
    for block in model.blocks:
        attn, ln1 = block.attn, block.ln1
        x_keys = ln1(keys)  # (token, d_model)
        k = einsum(x_keys, attn.W_K, "token d_model, head d_model d_head -> head token d_head") + attn.b_K[:, None]
        q_all = einsum(x_keys, attn.W_Q, "token d_model, head d_model d_head -> head token d_head") + attn.b_Q[:, None]
        q_read = einsum(ln1(query[None])[0], attn.W_Q, "d_model, head d_model d_head -> head d_head") + attn.b_Q
        scale = math.sqrt(attn.W_Q.shape[-1])
        scores.append(einsum(q_all, k, "head query d_head, head key d_head -> head query key") / scale)
        read.append(einsum(q_read, k, "head d_head, head key d_head -> head key") / scale)
    scores, read = torch.stack(scores).float().cpu(), torch.stack(read).float().cpu()  # (layer, head, q, k), (layer, head, k)
    labels = task.token_labels(ids)
    if fourier:
        basis, names, _ = fourier_basis(task.p)
        basis = basis.float()
        numbers = [ids.index(n) for n in range(task.p)]
        scores = basis @ scores[:, :, numbers][:, :, :, numbers] @ basis.T  # (layer, head, component, component)
        read = read[:, :, numbers] @ basis.T
        labels = list(names)
    return QKCircuit(scores=scores, tokens=labels, read_scores=read, key_tokens=labels,
                     read_token=task.token_labels([read_token_id(task)])[0], basis="fourier" if fourier else "tokens",
                     step=target.step)


@torch.no_grad()
def ov_circuit(run_or_model, step: int | None = None, task=None, *, fourier: bool = False) -> OVCircuit:
    """Every head's full OV circuit (see the module docstring): source token x output.
    `fourier=True` (modular runs): number tokens and outputs in the Fourier basis of Z_p."""
    from lab.analysis.fourier import fourier_basis

    target = _target(run_or_model, step, task, "the OV circuit")
    model, task = target.model, target.task
    _check_fourier(task, fourier)
    ids = _token_ids(task)
    _, sources = _residuals(model, task, ids)
    W_U = model.W_U.detach().float()
    values = []
    for block in model.blocks:
        attn = block.attn
        v = einsum(block.ln1(sources), attn.W_V, "token d_model, head d_model d_head -> head token d_head")
        written = einsum(v, attn.W_O, "head token d_head, head d_head d_model -> head token d_model")
        values.append(written @ W_U)  # (head, token, output)
    values = torch.stack(values).float().cpu()  # (layer, head, source, output)
    labels, outputs = task.token_labels(ids), list(task.label_names)
    if fourier:
        basis, names, _ = fourier_basis(task.p)
        basis = basis.float()
        numbers = [ids.index(n) for n in range(task.p)]
        values = basis @ values[:, :, numbers] @ basis.T
        labels = outputs = list(names)
    return OVCircuit(values=values, tokens=labels, outputs=outputs, basis="fourier" if fourier else "tokens", step=target.step)


@torch.no_grad()
def composition_scores(run_or_model, step: int | None = None, task=None):
    """Q-, K- and V-composition scores (see the module docstring) of every head of an earlier layer with
    every head of a later layer: columns mode, earlier, later, earlier_layer, earlier_head, later_layer,
    later_head, score. Needs at least two layers."""
    import pandas as pd
    from transformer_lens import FactoredMatrix
    from transformer_lens.utilities.matrix import composition_scores as tl_composition_scores

    target = _target(run_or_model, step, task, "composition scores")
    model, cfg = target.model, target.model.cfg
    if cfg.n_layers < 2:
        raise ValueError(f"composition scores compare heads of different layers; this model has {cfg.n_layers} layer")
    stack = lambda name: torch.stack([getattr(block.attn, name).detach().float().cpu() for block in model.blocks])
    W_Q, W_K, W_V, W_O = stack("W_Q"), stack("W_K"), stack("W_V"), stack("W_O")  # (layer, head, ...)
    OV = FactoredMatrix(W_V, W_O)  # (layer, head, d_model, d_model)
    QK = FactoredMatrix(W_Q, W_K.transpose(-2, -1))
    rights = {"Q": QK, "K": QK.T, "V": OV}  # TransformerLens's mode names
    rows = []
    for mode, right in rights.items():
        scores = tl_composition_scores(OV, right)  # (layer, head, layer, head)
        for l1 in range(cfg.n_layers):
            for l2 in range(l1 + 1, cfg.n_layers):
                for h1 in range(cfg.n_heads):
                    for h2 in range(cfg.n_heads):
                        rows.append({"mode": mode, "earlier": f"L{l1}H{h1}", "later": f"L{l2}H{h2}",
                                     "earlier_layer": l1, "earlier_head": h1, "later_layer": l2, "later_head": h2,
                                     "score": float(scores[l1, h1, l2, h2])})
    frame = pd.DataFrame(rows)
    frame.attrs["step"] = target.step
    return frame
