"""Training recipes that change how fast (or whether) a model groks.

- Grokfast (Lee et al. 2024, "Grokfast: Accelerated Grokking by Amplifying Slow Gradients",
  arXiv:2405.20233): low-pass filter the gradient over steps and add the slow part back,
  amplified, before the optimiser step. EMA: mu <- alpha*mu + (1-alpha)*g; g <- g + lamb*mu.
  MA: g <- g + lamb * mean(last `window` gradients).
- StableMax and ⊥Grad (Prieto et al. 2025, "Grokking at the edge of numerical stability",
  arXiv:2501.04697): StableMax replaces exp by s(x) = x+1 (x >= 0), 1/(1-x) (x < 0) so that the
  softmax cannot saturate into Softmax Collapse; ⊥Grad removes from each parameter's gradient its
  component along the parameter (the direction that only scales the logits up) and rescales the
  result to the original gradient norm.

Each is a pure function of tensors or a small object with explicit state, so a test can check it
against its definition and a resumed run can save and restore that state.
"""

from __future__ import annotations

from collections import deque

import torch
import torch.nn.functional as F

from lab.config import GradFilterConfig


def stablemax(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """StableMax probabilities: s(x) / sum s(x), with s(x) = x + 1 for x >= 0 and 1 / (1 - x) for x < 0."""
    s = torch.where(logits >= 0, logits + 1, 1 / (1 - logits.clamp(max=0)))
    return s / s.sum(dim=dim, keepdim=True)


def task_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str = "softmax", dtype=torch.float32) -> torch.Tensor:
    """Mean cross-entropy of (batch, vocab) logits against labels, via softmax or StableMax, in `dtype`."""
    logits = logits.to(dtype)
    if kind == "softmax":
        return F.cross_entropy(logits, labels)
    if kind == "stablemax":
        probs = stablemax(logits)
        return -probs.gather(-1, labels[:, None]).log().mean()
    raise ValueError(f"unknown loss {kind!r}; valid: 'softmax', 'stablemax'")


@torch.no_grad()
def orthogonalize_gradients(params) -> None:
    """⊥Grad, in place: g <- (g - (g·w / w·w) w) * |g| / |g_perp| for each parameter w with gradient g."""
    for w in params:
        g = w.grad
        if g is None:
            continue
        w_flat, g_flat = w.reshape(-1).double(), g.reshape(-1).double()
        w_sq = w_flat @ w_flat
        if w_sq == 0:
            continue
        g_perp = g_flat - (g_flat @ w_flat) / w_sq * w_flat
        perp_norm = g_perp.norm()
        if perp_norm == 0:
            continue
        g.copy_((g_perp * (g_flat.norm() / perp_norm)).view_as(g).to(g.dtype))


class GradFilter:
    """Grokfast's gradient filter, applied to `.grad` in place after backward, before the optimiser.

    Its state (the EMA, or the last `window` gradients) is part of a checkpoint's resume state.
    """

    def __init__(self, config: GradFilterConfig, named_params: list[tuple[str, torch.nn.Parameter]]):
        self.config = config
        self.named_params = named_params
        self.ema: dict[str, torch.Tensor] = {}
        self.history: dict[str, deque] = {name: deque(maxlen=config.window) for name, _ in named_params}

    @torch.no_grad()
    def apply(self) -> None:
        cfg = self.config
        for name, param in self.named_params:
            if param.grad is None:
                continue
            g = param.grad
            if cfg.kind == "ema":
                if name not in self.ema:
                    self.ema[name] = g.detach().clone()  # Grokfast initialises the EMA with the first gradient
                else:
                    self.ema[name].mul_(cfg.alpha).add_(g, alpha=1 - cfg.alpha)
                g.add_(self.ema[name], alpha=cfg.lamb)
            elif cfg.kind == "ma":
                history = self.history[name]
                history.append(g.detach().clone())
                # Grokfast's MA filter waits until the window is full before amplifying.
                if len(history) == cfg.window:
                    g.add_(torch.stack(list(history)).mean(0), alpha=cfg.lamb)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        state = {f"ema.{name}": t for name, t in self.ema.items()}
        for name, history in self.history.items():
            if history:
                state[f"ma.{name}"] = torch.stack(list(history))
        return state

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        for key, tensor in state.items():
            kind, name = key.split(".", 1)
            if kind == "ema":
                self.ema[name] = tensor.clone()
            elif kind == "ma":
                self.history[name] = deque(tensor.unbind(0), maxlen=self.config.window)
