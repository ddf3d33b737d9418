"""The Curves page's figures: train and test loss or accuracy against step, and the weight norm."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from lab.plots.style import SPLIT_DASH, layout, over_training, run_color, run_colors, step_axis, value_axis_log

if TYPE_CHECKING:
    from lab.runs.run import Run


def ema_smooth(values: Sequence[float], weight: float) -> np.ndarray:
    """TensorBoard's smoothing: an exponential moving average, debiased so that the start is not pulled to 0.
    Non-finite values are passed through and do not enter the average."""
    values = np.asarray(values, dtype=float)
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    if weight == 0.0:
        return values.copy()
    out = np.empty_like(values)
    last, n = 0.0, 0
    for i, v in enumerate(values):
        if not math.isfinite(v):
            out[i] = v
            continue
        last = last * weight + (1.0 - weight) * v
        n += 1
        out[i] = last / (1.0 - weight**n)
    return out


def curves_figure(
    metrics: Mapping[str, pd.DataFrame],
    kind: str = "loss",
    *,
    log_x: bool = True,
    log_y: bool = True,
    smoothing: float = 0.0,
    events: Mapping[str, Mapping[str, int | None]] | None = None,
    colors: Mapping[str, str] | None = None,
) -> go.Figure:
    """Train (dotted) and test (solid) `kind` ("loss" or "accuracy") against step, one colour per run.

    `events[name]` may hold `memorize_step` and `grok_step`: a marker is drawn on the train curve at
    the memorize step and on the test curve at the grok step, at the metric's raw value there (the
    value that crossed the threshold), also when the curves are smoothed. On a log x axis, step 0 is left out.
    """
    if kind not in ("loss", "accuracy"):
        raise ValueError(f"kind must be 'loss' or 'accuracy', got {kind!r}")
    column = "loss" if kind == "loss" else "acc"
    colors = dict(colors or run_colors(metrics))
    events = events or {}
    fig = go.Figure()
    for name, df in metrics.items():
        if df is None or df.empty or "step" not in df:
            continue
        df = over_training(df, log_x)
        color = colors.get(name) or run_color(name)
        for split in ("train", "test"):
            col = f"{split}_{column}"
            if col not in df:
                continue
            raw = df[col].to_numpy(dtype=float)
            y = ema_smooth(raw, smoothing)
            label = f"{name} {split}"
            if smoothing > 0:
                fig.add_trace(go.Scatter(
                    x=df["step"], y=raw, mode="lines", line=dict(color=color, width=1, dash=SPLIT_DASH[split]),
                    opacity=0.25, hoverinfo="skip", showlegend=False, legendgroup=label, name=f"{label} (raw)",
                ))
            fig.add_trace(go.Scatter(
                x=df["step"], y=y, mode="lines", name=label, legendgroup=label,
                line=dict(color=color, width=2, dash=SPLIT_DASH[split]),
                customdata=raw,
                hovertemplate=(f"<b>{name}</b> {split} {kind}<br>step %{{x}}<br>"
                               + ("smoothed %{y:.6g}<br>raw %{customdata:.6g}" if smoothing > 0 else "%{y:.6g}")
                               + "<extra></extra>"),
            ))
        for event, split, symbol in (("memorize_step", "train", "circle"), ("grok_step", "test", "star")):
            step = (events.get(name) or {}).get(event)
            col = f"{split}_{column}"
            if step is None or col not in df or (log_x and step <= 0):
                continue
            at = df[df["step"] == step]
            if at.empty:
                continue
            value = float(at[col].iloc[0])  # the raw value: the one that crossed the threshold
            word = "memorized" if event == "memorize_step" else "grokked"
            fig.add_trace(go.Scatter(
                x=[step], y=[value], mode="markers", name=f"{name} {word}", legendgroup=f"{name} events",
                marker=dict(color=color, size=13 if symbol == "star" else 10, symbol=symbol,
                            line=dict(color="black", width=1)),
                hovertemplate=f"<b>{name}</b> {word} at step {step}: {split} {kind} {value:.4g}<extra></extra>",
            ))
    layout(fig, f"{'Loss' if kind == 'loss' else 'Accuracy'}: train (dotted) and test (solid)")
    step_axis(fig, log_x)
    if log_y:
        value_axis_log(fig, title_text=f"{kind} (log)")
    else:
        fig.update_yaxes(title_text=kind, type="linear")
    if kind == "accuracy" and not log_y:
        fig.update_yaxes(range=[-0.02, 1.02])
    return fig


def weight_norm_figure(metrics: Mapping[str, pd.DataFrame], *, log_x: bool = True,
                       colors: Mapping[str, str] | None = None) -> go.Figure:
    """Total weight norm against step, one line per run."""
    colors = dict(colors or run_colors(metrics))
    fig = go.Figure()
    for name, df in metrics.items():
        if df is None or df.empty or "weight_norm" not in df:
            continue
        df = over_training(df, log_x)
        fig.add_trace(go.Scatter(
            x=df["step"], y=df["weight_norm"], mode="lines", name=name, line=dict(color=colors.get(name), width=2),
            hovertemplate=f"<b>{name}</b><br>step %{{x}}<br>weight norm %{{y:.6g}}<extra></extra>",
        ))
    layout(fig, "Weight norm (L2 of all parameters)", height=320)
    step_axis(fig, log_x)
    fig.update_yaxes(title_text="‖θ‖₂")
    return fig


# --- one call from a notebook ------------------------------------------------------------------------


def _runs(runs: "Run | Sequence[Run]") -> list["Run"]:
    from lab.runs.run import Run

    runs = [runs] if isinstance(runs, Run) else list(runs)
    if not runs or not all(isinstance(r, Run) for r in runs):
        raise TypeError("pass a lab.Run or a list of them (lab.load_run('runs/NAME'))")
    return runs


def plot_curves(runs: "Run | Sequence[Run]", kind: str = "loss", *, log_x: bool = True, log_y: bool | None = None,
                smoothing: float = 0.0) -> go.Figure:
    """Train and test `kind` ("loss" or "accuracy") of one run or several, overlaid, with the
    memorised (●) and grokked (★) markers: the Curves page's figure. `log_y` defaults to log for
    loss and linear for accuracy."""
    runs = _runs(runs)
    log_y = (kind == "loss") if log_y is None else log_y
    return curves_figure({r.name: r.metrics for r in runs}, kind, log_x=log_x, log_y=log_y, smoothing=smoothing,
                         events={r.name: r.summary for r in runs}, colors=run_colors(r.name for r in runs))


def plot_weight_norm(runs: "Run | Sequence[Run]", *, log_x: bool = True) -> go.Figure:
    """The total weight norm of one run or several against step (the Curves page's third figure)."""
    runs = _runs(runs)
    return weight_norm_figure({r.name: r.metrics for r in runs}, log_x=log_x, colors=run_colors(r.name for r in runs))
