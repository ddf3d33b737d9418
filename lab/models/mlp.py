"""A multi-layer perceptron over token embeddings, from scratch, with TransformerLens hook points.

The rung below the CNN and the transformer on the ladder. Every token is embedded (one `W_E`, shared
by all positions, as in the transformer), the sequence becomes one vector, and hidden layers read it:

- fixed-length inputs (modular: `[a, b, =]`, no padding): the embeddings are *concatenated*
  (n_ctx * d_model numbers), so the first layer has separate weights for a and for b. This is the
  model of Liu et al. 2022 and Gromov 2023, which groks modular addition too.
- inputs with padding (a_and_b): the embeddings of the real tokens are *averaged* (d_model numbers).
  The mean is attention with a fixed, uniform pattern, so this model differs from a one-layer
  transformer in one thing: its pooling weights cannot depend on the input. It reads strings of any
  length, but one `a` among L characters weighs 1/L in the mean.

`mlp_input = "concat"` or `"mean"` overrides the choice; concatenating a padded task gives the model a
window of n_ctx positions, each with its own weights, which never see a character beyond the lengths
it was trained on.

Hook points: `hook_embed` (batch, pos, d_model; zero on padding), `hook_pooled` (batch, d_in: the
concatenated or averaged embeddings), `layers.{i}.hook_pre` / `layers.{i}.hook_post` (batch, mlp_width).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens.hook_points import HookPoint

from lab.models.lookup import lookup_rows
from lab.models.pooled import PooledModel, masked_mean


class HiddenLayer(nn.Module):
    """x @ W_in + b_in, then the activation: (batch, d_in) -> (batch, width)."""

    def __init__(self, d_in: int, width: int, act_fn: str):
        super().__init__()
        self.W_in = nn.Parameter(torch.empty(d_in, width))
        self.b_in = nn.Parameter(torch.zeros(width))
        self.act_fn = {"relu": F.relu, "gelu": F.gelu}[act_fn]
        self.hook_pre = HookPoint()  # (batch, width)
        self.hook_post = HookPoint()  # (batch, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.hook_pre(F.linear(x, self.W_in.T, self.b_in))  # (batch, width)
        return self.hook_post(self.act_fn(pre))


class MLPClassifier(PooledModel):
    arch = "mlp"

    def __init__(self, cfg):
        super().__init__(cfg)
        # "auto": concatenate when every input has the same length (the task has no padding token)
        self.concat = cfg.mlp_input == "concat" or (cfg.mlp_input == "auto" and cfg.pad_token_id is None)
        d_in = cfg.n_ctx * cfg.d_model if self.concat else cfg.d_model
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))
        widths = [d_in] + [cfg.mlp_width] * cfg.mlp_layers
        self.layers = nn.ModuleList([HiddenLayer(a, b, cfg.act_fn) for a, b in zip(widths, widths[1:])])
        self.W_U = nn.Parameter(torch.empty(cfg.mlp_width, cfg.d_vocab_out))
        self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab_out))
        self.hook_embed = HookPoint()  # (batch, pos, d_model)
        self.hook_pooled = HookPoint()  # (batch, d_in)
        self.finish()

    def logits(self, tokens: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """tokens (batch, pos), real (batch, pos) -> logits (batch, d_vocab_out)."""
        n_pos = tokens.shape[1]
        embed = self.hook_embed(lookup_rows(self.W_E, tokens) * real[..., None].to(self.W_E.dtype))  # (batch, pos, d_model)
        if self.concat:
            if n_pos > self.cfg.n_ctx:
                raise ValueError(f"input of {n_pos} positions is longer than this MLP's window of {self.cfg.n_ctx}")
            # (batch, pos, d_model) -> right-padded with zeros to (batch, n_ctx, d_model) -> (batch, n_ctx * d_model)
            x = F.pad(embed, (0, 0, 0, self.cfg.n_ctx - n_pos)).flatten(1)
        else:
            x = masked_mean(embed, real)  # (batch, d_model)
        x = self.hook_pooled(x)
        for layer in self.layers:
            x = layer(x)  # (batch, mlp_width)
        return F.linear(x, self.W_U.T, self.b_U)  # x @ W_U + b_U: (batch, d_vocab_out)
