"""Plotly figure builders for the dashboard: plain functions of DataFrames and tensors, no Streamlit,
so that tests (and a notebook) can call them directly.
"""

from __future__ import annotations

import math
import zlib
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

PALETTE = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e",
    "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
]
ATTENTION_SCALE = "Viridis"
SPLIT_DASH = {"train": "dot", "test": "solid"}


def run_color(name: str) -> str:
    """A colour that depends only on the run's name, so a run keeps its colour on every page and selection."""
    return PALETTE[zlib.crc32(name.encode()) % len(PALETTE)]


def run_colors(names: Iterable[str]) -> dict[str, str]:
    """Stable colours for several runs; runs whose hashed colour is taken get the next free one
    (in name order, so the assignment does not depend on the order the runs were picked)."""
    colors: dict[str, str] = {}
    used: set[str] = set()
    for name in sorted(set(names)):
        start = PALETTE.index(run_color(name))
        for k in range(len(PALETTE)):
            color = PALETTE[(start + k) % len(PALETTE)]
            if color not in used or len(used) >= len(PALETTE):
                break
        colors[name] = color
        used.add(color)
    return colors


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


def _layout(fig: go.Figure, title: str, height: int = 420) -> go.Figure:
    fig.update_layout(
        title=dict(text=title, x=0.01, xanchor="left"),
        height=height,
        margin=dict(l=60, r=20, t=60, b=50),
        legend=dict(orientation="h", yanchor="top", y=-0.18, xanchor="left", x=0),
        template="plotly_white",
    )
    return fig


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
    the memorize step and on the test curve at the grok step. On a log x axis, step 0 is left out.
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
        df = df.sort_values("step")
        if log_x:
            df = df[df["step"] > 0]
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
            y = ema_smooth(df[col].to_numpy(dtype=float), smoothing)[df["step"].to_numpy() == step][0]
            word = "memorized" if event == "memorize_step" else "grokked"
            fig.add_trace(go.Scatter(
                x=[step], y=[y], mode="markers", name=f"{name} {word}", legendgroup=f"{name} events",
                marker=dict(color=color, size=13 if symbol == "star" else 10, symbol=symbol,
                            line=dict(color="black", width=1)),
                hovertemplate=f"<b>{name}</b> {word} at step {step}<extra></extra>",
            ))
    _layout(fig, f"{'Loss' if kind == 'loss' else 'Accuracy'}: train (dotted) and test (solid)")
    fig.update_xaxes(title_text="step" + (" (log)" if log_x else ""), type="log" if log_x else "linear")
    fig.update_yaxes(title_text=kind + (" (log)" if log_y else ""), type="log" if log_y else "linear",
                     exponentformat="power" if log_y else "B")
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
        df = df.sort_values("step")
        if log_x:
            df = df[df["step"] > 0]
        fig.add_trace(go.Scatter(
            x=df["step"], y=df["weight_norm"], mode="lines", name=name, line=dict(color=colors.get(name), width=2),
            hovertemplate=f"<b>{name}</b><br>step %{{x}}<br>weight norm %{{y:.6g}}<extra></extra>",
        ))
    _layout(fig, "Weight norm (L2 of all parameters)", height=320)
    fig.update_xaxes(title_text="step" + (" (log)" if log_x else ""), type="log" if log_x else "linear")
    fig.update_yaxes(title_text="‖θ‖₂")
    return fig


def _index_axis(labels: Sequence[str]) -> dict:
    """Tick labels for a numeric axis: tokens repeat ("a", "a"), so the axis must not be categorical."""
    n = len(labels)
    step = max(1, math.ceil(n / 60))  # at most ~60 labels per axis stay readable
    ticks = list(range(0, n, step))
    return dict(tickmode="array", tickvals=ticks, ticktext=[labels[i] for i in ticks], tickangle=0)


def attention_grid_figure(pattern, tokens: Sequence[str], title: str = "Attention") -> go.Figure:
    """One heatmap per (layer, head) of a (layer, head, query, key) pattern, rows queries, columns keys,
    both labelled with the tokens; colour scale fixed to 0..1."""
    pattern = np.asarray(pattern.detach().cpu() if hasattr(pattern, "detach") else pattern, dtype=float)
    n_layers, n_heads, n_q, n_k = pattern.shape
    tokens = list(tokens)
    fig = make_subplots(
        rows=n_layers, cols=n_heads, horizontal_spacing=0.06, vertical_spacing=0.12 if n_layers > 1 else 0.05,
        subplot_titles=[f"L{layer} H{head}" for layer in range(n_layers) for head in range(n_heads)],
    )
    qlabels = [f"{i}:{t}" for i, t in enumerate(tokens[:n_q])]
    klabels = [f"{i}:{t}" for i, t in enumerate(tokens[:n_k])]
    for layer in range(n_layers):
        for head in range(n_heads):
            fig.add_trace(go.Heatmap(
                z=pattern[layer, head], x=list(range(n_k)), y=list(range(n_q)),
                zmin=0.0, zmax=1.0, colorscale=ATTENTION_SCALE, showscale=(layer == 0 and head == 0),
                colorbar=dict(title="attention", len=0.8),
                customdata=np.array([[f"{qlabels[q]} → {klabels[k]}" for k in range(n_k)] for q in range(n_q)]),
                hovertemplate=f"L{layer}H{head}<br>query→key %{{customdata}}<br>attention %{{z:.4f}}<extra></extra>",
                name=f"L{layer}H{head}",
            ), row=layer + 1, col=head + 1)
            fig.update_xaxes(title_text="key" if layer == n_layers - 1 else None, **_index_axis(tokens[:n_k]),
                             row=layer + 1, col=head + 1)
            fig.update_yaxes(title_text="query" if head == 0 else None, autorange="reversed",
                             **_index_axis(tokens[:n_q]), row=layer + 1, col=head + 1)
    per_head = 300 if n_heads <= 2 else 260
    fig.update_layout(title=dict(text=title, x=0.01), height=80 + per_head * n_layers + 40,
                      margin=dict(l=60, r=20, t=80, b=50), template="plotly_white")
    return fig


def modular_grid_figure(grid, title: str = "Attention from '=' to 'a' over all (a, b)") -> go.Figure:
    """One p-by-p heatmap per (layer, head) of a (layer, head, p, p) tensor: rows a, columns b, 0..1."""
    grid = np.asarray(grid.detach().cpu() if hasattr(grid, "detach") else grid, dtype=float)
    n_layers, n_heads, p, _ = grid.shape
    fig = make_subplots(rows=n_layers, cols=n_heads, horizontal_spacing=0.05, vertical_spacing=0.1,
                        subplot_titles=[f"L{layer} H{head}" for layer in range(n_layers) for head in range(n_heads)])
    for layer in range(n_layers):
        for head in range(n_heads):
            fig.add_trace(go.Heatmap(
                z=grid[layer, head], zmin=0.0, zmax=1.0, colorscale=ATTENTION_SCALE,
                showscale=(layer == 0 and head == 0), colorbar=dict(title="attention", len=0.8),
                hovertemplate=f"L{layer}H{head}<br>a %{{y}}, b %{{x}}<br>attention = → a %{{z:.4f}}<extra></extra>",
                name=f"L{layer}H{head}",
            ), row=layer + 1, col=head + 1)
            fig.update_xaxes(title_text="b", row=layer + 1, col=head + 1)
            fig.update_yaxes(title_text="a" if head == 0 else None, autorange="reversed", row=layer + 1, col=head + 1)
    fig.update_layout(title=dict(text=title, x=0.01), height=80 + 300 * n_layers, template="plotly_white",
                      margin=dict(l=60, r=20, t=80, b=50))
    return fig


def progress_losses_figure(df: pd.DataFrame, *, log_x: bool = False) -> go.Figure:
    """Train, test, restricted and excluded loss over training (Nanda et al. 2023, fig. 7)."""
    fig = go.Figure()
    styles = {"train_loss": ("train loss", "#1f77b4", "dot"), "test_loss": ("test loss", "#d62728", "solid"),
              "restricted_loss": ("restricted loss", "#2ca02c", "solid"),
              "excluded_loss": ("excluded loss", "#9467bd", "dash")}
    df = df.sort_values("step")
    if log_x:
        df = df[df["step"] > 0]
    for col, (label, color, dash) in styles.items():
        if col in df:
            fig.add_trace(go.Scatter(x=df["step"], y=df[col], mode="lines+markers", name=label,
                                     line=dict(color=color, dash=dash, width=2), marker=dict(size=4),
                                     hovertemplate=f"{label}<br>step %{{x}}<br>%{{y:.6g}}<extra></extra>"))
    _layout(fig, "Restricted and excluded loss, with train and test loss")
    fig.update_xaxes(title_text="step", type="log" if log_x else "linear")
    fig.update_yaxes(title_text="loss (log)", type="log", exponentformat="power", dtick=1)
    return fig


def progress_measures_figure(df: pd.DataFrame, *, log_x: bool = False) -> go.Figure:
    """Gini coefficients (left axis) and the sum of squared weights (right axis) over training."""
    df = df.sort_values("step")
    if log_x:
        df = df[df["step"] > 0]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    for col, label, color in (("gini_embed", "Gini of W_E Fourier norms", "#ff7f0e"),
                              ("gini_neuron_logit", "Gini of neuron-logit Fourier norms", "#17becf")):
        if col in df:
            fig.add_trace(go.Scatter(x=df["step"], y=df[col], mode="lines+markers", name=label,
                                     line=dict(color=color, width=2), marker=dict(size=4),
                                     hovertemplate=f"{label}<br>step %{{x}}<br>%{{y:.4f}}<extra></extra>"),
                          secondary_y=False)
    if "sum_sq_weights" in df:
        fig.add_trace(go.Scatter(x=df["step"], y=df["sum_sq_weights"], mode="lines", name="sum of squared weights",
                                 line=dict(color="#7f7f7f", width=2, dash="dash"),
                                 hovertemplate="sum of squared weights<br>step %{x}<br>%{y:.6g}<extra></extra>"),
                      secondary_y=True)
    _layout(fig, "Gini coefficients and total squared weights")
    fig.update_xaxes(title_text="step", type="log" if log_x else "linear")
    fig.update_yaxes(title_text="Gini", range=[0, 1], secondary_y=False)
    fig.update_yaxes(title_text="Σ θ²", secondary_y=True, showgrid=False)
    return fig


def fourier_norms_figure(df: pd.DataFrame, key_frequencies: Iterable[int] = (), step: int | None = None) -> go.Figure:
    """Norm of each Fourier frequency in the embedding (and neuron-logit map), key frequencies highlighted."""
    keys = {int(k) for k in key_frequencies}
    fig = go.Figure()
    colors = ["#d62728" if int(f) in keys else "#1f77b4" for f in df["frequency"]]
    fig.add_trace(go.Bar(x=df["frequency"], y=df["embed_norm"], name="W_E", marker_color=colors,
                         hovertemplate="frequency %{x}<br>embedding norm %{y:.4f}<extra></extra>"))
    if "neuron_logit_norm" in df:
        fig.add_trace(go.Scatter(x=df["frequency"], y=df["neuron_logit_norm"], name="neuron-logit map",
                                 mode="markers", marker=dict(color="#2ca02c", size=7, symbol="diamond"),
                                 hovertemplate="frequency %{x}<br>neuron-logit norm %{y:.4f}<extra></extra>"))
    title = "Fourier norms of the embedding" + (f" at step {step}" if step is not None else "")
    if keys:
        title += f"; key frequencies (red): {', '.join(map(str, sorted(keys)))}"
    _layout(fig, title, height=360)
    fig.update_xaxes(title_text="frequency k")
    fig.update_yaxes(title_text="norm")
    return fig


def key_frequencies_figure(df: pd.DataFrame, step: int | None = None) -> go.Figure:
    """Neurons per key frequency, with the share of their variance that frequency explains."""
    fig = go.Figure(go.Bar(
        x=[str(f) for f in df["frequency"]], y=df["n_neurons"],
        customdata=df["variance_explained"] if "variance_explained" in df else None,
        marker_color="#d62728", name="neurons",
        hovertemplate="frequency %{x}<br>%{y} neurons<br>variance explained %{customdata:.3f}<extra></extra>",
    ))
    _layout(fig, "Key frequencies (neurons whose activations are dominated by each)"
            + (f" at step {step}" if step is not None else ""), height=320)
    fig.update_xaxes(title_text="frequency k", type="category")
    fig.update_yaxes(title_text="neurons")
    return fig


def ablation_figure(df: pd.DataFrame, title: str = "Ablating one head at a time") -> go.Figure:
    """Change in loss and accuracy when each head is ablated, as bars (the 'none' row is the baseline)."""
    base = df[df["component"] == "none"]
    heads = df[df["component"] != "none"]
    fig = make_subplots(rows=1, cols=2, subplot_titles=["Δ loss (higher: head matters more)", "Δ accuracy"],
                        horizontal_spacing=0.12)
    fig.add_trace(go.Bar(x=heads["component"], y=heads["delta_loss"], marker_color="#d62728", name="Δ loss",
                         customdata=heads["loss"],
                         hovertemplate="%{x}<br>Δ loss %{y:.6g}<br>loss %{customdata:.6g}<extra></extra>"),
                  row=1, col=1)
    fig.add_trace(go.Bar(x=heads["component"], y=heads["delta_accuracy"], marker_color="#1f77b4", name="Δ accuracy",
                         customdata=heads["accuracy"],
                         hovertemplate="%{x}<br>Δ accuracy %{y:.4f}<br>accuracy %{customdata:.4f}<extra></extra>"),
                  row=1, col=2)
    if not base.empty:
        b = base.iloc[0]
        title += f" (baseline loss {b['loss']:.4g}, accuracy {b['accuracy']:.4f})"
    _layout(fig, title, height=360)
    fig.update_layout(showlegend=False)
    fig.update_xaxes(type="category", title_text="head")
    return fig


def letter_attention_figure(df: pd.DataFrame) -> go.Figure:
    """Attention mass the classification token puts on `a` and on `b`, per head."""
    fig = go.Figure()
    fig.add_trace(go.Bar(x=df["component"], y=df["mass_on_a"], name="mass on a", marker_color="#ff7f0e",
                         hovertemplate="%{x}<br>mass on a %{y:.4f}<extra></extra>"))
    fig.add_trace(go.Bar(x=df["component"], y=df["mass_on_b"], name="mass on b", marker_color="#2ca02c",
                         hovertemplate="%{x}<br>mass on b %{y:.4f}<extra></extra>"))
    _layout(fig, "Attention from <cls> to the letters a and b, per head", height=340)
    fig.update_layout(barmode="group")
    fig.update_xaxes(type="category", title_text="head")
    fig.update_yaxes(title_text="attention mass", range=[0, 1])
    return fig


def figures_html(figures: Mapping[str, go.Figure], title: str) -> str:
    """All of a page's figures in one self-contained HTML file (plotly.js embedded once, works offline)."""
    from html import escape

    parts = []
    title = escape(title)
    for i, (name, fig) in enumerate(figures.items()):
        parts.append(f"<h2>{escape(name)}</h2>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0)))
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title></head>"
            f"<body><h1>{title}</h1>{''.join(parts)}</body></html>")
