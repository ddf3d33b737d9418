"""Activation patching: run a corrupted input, paste in one activation from the clean input, and see how
much of the clean answer comes back.

    result = lab.activation_patching(run)                      # the task's default pair ("a cab" vs "c cab")
    result = lab.activation_patching(run, "12 + 5 =", "13 + 5 =")
    result.positions        # site (resid_pre / attn_out / mlp_out), layer, position, token, value, restored
    result.heads            # site (z / q / k / v / pattern), layer, head, value, restored

Definitions follow TransformerLens's `transformer_lens.patching` exactly (tests/test_circuits.py checks
them against it on the exported TransformerBridge of the same weights):

- per layer x position, `get_act_patch_block_every`: `blocks.L.hook_resid_pre`, `hook_attn_out` and
  `hook_mlp_out` at one position replaced by the clean run's;
- per head, `get_act_patch_attn_head_all_pos_every`: the head's output `z`, queries, keys, values (at every
  position) or its whole attention pattern replaced by the clean run's.

`value` is the metric on the patched run: by default the logit difference at the task's read position
between the clean input's answer and the corrupted input's answer. `restored` is the usual normalisation
(value - corrupted) / (clean - corrupted): 1 means this activation alone brings the clean answer back, 0
that it does nothing. Every patch is one row of one batched `run_with_hooks` forward of the model.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from lab.analysis.ablation import private_target
from lab.analysis.probe import encode_input
from lab.models.architectures import require_attention

POSITION_SITES = ("resid_pre", "attn_out", "mlp_out")  # TransformerLens get_act_patch_block_every, in its order
HEAD_SITES = ("z", "q", "k", "v", "pattern")  # get_act_patch_attn_head_all_pos_every, in its order
METRICS = ("logit_diff", "prob")
ROWS_FLOATS = 1 << 24  # per batched chunk: rows * positions * width of the widest activation


@dataclass(frozen=True)
class PatchingResult:
    """What `lab.activation_patching` returns (see the module docstring). `tokens`: the clean input's token
    labels; `answer` / `wrong`: the clean and corrupted inputs' answers; `clean_value` / `corrupted_value`:
    the metric on the unpatched runs."""

    clean: str
    corrupted: str
    tokens: list[str]
    corrupted_tokens: list[str]
    answer: str
    wrong: str
    metric: str
    clean_value: float
    corrupted_value: float
    positions: object  # pandas DataFrame
    heads: object  # pandas DataFrame
    step: int | None

    def grid(self, site: str, column: str = "restored") -> torch.Tensor:
        """(layer, position) of one position site (resid_pre, attn_out, mlp_out), as TransformerLens returns it."""
        rows = self.positions[self.positions["site"] == site]
        if rows.empty:
            raise ValueError(f"no patching site {site!r} here; valid: {', '.join(sorted(set(self.positions['site'])))}")
        return torch.tensor(rows.pivot(index="layer", columns="position", values=column).to_numpy())

    def head_grid(self, site: str, column: str = "restored") -> torch.Tensor:
        """(layer, head) of one head site (z, q, k, v, pattern)."""
        rows = self.heads[self.heads["site"] == site]
        if rows.empty:
            raise ValueError(f"no head site {site!r}; valid: {', '.join(HEAD_SITES)}")
        return torch.tensor(rows.pivot(index="layer", columns="head", values=column).to_numpy())

    def top_heads(self, n: int = 3):
        """The n heads whose output (z) restores most, strongest first."""
        z = self.heads[self.heads["site"] == "z"]
        return z.reindex(z["restored"].abs().sort_values(ascending=False).index).head(n)

    def to_dict(self) -> dict:
        """Plain JSON-able data (the frames as lists of records); `PatchingResult.from_dict` reads it back."""
        data = {field: getattr(self, field) for field in self.__dataclass_fields__}
        data.update(positions=self.positions.to_dict("records"), heads=self.heads.to_dict("records"))
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "PatchingResult":
        import pandas as pd

        return cls(**{**data, "positions": pd.DataFrame(data["positions"]), "heads": pd.DataFrame(data["heads"])})

    def __repr__(self) -> str:
        top = ", ".join(f"L{r.layer}H{r.head} {r.restored:+.2f}" for r in self.top_heads().itertuples())
        return (f"PatchingResult({self.clean!r} -> {self.answer!r} vs {self.corrupted!r} -> {self.wrong!r}, "
                f"{self.metric} clean {self.clean_value:.3f} corrupted {self.corrupted_value:.3f}; "
                f"head outputs restoring most: {top}; step {self.step})")

    def _repr_html_(self) -> str:
        return (f"<p><b>Activation patching</b> at step {self.step}: <code>{self.clean}</code> ({self.answer}) "
                f"vs <code>{self.corrupted}</code> ({self.wrong}); {self.metric} clean {self.clean_value:.3f}, "
                f"corrupted {self.corrupted_value:.3f}</p>" + self.heads.to_html(index=False, float_format="%.3f"))


def hook_name(site: str, layer: int) -> str:
    """The TransformerLens hook a patching site reads: resid_pre -> blocks.L.hook_resid_pre, z -> blocks.L.attn.hook_z."""
    if site in POSITION_SITES:
        return f"blocks.{layer}.hook_{site}"
    return f"blocks.{layer}.attn.hook_{site}"


def metric_fn(task, metric: str, answer: int, wrong: int):
    """logits (batch, pos, vocab) -> (batch,): the metric read at the task's read position."""
    if metric not in METRICS:
        raise ValueError(f"unknown patching metric {metric!r}; valid: {', '.join(map(repr, METRICS))}")
    read = task.read_position
    if metric == "logit_diff":
        return lambda logits: logits[:, read, answer] - logits[:, read, wrong]
    return lambda logits: logits[:, read].softmax(-1)[:, answer]


def _patches(cfg, n_pos: int) -> list[tuple[str, int, int | None, int | None]]:
    sites = [s for s in POSITION_SITES if not (s == "mlp_out" and cfg.attn_only)]
    patches = [(site, layer, pos, None) for site in sites for layer in range(cfg.n_layers) for pos in range(n_pos)]
    patches += [(site, layer, None, head) for site in HEAD_SITES for layer in range(cfg.n_layers) for head in range(cfg.n_heads)]
    return patches


def patched_metrics(model, corrupted: torch.Tensor, clean_acts: dict, patches, metric) -> torch.Tensor:
    """The metric of the corrupted input (1, pos) with each patch applied on its own: one row per patch of a
    batched `run_with_hooks`. clean_acts: hook name -> the clean run's activation (1, ...)."""
    cfg, n_pos = model.cfg, corrupted.shape[1]
    width = max(cfg.n_heads * n_pos, 4 * cfg.d_model, cfg.d_mlp or 0)
    chunk = max(1, ROWS_FLOATS // (n_pos * width))
    values = []
    for start in range(0, len(patches), chunk):
        rows = patches[start : start + chunk]
        by_hook = defaultdict(list)
        for row, (site, layer, pos, head) in enumerate(rows):
            by_hook[hook_name(site, layer)].append((row, site, pos, head))

        def paste(act, hook):
            clean = clean_acts[hook.name][0]
            for row, site, pos, head in by_hook[hook.name]:
                if site == "pattern":
                    act[row, head] = clean[head]  # (head, query, key)
                elif head is not None:
                    act[row, :, head] = clean[:, head]  # (pos, head, d_head)
                else:
                    act[row, pos] = clean[pos]  # (pos, d_model)
            return act

        logits = model.run_with_hooks(corrupted.expand(len(rows), -1), fwd_hooks=[(name, paste) for name in by_hook])
        values.append(metric(logits).float().cpu())
    return torch.cat(values)


@torch.no_grad()
def activation_patching(run_or_model, clean: str | None = None, corrupted: str | None = None, *,
                        step: int | None = None, task=None, metric: str = "logit_diff") -> PatchingResult:
    """Activation patching from `clean` into `corrupted` (texts of the task; default: the task's
    `patching_pair()`, e.g. "a cab" vs "c cab", "12 + 5 =" vs "13 + 5 ="), for every layer x position of the
    residual stream, attention output and MLP output, and every head's output, queries, keys, values and
    pattern. `metric`: "logit_diff" (clean answer minus corrupted answer, the default) or "prob" (the clean
    answer's probability). Definitions as TransformerLens's `patching` module (see the module docstring)."""
    import pandas as pd

    target = private_target(run_or_model, step, task)
    require_attention(target.model, "activation patching")
    model, task = target.model, target.task
    if (clean is None) != (corrupted is None):
        raise ValueError("give both clean and corrupted texts, or neither (the task's default pair)")
    if clean is None:
        clean, corrupted = task.patching_pair()
    clean_tokens, corrupted_tokens = encode_input(target, clean), encode_input(target, corrupted)
    if clean_tokens.shape != corrupted_tokens.shape:
        raise ValueError(f"clean {clean!r} is {clean_tokens.shape[1]} tokens and corrupted {corrupted!r} is "
                         f"{corrupted_tokens.shape[1]}: patching pastes position by position, so give two inputs of one length")
    answer, wrong = task.label(clean_tokens[0]), task.label(corrupted_tokens[0])
    if answer == wrong and metric == "logit_diff":
        raise ValueError(f"clean {clean!r} and corrupted {corrupted!r} have the same answer "
                         f"{task.label_names[answer]!r}: the logit difference needs inputs with different answers")
    measure = metric_fn(task, metric, answer, wrong)
    patches = _patches(model.cfg, clean_tokens.shape[1])
    names = {hook_name(site, layer) for site, layer, _, _ in patches}
    device = model.device
    clean_logits, cache = model.run_with_cache(clean_tokens.to(device), names_filter=lambda name: name in names)
    clean_acts = {name: cache[name] for name in names}
    clean_value = float(measure(clean_logits))
    corrupted_value = float(measure(model(corrupted_tokens.to(device))))
    values = patched_metrics(model, corrupted_tokens.to(device), clean_acts, patches, measure).tolist()

    span = clean_value - corrupted_value
    labels = task.token_labels(clean_tokens[0].tolist())
    rows = [{"site": site, "layer": layer, "position": pos, "head": head, "value": value,
             "restored": (value - corrupted_value) / span if span else float("nan")}
            for (site, layer, pos, head), value in zip(patches, values)]
    frame = pd.DataFrame(rows)
    positions = frame[frame["head"].isna()].drop(columns="head").reset_index(drop=True)
    positions["position"] = positions["position"].astype(int)
    positions.insert(3, "token", [labels[p] for p in positions["position"]])
    heads = frame[frame["position"].isna()].drop(columns="position").reset_index(drop=True)
    heads["head"] = heads["head"].astype(int)
    heads.insert(1, "component", [f"L{layer}H{head}" for layer, head in zip(heads["layer"], heads["head"])])
    return PatchingResult(
        clean=clean, corrupted=corrupted, tokens=labels, corrupted_tokens=task.token_labels(corrupted_tokens[0].tolist()),
        answer=task.label_names[answer], wrong=task.label_names[wrong], metric=metric, clean_value=clean_value,
        corrupted_value=corrupted_value, positions=positions, heads=heads, step=target.step,
    )
