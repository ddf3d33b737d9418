"""How much gradient each layer of a transformer gets: the skip-connection question (issue 17).

`gradient_norms_per_layer(model, split, read_position)` runs one forward and backward pass of the
training loss (`lab.training.losses.task_loss`, mean cross-entropy over the targets) on a batch and
returns the L2 norm of the gradient of each layer's weights, from the input side to the output side:
"embed" (W_E, and W_pos when learned), "blocks.0" ... "blocks.{n-1}" (every parameter of that block:
LayerNorms, attention, MLP), "unembed" (the final LayerNorm, W_U, b_U). On a freshly built model this
is the "gradient norm per layer at initialisation" of the vanishing-gradient literature (Glorot &
Bengio 2010; He et al. 2016 for residual networks): with skip connections every block's weights get a
gradient of similar size; without them (`model.residual = false`) the gradient reaching the lower
blocks passes through every block above.

AdamW (what `lab train` uses) divides each weight's step by its own running gradient scale, so a
small gradient is not by itself a small update: what vanishes with depth is the signal, and the
updates of the lower blocks become noise-dominated.
"""

from __future__ import annotations

import torch

from lab.tasks.base import Split
from lab.training.losses import task_loss


def gradient_norms_per_layer(model, split: Split, read_position: int | None) -> dict[str, float]:
    """{"embed", "blocks.0", ..., "unembed": the gradient norm of that layer's weights} of the mean
    cross-entropy on `split` (read at `read_position`, or at every target when None), for a transformer
    with its own weights per block. The model's parameters' `.grad` are left as they were."""
    if getattr(model.cfg, "arch", "transformer") != "transformer":
        raise ValueError(f"gradient_norms_per_layer reads a transformer's blocks, not arch = {model.cfg.arch!r}")
    if model.cfg.shared_blocks:
        raise ValueError("gradient_norms_per_layer: with model.shared_blocks = true every layer has the same weights, "
                         "so there is one gradient for all of them, not one per layer")
    names, params = zip(*[(name, p) for name, p in model.named_parameters() if p.requires_grad])
    loss = task_loss(model.forward_at(split.tokens, read_position), split.labels)
    grads = torch.autograd.grad(loss, params)  # not .backward(): the caller's .grad stay untouched
    squares: dict[str, float] = {"embed": 0.0, **{f"blocks.{layer}": 0.0 for layer in range(model.cfg.n_layers)}, "unembed": 0.0}
    for name, grad in zip(names, grads):
        if name.startswith("blocks."):
            layer = "blocks." + name.split(".")[1]
        else:
            layer = "embed" if name in ("W_E", "W_pos") else "unembed"
        squares[layer] += float(grad.double().pow(2).sum())
    return {layer: square**0.5 for layer, square in squares.items()}
