"""A 1-D convolutional network over token embeddings, from scratch, with TransformerLens hook points.

The rung between the MLP and the transformer. Each layer slides `cnn_channels` filters of
`cnn_kernel` positions along the sequence (the same weights at every position, like a transformer's
MLP, but each output reads a fixed window of neighbours instead of attending anywhere); a global
max over positions then turns any length into one vector of channels, which the unembedding reads.
So a CNN reads strings of any length, and "is there an `a` anywhere" is one filter's maximum.

Padding: embeddings and activations at padding positions are zeroed before every convolution, so
a string's answer does not depend on how much padding its batch has (zeros are also what the
convolution pads the ends with), and padding positions are left out of the max.

Hook points: `hook_embed` (batch, pos, d_model), `layers.{i}.hook_pre` / `layers.{i}.hook_post`
(batch, pos, cnn_channels), `hook_pooled` (batch, cnn_channels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens.hook_points import HookPoint

from lab.models.lookup import lookup_rows
from lab.models.pooled import PooledModel


class ConvLayer(nn.Module):
    """A 'same'-length 1-D convolution and the activation: (batch, pos, d_in) -> (batch, pos, channels)."""

    def __init__(self, d_in: int, channels: int, kernel: int, act_fn: str):
        super().__init__()
        self.W_conv = nn.Parameter(torch.empty(channels, d_in, kernel))  # PyTorch's conv1d layout: (out, in, kernel)
        self.b_conv = nn.Parameter(torch.zeros(channels))
        self.act_fn = {"relu": F.relu, "gelu": F.gelu}[act_fn]
        self.hook_pre = HookPoint()  # (batch, pos, channels)
        self.hook_post = HookPoint()  # (batch, pos, channels)

    def forward(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        x = x * real[..., None].to(x.dtype)  # padding reads as zeros
        # conv1d wants channels first: (batch, d_in, pos) -> (batch, channels, pos)
        # the bias is added apart from the convolution: conv1d's fused bias gradient is another reduction once
        # a sweep's ensemble vmaps it (a grouped convolution); added apart, a member's equals its standalone run's
        pre = F.conv1d(x.transpose(1, 2), self.W_conv, padding="same").transpose(1, 2) + self.b_conv
        return self.hook_post(self.act_fn(self.hook_pre(pre)))


class CNNClassifier(PooledModel):
    arch = "cnn"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))
        widths = [cfg.d_model] + [cfg.cnn_channels] * cfg.cnn_layers
        self.layers = nn.ModuleList([ConvLayer(a, b, cfg.cnn_kernel, cfg.act_fn) for a, b in zip(widths, widths[1:])])
        self.W_U = nn.Parameter(torch.empty(cfg.cnn_channels, cfg.d_vocab_out))
        self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab_out))
        self.hook_embed = HookPoint()  # (batch, pos, d_model)
        self.hook_pooled = HookPoint()  # (batch, channels)
        self.finish()

    def fan_in(self, name: str, param: torch.Tensor) -> int:
        if name == "W_conv":  # (out, in, kernel): each output sums in * kernel products
            return param.shape[1] * param.shape[2]
        return param.shape[0]

    def logits(self, tokens: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """tokens (batch, pos), real (batch, pos) -> logits (batch, d_vocab_out)."""
        x = self.hook_embed(lookup_rows(self.W_E, tokens))  # (batch, pos, d_model)
        for layer in self.layers:
            x = layer(x, real)  # (batch, pos, channels)
        pooled = self.hook_pooled(x.masked_fill(~real[..., None], float("-inf")).amax(1))  # max over real positions
        return F.linear(pooled, self.W_U.T, self.b_U)  # (batch, d_vocab_out)
