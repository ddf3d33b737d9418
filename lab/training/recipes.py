"""Training recipes that change how fast (or whether) a model groks.

- Grokfast (Lee et al. 2024, "Grokfast: Accelerated Grokking by Amplifying Slow Gradients",
  arXiv:2405.20233): low-pass filter the gradient over steps and add the slow part back,
  amplified, before the optimiser step. EMA: mu <- alpha*mu + (1-alpha)*g; g <- g + lamb*mu.
  MA: g <- g + lamb * mean(last `window` gradients).
- ⊥Grad (Prieto et al. 2025, "Grokking at the edge of numerical stability", arXiv:2501.04697):
  removes from each parameter's gradient its component along the parameter (the direction that
  only scales the logits up) and rescales the result to the original gradient norm. Its companion,
  the StableMax loss, is in `lab.training.losses`.
- `fastest` (RECIPES): no new update rule but AdamW settings found by searching lr, weight decay,
  Adam's betas, Grokfast, ⊥Grad/StableMax and Omnigrok's init scale (Liu, Michaud & Tegmark 2022,
  arXiv:2210.01117) with the lab's sweeps: experiments/nanda_fastest.toml.

Each is a pure function of tensors or a small object with explicit state, so a test can check it
against its definition and a resumed run can save and restore that state.
"""

from __future__ import annotations

import torch

from lab.config import GradFilterConfig


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
    """Grokfast's gradient filter (Lee et al. 2024, arXiv:2405.20233, Algorithms 1 and 2), applied to
    `.grad` in place after backward, before the optimiser step.

    - EMA (`kind = "ema"`): mu <- alpha * mu + (1 - alpha) * g, then g <- g + lamb * mu. As in the
      paper's code, mu starts at the first gradient (alpha * g + (1 - alpha) * g = g).
    - MA (`kind = "ma"`): g <- g + lamb * mean(the last `window` raw gradients, g included). As in the
      paper's code (`warmup=True`), nothing is added until `window` gradients have been seen.
      The mean is kept as a running float64 sum over a ring buffer, so a step costs O(parameters),
      not O(window * parameters).

    Its state (the EMA, or the ring of the last `window` gradients and their sum) is part of a
    checkpoint's resume state, so a resumed run continues bit for bit.
    """

    def __init__(self, config: GradFilterConfig, named_params: list[tuple[str, torch.nn.Parameter]]):
        if config.kind not in ("ema", "ma"):
            raise ValueError(f"GradFilter kind must be 'ema' or 'ma', got {config.kind!r}")
        self.config = config
        self.named_params = named_params
        self.ema: dict[str, torch.Tensor] = {}
        # MA: per parameter a ring (window, *shape) of raw gradients, oldest at `self.count % window`
        # once full, and the float64 sum of what the ring holds.
        self.ring: dict[str, torch.Tensor] = {}
        self.ring_sum: dict[str, torch.Tensor] = {}
        self.count = 0  # gradients seen by the MA filter (capped at nothing; the ring index is count % window)

    @torch.no_grad()
    def apply(self) -> None:
        cfg = self.config
        live = [(name, p.grad) for name, p in self.named_params if p.grad is not None]
        if cfg.kind == "ema":
            if not self.ema:
                self.ema = {name: g.detach().clone() for name, g in live}
            else:
                mus = [self.ema[name] for name, _ in live]
                grads = [g for _, g in live]
                torch._foreach_mul_(mus, cfg.alpha)
                torch._foreach_add_(mus, grads, alpha=1 - cfg.alpha)
            torch._foreach_add_([g for _, g in live], [self.ema[name] for name, _ in live], alpha=cfg.lamb)
        else:
            window, slot = cfg.window, self.count % cfg.window
            for name, g in live:
                if name not in self.ring:
                    self.ring[name] = torch.zeros((window, *g.shape), dtype=g.dtype, device=g.device)
                    self.ring_sum[name] = torch.zeros(g.shape, dtype=torch.float64, device=g.device)
                ring, total = self.ring[name], self.ring_sum[name]
                if self.count >= window:  # the oldest gradient leaves the window
                    total.sub_(ring[slot])
                ring[slot].copy_(g)
                total.add_(g)
            self.count += 1
            if self.count >= window:
                for name, g in live:
                    g.add_((self.ring_sum[name] / window).to(g.dtype), alpha=cfg.lamb)

    def history(self, name: str) -> torch.Tensor:
        """The MA filter's stored gradients of one parameter, oldest first: (min(count, window), *shape)."""
        ring, window = self.ring[name], self.config.window
        if self.count < window:
            return ring[: self.count]
        slot = self.count % window
        return torch.cat([ring[slot:], ring[:slot]])

    def state_tensors(self) -> dict[str, torch.Tensor]:
        state = {f"ema.{name}": t for name, t in self.ema.items()}
        for name in self.ring:
            state[f"ma.{name}"] = self.history(name)
            state[f"masum.{name}"] = self.ring_sum[name]
        if self.ring:
            state["count"] = torch.tensor(self.count, dtype=torch.int64)
        return state

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        if "count" in state:
            self.count = int(state["count"])
        window = self.config.window
        for key, tensor in state.items():
            kind, _, name = key.partition(".")
            if kind == "ema":
                self.ema[name] = tensor.clone()
            elif kind == "ma":
                ring = torch.zeros((window, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
                n = tensor.shape[0]
                # history is oldest first; put it back where the ring index expects it
                slots = [(self.count - n + i) % window for i in range(n)]
                ring[slots] = tensor
                self.ring[name] = ring
                if f"masum.{name}" in state:
                    self.ring_sum[name] = state[f"masum.{name}"].clone()
                else:
                    self.ring_sum[name] = tensor.double().sum(0)


# --- named recipes -------------------------------------------------------------------------------
# Each recipe is a set of `--set` overrides of an experiment's [train] table (and, for `fastest`, of
# model.init_scale, which only rescales the initial weights); `lab train EXPERIMENT
# --set ...` with them, or the experiments/nanda_<recipe>.toml files, train with it, and `lab bench`
# times every recipe on modadd_quick and nanda_2023. "baseline" is the experiment as published.

RECIPES: dict[str, dict[str, object]] = {
    # The experiment's own optimiser settings (Nanda et al. 2023: AdamW lr 1e-3, wd 1, full batch).
    "baseline": {},
    # Grokfast EMA with the paper's defaults (alpha 0.98, lambda 2).
    "grokfast_ema": {"train.grad_filter.kind": "ema", "train.grad_filter.alpha": 0.98, "train.grad_filter.lamb": 2.0},
    # Grokfast MA with the paper's defaults (window 100, lambda 5).
    "grokfast_ma": {"train.grad_filter.kind": "ma", "train.grad_filter.window": 100, "train.grad_filter.lamb": 5.0},
    # Higher learning rate and weight decay, nothing else: lr * wd 9x the paper's (`lab bench` and the
    # README give its steps to grok beside the other recipes').
    "high_lr_wd": {"train.lr": 3e-3, "train.weight_decay": 3.0},
    # Prieto et al. 2025: StableMax cross-entropy and the ⊥Grad update.
    "stablemax_orthograd": {"train.loss": "stablemax", "train.orthograd": True},
    # The fastest grokking found by a search with the lab's sweeps on the Nanda split
    # (experiments/nanda_fastest.toml, whose comments give every family tried): lr·wd 30x the paper's,
    # weights started at half the standard init (Omnigrok's alpha = 0.5: closer to the small weight norm
    # that generalises), and Adam's beta2 0.99 (at 0.98 a loss spike kept one seed in five from grokking
    # by step 330; at 0.95 test accuracy reached 0.97 and collapsed). Seeds 0-4 grok at 110-240 steps
    # (median 150; high_lr_wd: 750), each after memorising.
    "fastest": {"train.lr": 1e-2, "train.weight_decay": 3.0, "train.betas": [0.9, 0.99], "model.init_scale": 0.5},
}


def recipe_overrides(name: str) -> list[str]:
    """A named recipe as `--set` assignments, e.g. ['train.grad_filter.kind="ema"', ...]."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; valid recipes: {', '.join(RECIPES)}")
    import json

    return [f"{key}={json.dumps(value)}" for key, value in RECIPES[name].items()]
