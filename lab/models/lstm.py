"""An LSTM over token embeddings, from scratch, with TransformerLens hook points.

The recurrent rung of the ladder: embed each token (`W_E`), run a stack of LSTM layers left to right
over the sequence, unembed the last layer's hidden state (`W_U`, `b_U`). Where the transformer's
attention reads any earlier position directly, an LSTM carries everything it knows in a fixed-size
state (h, c) from one token to the next; there is no position embedding, so it reads any length.

Each layer is PyTorch's `torch.nn.LSTM` (Hochreiter & Schmidhuber 1997 with a forget gate; PyTorch's
equations, gate order i, f, g, o): at position t, from the layer's input x_t and the state (h, c),

    i, f, g, o = split(x_t @ weight_ih.T + bias_ih + h @ weight_hh.T + bias_hh, 4)
    c = sigmoid(f) * c + sigmoid(i) * tanh(g)
    h = sigmoid(o) * tanh(c)

with nn.LSTM's parameter layout (`layers.{l}.weight_ih` is nn.LSTM's `weight_ih_l{l}`, and so on:
`LSTMModel.torch_lstm()` copies the weights into an nn.LSTM, which computes the same numbers) and
its initial weights, U(-1/sqrt(hidden), 1/sqrt(hidden)). It is written out here rather than calling
nn.LSTM because nn.LSTM's fused kernel (aten::lstm) has no batching rule for `torch.func.vmap`, which
is how a sweep stacks its members (lab/sweeps/ensemble.py), and because it could not skip padding.

Padding: at a padding position the state is carried over unchanged, so the LSTM reads only the real
tokens, wherever the padding is, and an answer does not depend on how much padding its batch has.

What the model answers depends on the task (`cfg.causal`):
- causal tasks (modular `[a, b, =]`, next-token tasks such as reverse or text): the logits at
  position t read the state after tokens 0..t, so `forward` gives every position's logits
  (batch, pos, d_vocab_out), as the transformer does, and a language model trains on all of them.
- non-causal tasks (a_and_b, read at position 0, a CLS token at the start): a left-to-right LSTM has
  seen only CLS at position 0, so the answer is read from the state after the last real token
  (the whole string: an encoder's final state). Like the pooled models, `forward` gives that one
  answer as (batch, 1, d_vocab_out), which `logits[:, read_position]` reads for 0 or -1 alike.

Hook points: `hook_embed` (batch, pos, d_model), `layers.{l}.hook_h` and `layers.{l}.hook_c`
(batch, pos, lstm_hidden): each layer's hidden and cell state after every position. A hook on `hook_h`
changes what the next layer and the unembedding read, not the layer's own recurrence (which runs
position by position inside the layer).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformer_lens.hook_points import HookPoint

from lab.models.lookup import lookup_rows
from lab.models.pooled import PooledModel


class LSTMLayer(nn.Module):
    """One LSTM layer, nn.LSTM's arithmetic and parameters: (batch, pos, d_in) -> (batch, pos, hidden)."""

    def __init__(self, d_in: int, hidden: int):
        super().__init__()
        # nn.LSTM's layout: the four gates' weights stacked in the order input, forget, cell, output
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden, d_in))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden, hidden))
        self.bias_ih = nn.Parameter(torch.empty(4 * hidden))
        self.bias_hh = nn.Parameter(torch.empty(4 * hidden))
        self.hook_h = HookPoint()  # (batch, pos, hidden)
        self.hook_c = HookPoint()  # (batch, pos, hidden)

    def forward(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """x (batch, pos, d_in), real (batch, pos; False on padding) -> h (batch, pos, hidden)."""
        batch, n_pos, _ = x.shape
        hidden = self.weight_hh.shape[1]
        # the input's share of every gate at every position in one matmul: (batch, pos, 4 * hidden)
        from_input = x @ self.weight_ih.T + (self.bias_ih + self.bias_hh)
        h = c = x.new_zeros(batch, hidden)  # nn.LSTM's default initial state
        hs, cs = [], []
        for t in range(n_pos):
            gates = from_input[:, t] + h @ self.weight_hh.T  # (batch, 4 * hidden)
            i, f, g, o = gates.chunk(4, dim=-1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h_new = torch.sigmoid(o) * torch.tanh(c_new)
            keep = real[:, t, None]  # (batch, 1): padding carries the state over
            h, c = torch.where(keep, h_new, h), torch.where(keep, c_new, c)
            hs.append(h)
            cs.append(c)
        self.hook_c(torch.stack(cs, dim=1))  # (batch, pos, hidden), for caches and probes
        return self.hook_h(torch.stack(hs, dim=1))  # (batch, pos, hidden)


class LSTMModel(PooledModel):
    """Token embedding -> `lstm_layers` LSTM layers of `lstm_hidden` units -> unembedding.

    Shares the pooled models' plumbing (`PooledModel`: the config checks, seeded init, padding from
    `pad_token_id`, `run_with_cache`, `device`); unlike them it answers at every position on causal tasks."""

    arch = "lstm"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))
        widths = [cfg.d_model] + [cfg.lstm_hidden] * cfg.lstm_layers
        self.layers = nn.ModuleList([LSTMLayer(a, b) for a, b in zip(widths, widths[1:])])
        self.W_U = nn.Parameter(torch.empty(cfg.lstm_hidden, cfg.d_vocab_out))
        self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab_out))
        self.hook_embed = HookPoint()  # (batch, pos, d_model)
        self.finish()

    def init_weights(self, seed: int) -> None:
        """W_E and W_U as the other rungs (`PooledModel.init_weights`); every LSTM weight and bias as
        nn.LSTM initialises them, U(-1/sqrt(hidden), 1/sqrt(hidden)); b_U 0."""
        super().init_weights(seed)
        generator = torch.Generator().manual_seed(seed + 1)  # its own stream: W_E and W_U do not depend on the LSTM's size
        bound = 1 / math.sqrt(self.cfg.lstm_hidden)
        with torch.no_grad():
            for layer in self.layers:
                for param in layer.parameters():
                    param.copy_(torch.rand(param.shape, generator=generator) * 2 * bound - bound)

    def hidden_states(self, tokens: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """tokens (batch, pos), real (batch, pos) -> the last layer's h after every position (batch, pos, hidden)."""
        x = self.hook_embed(lookup_rows(self.W_E, tokens))  # (batch, pos, d_model)
        for layer in self.layers:
            x = layer(x, real)
        return x

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., hidden) -> logits (..., d_vocab_out)."""
        return h @ self.W_U + self.b_U

    def forward(self, tokens: torch.Tensor, key_padding: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (batch, pos) -> logits: (batch, pos, d_vocab_out) on a causal task (position t has read
        tokens 0..t); (batch, 1, d_vocab_out) on a non-causal one (the answer after the whole input)."""
        tokens, real = self.prepare_input(tokens, key_padding)
        h = self.hidden_states(tokens, real)  # (batch, pos, hidden)
        if not self.cfg.causal:
            h = h[:, -1:]  # the state after the last real token (padding carried it to the end): (batch, 1, hidden)
        return self.unembed(h)

    def forward_at(self, tokens: torch.Tensor, position: int | None, key_padding: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (batch, pos) -> logits (batch, d_vocab_out) at `position`, `forward(tokens)[:, position]`
        (on a causal task only tokens up to `position` are read: the rest cannot change it; on a non-causal
        task any position is the one answer). `position=None`: every position, `forward(tokens)`."""
        if position is None:
            if not self.cfg.causal:
                raise ValueError("this LSTM's task is not causal: it gives one answer per input, read it at the "
                                 "task's read position (a target at every position needs a causal task)")
            return self(tokens, key_padding)
        n_pos = tokens.shape[-1]
        if not -n_pos <= position < n_pos:
            raise IndexError(f"position {position} is outside an input of {n_pos} positions")
        if not self.cfg.causal:
            return self(tokens, key_padding)[:, 0]
        end = position % n_pos + 1  # positions 0..position
        tokens, real = self.prepare_input(tokens, key_padding)
        return self.unembed(self.hidden_states(tokens[:, :end], real[:, :end])[:, -1])

    def torch_lstm(self) -> nn.LSTM:
        """A `torch.nn.LSTM` (batch_first) holding this model's LSTM weights: the same function on unpadded input."""
        lstm = nn.LSTM(self.cfg.d_model, self.cfg.lstm_hidden, num_layers=self.cfg.lstm_layers, batch_first=True)
        lstm = lstm.to(self.W_E.device, self.W_E.dtype)
        with torch.no_grad():
            for index, layer in enumerate(self.layers):
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    getattr(lstm, f"{name}_l{index}").copy_(getattr(layer, name))
        return lstm
