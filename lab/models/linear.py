"""A perceptron: logits are a linear function of the input, from scratch, with TransformerLens hook points.

The bottom rung of the ladder. Its features are the tokens themselves:

- fixed-length inputs (modular `[a, b, =]`, no padding): one-hot per position, concatenated
  (n_ctx * d_vocab features), so logits = W[0, a] + W[1, b] + W[2, =] + b_U: a table for a plus a
  table for b. That cannot represent a + b mod p, whose answer depends on a and b jointly.
- inputs with padding (a_and_b): the count of every token (d_vocab features), so it reads any
  length. "Contains an `a` and a `b`" is an AND of two thresholds on counts, which no linear function
  of the counts separates; this model is the baseline that shows it.

`linear_width = 0` (the default) is the plain perceptron, one weight per feature and class. With
`linear_width = N` the same kind of function is factorised through N hidden units without an
activation (features @ W_in @ W_U, a "deep linear network"): still linear in the features, so no width
changes what it can represent, but its parameter count can match another architecture's.

Hook points: `hook_features` (batch, n_features); with linear_width > 0 also `hook_hidden` (batch, N).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens.hook_points import HookPoint

from lab.models.pooled import PooledModel


class LinearClassifier(PooledModel):
    arch = "linear"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.one_hot = cfg.pad_token_id is None  # fixed length: a one-hot per position; else token counts
        n_features = cfg.n_ctx * cfg.d_vocab if self.one_hot else cfg.d_vocab
        width = cfg.linear_width
        self.W_in = nn.Parameter(torch.empty(n_features, width)) if width else None
        self.W_U = nn.Parameter(torch.empty(width or n_features, cfg.d_vocab_out))
        self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab_out))
        self.hook_features = HookPoint()  # (batch, n_features)
        self.hook_hidden = HookPoint() if width else None  # (batch, linear_width)
        self.finish()

    def logits(self, tokens: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """tokens (batch, pos), real (batch, pos) -> logits (batch, d_vocab_out)."""
        n_pos = tokens.shape[1]
        # one-hot as a comparison (F.one_hot checks its input's range, which torch.func.vmap cannot trace)
        vocab = torch.arange(self.cfg.d_vocab, device=tokens.device)
        one_hot = (tokens[..., None] == vocab).to(self.W_U.dtype) * real[..., None]  # (batch, pos, d_vocab)
        if self.one_hot:
            if n_pos > self.cfg.n_ctx:
                raise ValueError(f"input of {n_pos} positions is longer than this model's window of {self.cfg.n_ctx}")
            features = F.pad(one_hot, (0, 0, 0, self.cfg.n_ctx - n_pos)).flatten(1)  # (batch, n_ctx * d_vocab)
        else:
            features = one_hot.sum(1)  # token counts (batch, d_vocab); padding is not counted
        x = self.hook_features(features)
        if self.W_in is not None:
            x = self.hook_hidden(x @ self.W_in)  # (batch, linear_width): no activation, so still linear
        return F.linear(x, self.W_U.T, self.b_U)  # (batch, d_vocab_out)
