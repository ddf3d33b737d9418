"""What the models below the transformer share (lab/models/mlp.py, lab/models/cnn.py, lab/models/linear.py): one answer per input.

`PooledModel` is a TransformerLens `HookedRootModule` with the transformer's interface: `cfg`,
`forward(tokens, key_padding=None)` -> logits (batch, 1, d_vocab_out), `forward_at(tokens, position)`
-> (batch, d_vocab_out), `run_with_cache`, `device`. Its one output stands at "position 0" of a length-1
axis, so `logits[:, read_position]` reads it for a task's read position of 0 or -1 alike.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from transformer_lens import ActivationCache, HookedRootModule


class PooledModel(HookedRootModule):
    """Base of the MLP, CNN and linear models: one answer per input sequence.

    Subclasses build their weights in `__init__` (after calling this one), then call `self.finish()`,
    and define `logits(tokens, real) -> (batch, d_vocab_out)` where `real` (batch, pos) is True on the
    tokens that are not padding."""

    arch: ClassVar[str]

    def __init__(self, cfg):
        super().__init__()
        missing = [key for key in ("d_vocab", "d_vocab_out", "n_ctx", "causal") if getattr(cfg, key) is None]
        if missing:
            raise ValueError(f"model config lacks {', '.join(missing)}: build it from ExperimentConfig.resolve()")
        self.cfg = cfg

    def finish(self) -> None:
        self.init_weights(self.cfg.seed)
        self.setup()  # TransformerLens: names every HookPoint after its module path

    def init_weights(self, seed: int) -> None:
        """Embeddings ~ N(0, 1/d_model) (rows of norm about 1, like the transformer's), every other weight
        ~ N(0, 1/fan_in) so that activations stay of order 1 from layer to layer (LeCun); biases 0."""
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in self.named_parameters():
                leaf = name.rsplit(".", 1)[-1]
                if leaf == "W_E":
                    std = 1 / math.sqrt(param.shape[1])
                elif leaf.startswith("W_"):
                    std = 1 / math.sqrt(self.fan_in(leaf, param))
                else:
                    continue
                param.copy_(torch.randn(param.shape, generator=generator) * std)

    def fan_in(self, name: str, param: torch.Tensor) -> int:
        """Inputs summed into one output of weight `name`; weights are stored (inputs, outputs)."""
        return param.shape[0]

    def prepare_input(self, tokens: torch.Tensor, key_padding: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (pos,) or (batch, pos) -> (tokens (batch, pos), real (batch, pos): True where not padding).
        Padding is `key_padding` (True = padding) if given, else the tokens equal to `cfg.pad_token_id`."""
        if tokens.ndim == 1:
            tokens = tokens[None]  # (pos,) -> (1, pos)
        if key_padding is None:
            key_padding = tokens == self.cfg.pad_token_id if self.cfg.pad_token_id is not None else torch.zeros_like(tokens, dtype=torch.bool)
        return tokens, ~key_padding

    def forward(self, tokens: torch.Tensor, key_padding: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (batch, pos) -> logits (batch, 1, d_vocab_out): one answer per input, at the read position."""
        tokens, real = self.prepare_input(tokens, key_padding)
        return self.logits(tokens, real)[:, None]

    def forward_at(self, tokens: torch.Tensor, position: int, key_padding: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (batch, pos) -> logits (batch, d_vocab_out): the model's one answer. `position` is the
        task's read position (any position of the input is accepted: there is only one answer)."""
        n_pos = tokens.shape[-1]
        if not -n_pos <= position < n_pos:
            raise IndexError(f"position {position} is outside an input of {n_pos} positions")
        return self(tokens, key_padding)[:, 0]

    def run_with_cache(self, *args, **kwargs) -> tuple[torch.Tensor, ActivationCache]:
        """Like TransformerLens: `logits, cache = model.run_with_cache(tokens)`; `cache["layers.0.hook_post"]`."""
        logits, cache_dict = super().run_with_cache(*args, **kwargs)
        return logits, ActivationCache(cache_dict, self)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def masked_mean(x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """x (batch, pos, d), real (batch, pos) -> the mean over real positions (batch, d)."""
    weights = real.to(x.dtype)[..., None]  # (batch, pos, 1)
    return (x * weights).sum(1) / weights.sum(1).clamp(min=1)
