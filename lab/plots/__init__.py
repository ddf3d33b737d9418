"""The dashboard's figures, for notebooks too: plotly figures of runs and of what the analyses return.

Two layers. The one-call functions take runs and do the analysis themselves:

    import lab
    a, b = lab.load_run("runs/modadd_quick"), lab.load_run("runs/a_and_b")
    lab.plot_curves([a, b], "accuracy")          # train dotted, test solid, memorised ● and grokked ★
    lab.plot_attention(b, "grab a cab")          # every head's pattern at the last checkpoint
    lab.plot_progress(a)                         # restricted and excluded loss (Nanda et al. 2023)

The builders below them (`curves_figure`, `attention_figure`, ...) take what the analyses return,
so the dashboard, which caches the analyses, draws with the very same code: a figure on a
dashboard page is the figure the matching `plot_*` call returns. Nothing here imports Streamlit.
"""

from __future__ import annotations

import math
import zlib
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

if TYPE_CHECKING:
    from lab.analysis.attention import AttentionResult
    from lab.runs.run import Run

PALETTE = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e",
    "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
]
ATTENTION_SCALE = "Viridis"
SPLIT_DASH = {"train": "dot", "test": "solid"}
LONG_INPUT = 48  # tokens: above this an attention grid gets one head per row and a minimum cell size
MIN_CELL_PX = 3  # smallest drawn cell of a long input's attention grid (zoom in for more)
STRIP_WINDOW = 80  # positions the read-position strip shows at once (a range slider pans along)


# --- colours and smoothing ---------------------------------------------------------------------------


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


# --- axes and layout ---------------------------------------------------------------------------------


def _layout(fig: go.Figure, title: str, height: int = 420) -> go.Figure:
    fig.update_layout(
        title=dict(text=title, x=0.01, xanchor="left"),
        height=height,
        margin=dict(l=60, r=20, t=60, b=50),
        legend=dict(orientation="h", yanchor="top", y=-0.18, xanchor="left", x=0),
        template="plotly_white",
    )
    return fig


def step_label(step: float) -> str:
    """How a step reads on an axis: 500, 2000, 10k, 200k, 1M."""
    if step < 10_000:
        return f"{step:g}"
    if step < 1_000_000:
        return f"{step / 1000:g}k"
    return f"{step / 1_000_000:g}M"


def log_step_axis(steps: Iterable[float]) -> dict:
    """A log x axis over these steps whose labels say which step they are: 10, 20, 50, 100, 200, 500,
    1000, 2000, 5000, 10k (every decade only, when the steps span more than three). Plotly's own log
    ticks label the decades and then bare digits (`100`, `2`, `3` ... `9`), which a reader cannot place.
    The range runs from the nice value below the first step to the one above the last, so the last
    decade is labelled too."""
    steps = np.asarray([s for s in steps if s is not None and np.isfinite(s) and s > 0], dtype=float)
    if steps.size == 0:
        return dict(type="log")
    lo, hi = float(steps.min()), float(steps.max())
    decades = range(math.floor(math.log10(lo)), math.floor(math.log10(hi)) + 2)
    nice = [m * 10.0**d for d in decades for m in (1, 2, 5)]
    start = max((v for v in nice if v <= lo), default=lo)
    end = min((v for v in nice if v >= hi), default=hi)
    if end <= start:
        end = start * 2
    every = (1,) if math.log10(end / start) > 3 else (1, 2, 5)
    ticks = [v for v in nice if start <= v <= end and round(v / 10.0 ** math.floor(math.log10(v))) in every]
    return dict(type="log", range=[math.log10(start), math.log10(end)], tickmode="array",
                tickvals=ticks, ticktext=[step_label(v) for v in ticks])


def _step_axis(fig: go.Figure, log_x: bool, **kwargs) -> None:
    """The step (x) axis of a figure: linear, or log with labelled ticks over the steps its traces hold."""
    if not log_x:
        fig.update_xaxes(title_text="step", type="linear", **kwargs)
        return
    steps = [x for trace in fig.data if trace.x is not None for x in np.asarray(trace.x, dtype=float)]
    fig.update_xaxes(title_text="step (log)", **log_step_axis(steps), **kwargs)


# --- training curves ---------------------------------------------------------------------------------


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
            value = float(at[col].iloc[0])  # the raw value: the one that crossed the threshold
            word = "memorized" if event == "memorize_step" else "grokked"
            fig.add_trace(go.Scatter(
                x=[step], y=[value], mode="markers", name=f"{name} {word}", legendgroup=f"{name} events",
                marker=dict(color=color, size=13 if symbol == "star" else 10, symbol=symbol,
                            line=dict(color="black", width=1)),
                hovertemplate=f"<b>{name}</b> {word} at step {step}: {split} {kind} {value:.4g}<extra></extra>",
            ))
    _layout(fig, f"{'Loss' if kind == 'loss' else 'Accuracy'}: train (dotted) and test (solid)")
    _step_axis(fig, log_x)
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
    _step_axis(fig, log_x)
    fig.update_yaxes(title_text="‖θ‖₂")
    return fig


# --- attention ---------------------------------------------------------------------------------------


def _numpy(values) -> np.ndarray:
    return np.asarray(values.detach().cpu() if hasattr(values, "detach") else values, dtype=float)


def _index_axis(labels: Sequence[str], max_labels: int = 60) -> dict:
    """Tick labels for a numeric axis: tokens repeat ("a", "a"), so the axis must not be categorical."""
    n = len(labels)
    step = max(1, math.ceil(n / max_labels))  # at most ~60 labels per axis stay readable
    ticks = list(range(0, n, step))
    return dict(tickmode="array", tickvals=ticks, ticktext=[labels[i] for i in ticks], tickangle=0)


def attention_grid_figure(pattern, tokens: Sequence[str], title: str = "Attention") -> go.Figure:
    """One heatmap per (layer, head) of a (layer, head, query, key) pattern, rows queries, columns keys,
    both labelled with the tokens; colour scale fixed to 0..1.

    Up to LONG_INPUT tokens the heads sit side by side, one row per layer. A longer input gets one
    head per row, square, at least MIN_CELL_PX per cell, so that a single key column stays visible
    (zoom in with the mouse to read the labels of a region)."""
    pattern = _numpy(pattern)
    n_layers, n_heads, n_q, n_k = pattern.shape
    tokens = list(tokens)
    long = max(n_q, n_k) > LONG_INPUT
    rows, cols = (n_layers * n_heads, 1) if long else (n_layers, n_heads)
    panel = max(n_q * MIN_CELL_PX, 420) if long else (300 if n_heads <= 2 else 260)  # px per subplot row
    fig = make_subplots(
        rows=rows, cols=cols, horizontal_spacing=0.06,
        vertical_spacing=min(0.12 if rows > 1 else 0.05, 80 / (rows * panel + 1)),
        subplot_titles=[f"L{layer} H{head}" for layer in range(n_layers) for head in range(n_heads)],
    )
    qlabels = [f"{i}:{t}" for i, t in enumerate(tokens[:n_q])]
    klabels = [f"{i}:{t}" for i, t in enumerate(tokens[:n_k])]
    hover = np.array([[f"{qlabels[q]} → {klabels[k]}" for k in range(n_k)] for q in range(n_q)])
    for layer in range(n_layers):
        for head in range(n_heads):
            index = layer * n_heads + head
            row, col = (index + 1, 1) if long else (layer + 1, head + 1)
            fig.add_trace(go.Heatmap(
                z=pattern[layer, head], x=list(range(n_k)), y=list(range(n_q)),
                zmin=0.0, zmax=1.0, colorscale=ATTENTION_SCALE, showscale=(index == 0),
                colorbar=dict(title="attention", len=min(0.8, 400 / (rows * panel)), y=1, yanchor="top"),
                customdata=hover,
                hovertemplate=f"L{layer}H{head}<br>query→key %{{customdata}}<br>attention %{{z:.4f}}<extra></extra>",
                name=f"L{layer}H{head}",
            ), row=row, col=col)
            max_labels = panel // 14 if long else 60  # a label every ~14 px at most
            fig.update_xaxes(title_text="key" if row == rows else None, **_index_axis(tokens[:n_k], max_labels),
                             row=row, col=col)
            fig.update_yaxes(title_text="query" if col == 1 else None, autorange="reversed",
                             **_index_axis(tokens[:n_q], max_labels), row=row, col=col)
            if long:  # square cells: the panel shrinks to a square rather than padding the heatmap with empty range
                fig.update_xaxes(constrain="domain", row=row, col=col)
                fig.update_yaxes(scaleanchor=f"x{index + 1 if index else ''}", scaleratio=1, constrain="domain",
                                 row=row, col=col)
    fig.update_layout(title=dict(text=title, x=0.01), height=80 + panel * rows + 40,
                      margin=dict(l=60, r=20, t=80, b=50), template="plotly_white")
    return fig


def attention_figure(result: "AttentionResult", run_name: str) -> go.Figure:
    """`attention_grid_figure` of one `lab.attention` result, titled with the run and checkpoint."""
    return attention_grid_figure(
        result.pattern, result.tokens,
        title=f"{run_name}, step {result.step}: attention per head (rows: queries, columns: keys)")


def read_attention_figure(result: "AttentionResult", read_position: int, run_name: str) -> go.Figure:
    """The one row that decides the answer: attention from the read position (`<cls>` for a_and_b,
    `=` for modular) to every position, one strip per head, every column labelled with its character.
    A long input shows STRIP_WINDOW positions at once, around the most attended one, with a range
    slider underneath to pan along."""
    pattern = _numpy(result.pattern)
    n_layers, n_heads, n_q, n_k = pattern.shape
    query = read_position % n_q
    z = pattern[:, :, query, :].reshape(n_layers * n_heads, n_k)  # (layer*head, key)
    heads = [f"L{layer}H{head}" for layer in range(n_layers) for head in range(n_heads)]
    tokens = list(result.tokens)[:n_k]
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(n_k)), y=heads, zmin=0.0, zmax=1.0, colorscale=ATTENTION_SCALE,
        colorbar=dict(title="attention"), xgap=1, ygap=1,
        customdata=np.array([[f"{k}:{t}" for k, t in enumerate(tokens)]] * len(heads)),
        hovertemplate="%{y}<br>" + f"{tokens[query]} → " + "%{customdata}<br>attention %{z:.4f}<extra></extra>",
    ))
    _layout(fig, f"{run_name}, step {result.step}: what {tokens[query]} reads, per head ({n_k} positions)",
            height=140 + 34 * len(heads) + (60 if n_k > STRIP_WINDOW else 0))
    # The window opens where the read position looks hardest (the lone `a` in a long sentence, say).
    start = int(np.clip(int(np.argmax(z.max(axis=0))) - STRIP_WINDOW // 2, 0, max(0, n_k - STRIP_WINDOW)))
    fig.update_xaxes(title_text="position: character", tickmode="array", tickvals=list(range(n_k)),
                     ticktext=tokens, tickangle=0, range=[start - 0.5, start + min(n_k, STRIP_WINDOW) - 0.5])
    if n_k > STRIP_WINDOW:
        fig.update_xaxes(rangeslider=dict(visible=True, thickness=0.12))
    fig.update_yaxes(autorange="reversed", type="category")
    return fig


def modular_grid_figure(grid, title: str = "Attention from '=' to 'a' over all (a, b)") -> go.Figure:
    """One p-by-p heatmap per (layer, head) of a (layer, head, p, p) tensor: rows a, columns b, 0..1."""
    grid = _numpy(grid)
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


def modular_attention_figure(grid, run_name: str, step: int) -> go.Figure:
    """`modular_grid_figure` of one `lab.modular_attention_grid` result, titled with the run and checkpoint."""
    return modular_grid_figure(grid, title=f"{run_name}, step {step}: attention = → a")


# --- progress measures (Nanda et al. 2023) -----------------------------------------------------------


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
    _step_axis(fig, log_x)
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
    _step_axis(fig, log_x)
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


# --- heads -------------------------------------------------------------------------------------------


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


def ablation_title(run_name: str, step: int, method: str, split: str) -> str:
    return f"{run_name}, step {step}: {method}-ablating one head ({split})"


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


# --- several figures in one file ---------------------------------------------------------------------


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


def plot_attention(run: "Run", text: str, step: int | None = None) -> go.Figure:
    """Every head's attention pattern over `text` at a checkpoint (default: the last), as on the
    Attention page; e.g. `plot_attention(run, "grab a cab")` or `plot_attention(run, "5 + 7 =")`."""
    from lab.analysis.attention import attention

    return attention_figure(attention(run, text, step=step), run.name)


def plot_read_attention(run: "Run", text: str, step: int | None = None) -> go.Figure:
    """What the read position (`<cls>` or `=`) attends to, one strip per head: the Attention page's
    view of long inputs."""
    from lab.analysis.attention import attention

    return read_attention_figure(attention(run, text, step=step), run.task.read_position, run.name)


def plot_modular_attention(run: "Run", step: int | None = None) -> go.Figure:
    """Attention from `=` to `a` over every pair (a, b), one p-by-p grid per head (modular runs)."""
    from lab.analysis.attention import modular_attention_grid

    step = run.resolve_step(step)
    return modular_attention_figure(modular_attention_grid(run, step=step), run.name, step)


def plot_progress(run: "Run", kind: str = "losses", *, log_x: bool = False) -> go.Figure:
    """Nanda et al.'s progress measures over every checkpoint of a modular run (computed once, then
    read from the run folder): kind "losses" (restricted and excluded loss with train and test loss)
    or "gini" (Gini coefficients of the Fourier norms and the total squared weights)."""
    from lab.analysis.progress import progress_measures

    builders = {"losses": progress_losses_figure, "gini": progress_measures_figure}
    if kind not in builders:
        raise ValueError(f"kind must be one of {', '.join(map(repr, builders))}, got {kind!r}")
    return builders[kind](progress_measures(run, progress=False), log_x=log_x)


def plot_fourier_norms(run: "Run", step: int | None = None) -> go.Figure:
    """Norm of each Fourier frequency of the embedding at a checkpoint, key frequencies in red (modular runs)."""
    from lab.analysis.fourier import fourier_norms, key_frequencies

    step = run.resolve_step(step)
    return fourier_norms_figure(fourier_norms(run, step=step), key_frequencies(run, step=step)["frequency"], step=step)


def plot_key_frequencies(run: "Run", step: int | None = None) -> go.Figure:
    """Neurons per key frequency at a checkpoint (modular runs)."""
    from lab.analysis.fourier import key_frequencies

    step = run.resolve_step(step)
    return key_frequencies_figure(key_frequencies(run, step=step), step=step)


def plot_ablation(run: "Run", step: int | None = None, *, split: str = "test", method: str = "zero") -> go.Figure:
    """What ablating each head (zero or mean) does to loss and accuracy on a split, as on the Heads page."""
    from lab.analysis.ablation import ablate_heads

    step = run.resolve_step(step)
    table = ablate_heads(run, split=split, method=method, step=step)
    return ablation_figure(table, title=ablation_title(run.name, step, method, split))


def plot_letter_attention(run: "Run", step: int | None = None, *, split: str = "test") -> go.Figure:
    """Attention mass `<cls>` puts on the letters a and b, per head (a_and_b runs)."""
    from lab.analysis.heads import letter_attention

    return letter_attention_figure(letter_attention(run, step=step, split=split))


# --- sweeps: phase diagrams (Liu et al. 2022) and outcomes against one axis (Power et al. 2022) ------
# The builders take a sweep's members table (`lab.Sweep.members`: one row per member, one column per
# axis, seed, status, phase, grok_step, ...); `sweep_members` gives it with phases at other thresholds.

PHASE_COLORS = {
    "comprehension": "#2ca02c",  # generalises with (or soon after) memorising
    "grokking": "#1f77b4",  # generalises long after memorising
    "memorization": "#ff7f0e",  # memorises, never generalises
    "confusion": "#d62728",  # does not even memorise
    "unfinished": "#d9d9d9",  # still training (or interrupted): no phase yet
}
PHASE_SHORT = {"comprehension": "compr.", "grokking": "grok", "memorization": "memo", "confusion": "conf.",
               "unfinished": "running"}
NEVER_COLOR = "#bdbdbd"  # grok-step cells whose median member never grokked within its steps
SPREADS = {"iqr": ("q25", "q75", "interquartile range"), "minmax": ("min", "max", "min–max")}
STEP_OUTCOMES = ("memorize_step", "grok_step", "t_train", "t_test")  # None = never reached
MAX_HOVER_MEMBERS = 12


def value_text(value) -> str:
    """An axis value as a tick label: 0.3, 1e-05, add, (0.9, 0.98)."""
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(value_text(v) for v in value) + ")"
    return str(value)


def axis_values(members: pd.DataFrame, key: str) -> list:
    """The distinct values of one axis column, sorted (numbers ascending; mixed kinds in order of appearance)."""
    values = list(dict.fromkeys(v for v in members[key] if v is not None and not (isinstance(v, float) and math.isnan(v))))
    try:
        return sorted(values)
    except TypeError:
        return values


def _check_axes(members: pd.DataFrame, *keys: str) -> None:
    outcome_columns = {"member", "run", "status", "phase", "step", "steps", "wall_time_s", *STEP_OUTCOMES}
    axes = [c for c in members.columns if c not in outcome_columns and not str(c).startswith(("final_", "best_"))]
    for key in keys:
        if key not in members.columns or key in outcome_columns:
            raise ValueError(f"no sweep axis {key!r}; axes: {', '.join(map(str, axes))}")
    if len(keys) == 2 and keys[0] == keys[1]:
        raise ValueError(f"x and y are both {keys[0]!r}; pick two different axes")


def _majority(phases: list[str]) -> tuple[str, int]:
    """The most common phase of the finished members (ties go to the earlier phase in PHASE_COLORS's
    order), and its count; "unfinished" only when no member has finished."""
    done = [p for p in phases if p != "unfinished"]
    if not done:
        return "unfinished", len(phases)
    counts = {p: done.count(p) for p in PHASE_COLORS if p in done}
    best = max(counts, key=lambda p: counts[p])  # max keeps the first of equals: dict order breaks ties
    return best, counts[best]


def _member_line(row) -> str:
    def step(value) -> str:
        return "—" if value is None or pd.isna(value) else str(int(value))

    line = f"{row['member']}: {row['phase']}"
    if "t_train" in row and "t_test" in row:
        line += f" (train > thr. at {step(row['t_train'])}, test at {step(row['t_test'])}"
        line += f", grok {step(row.get('grok_step'))})" if "grok_step" in row else ")"
    return line


def sweep_cells(members: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """One row per (x, y) cell of a sweep's members table: x, y (values), ix, iy (positions on the
    axes), n (members), members (their names), phase (majority of the finished ones), count (members
    in that phase), finished, phases ({phase: count}), grok_median (median grok step of the finished
    members, a member that never grokked counted as infinite), never (finished members that never
    grokked), steps (the most steps any member had), hover (one line per member)."""
    _check_axes(members, x, y)
    xs, ys = axis_values(members, x), axis_values(members, y)
    rows = []
    for iy, yv in enumerate(ys):
        for ix, xv in enumerate(xs):
            cell = members[(members[x] == xv) & (members[y] == yv)] if len(members) else members
            if cell.empty:
                continue
            phases = [str(p) for p in cell["phase"]]
            phase, count = _majority(phases)
            finished = cell[cell["phase"] != "unfinished"]
            groks = [math.inf if pd.isna(g) else float(g) for g in finished.get("grok_step", pd.Series(dtype=float))]
            lines = [_member_line(r) for _, r in cell.iterrows()]
            if len(lines) > MAX_HOVER_MEMBERS:
                lines = lines[:MAX_HOVER_MEMBERS] + [f"… and {len(lines) - MAX_HOVER_MEMBERS} more"]
            head = f"<b>{x} = {value_text(xv)}, {y} = {value_text(yv)}</b>: {phase} {count}/{len(finished) or len(cell)}"
            rows.append({
                "x": xv, "y": yv, "ix": ix, "iy": iy, "n": len(cell), "members": list(cell["member"]),
                "phase": phase, "count": count, "finished": len(finished),
                "phases": {p: phases.count(p) for p in PHASE_COLORS if p in phases},
                "grok_median": float(np.median(groks)) if groks else None,
                "never": sum(math.isinf(g) for g in groks),
                "steps": int(cell["steps"].max()) if "steps" in cell and cell["steps"].notna().any() else None,
                "hover": "<br>".join([head, *lines]),
            })
    return pd.DataFrame(rows, columns=["x", "y", "ix", "iy", "n", "members", "phase", "count", "finished", "phases",
                                       "grok_median", "never", "steps", "hover"])


def _cell_axes(fig: go.Figure, members: pd.DataFrame, x: str, y: str) -> None:
    xs, ys = axis_values(members, x), axis_values(members, y)
    fig.update_xaxes(title_text=x, tickmode="array", tickvals=list(range(len(xs))), ticktext=[value_text(v) for v in xs],
                     range=[-0.5, len(xs) - 0.5], showgrid=False, zeroline=False)
    fig.update_yaxes(title_text=y, tickmode="array", tickvals=list(range(len(ys))), ticktext=[value_text(v) for v in ys],
                     range=[-0.5, len(ys) - 0.5], showgrid=False, zeroline=False)


def _cell_picker(cells: pd.DataFrame) -> go.Scatter:
    """Invisible points at the cell centres that carry the hover and the selection: plotly selects
    points of scatter traces only, not heatmap cells. hoverdistance -1 (set on the figure) makes the
    nearest centre, i.e. the cell under the mouse, answer anywhere in the cell. The points stay invisible
    when picked: `highlight` outlines the picked cell instead, whole."""
    return go.Scatter(
        x=cells["ix"], y=cells["iy"], mode="markers", name="cells", showlegend=False,
        marker=dict(size=20, color="black", opacity=0), selected=dict(marker=dict(opacity=0)),
        unselected=dict(marker=dict(opacity=0)), customdata=cells["hover"], hovertemplate="%{customdata}<extra></extra>",
    )


def _highlight(fig: go.Figure, members: pd.DataFrame, x: str, y: str, cell: tuple | None) -> None:
    """Outline the cell whose axis values are `cell` = (x value, y value)."""
    if cell is None:
        return
    xs, ys = axis_values(members, x), axis_values(members, y)
    if cell[0] in xs and cell[1] in ys:
        ix, iy = xs.index(cell[0]), ys.index(cell[1])
        fig.add_shape(type="rect", x0=ix - 0.5, x1=ix + 0.5, y0=iy - 0.5, y1=iy + 0.5,
                      line=dict(color="black", width=3), fillcolor="rgba(0,0,0,0)", layer="above")


def phase_thresholds_text(train_acc: float = 0.9, test_acc: float = 0.9, gap: float = 1000,
                          budget: int | None = None) -> str:
    """Liu et al. 2022's Table 1 at these thresholds, in one line."""
    within = f"within {step_label(budget)} steps" if budget else "within the run"
    return (f"train acc > {train_acc:.0%}, test acc > {test_acc:.0%} {within}; comprehension: test crosses "
            f"< {gap:g} steps after train, grokking: later; memorization: train only; confusion: neither")


def phase_diagram_figure(members: pd.DataFrame, x: str, y: str, *, thresholds: str | None = None,
                         title: str | None = None, highlight: tuple | None = None) -> go.Figure:
    """Each (x, y) cell coloured by the majority phase of its members (Liu et al. 2022, Table 1), with
    the count ("grok 3/4": 3 of its 4 finished members grokked); hovering a cell lists its members;
    `highlight` = (x value, y value) outlines one cell."""
    cells = sweep_cells(members, x, y)
    xs, ys = axis_values(members, x), axis_values(members, y)
    codes = {phase: i for i, phase in enumerate(PHASE_COLORS)}
    z = np.full((len(ys), len(xs)), np.nan)
    text = np.full((len(ys), len(xs)), "", dtype=object)
    for cell in cells.itertuples():
        z[cell.iy, cell.ix] = codes[cell.phase]
        shown = cell.finished or cell.n
        text[cell.iy, cell.ix] = PHASE_SHORT[cell.phase] + (f" {cell.count}/{shown}" if cell.n > 1 else "")
        if cell.finished and cell.finished < cell.n:
            text[cell.iy, cell.ix] += f"<br>+{cell.n - cell.finished} running"
    n = len(PHASE_COLORS)
    scale = []  # a stepped colour scale: code i fills [i/n, (i+1)/n]
    for i, color in enumerate(PHASE_COLORS.values()):
        scale += [[i / n, color], [(i + 1) / n, color]]
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(len(xs))), y=list(range(len(ys))), zmin=-0.5, zmax=n - 0.5, colorscale=scale,
        showscale=False, text=text, texttemplate="%{text}", textfont=dict(color="white", size=12),
        hoverinfo="skip", xgap=2, ygap=2, name="phase",
    ))
    for phase, color in PHASE_COLORS.items():  # the legend: one entry per phase that occurs
        if phase in set(cells["phase"]):
            fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=phase,
                                     marker=dict(symbol="square", size=12, color=color)))
    fig.add_trace(_cell_picker(cells))
    _layout(fig, title or f"Phases over {x} × {y}", height=max(360, 120 + 48 * len(ys)))
    if thresholds:
        fig.update_layout(title=dict(subtitle=dict(text=thresholds, font=dict(size=11))), margin=dict(t=80))
    fig.update_layout(hovermode="closest", hoverdistance=-1)  # Streamlit sets click-to-select (it needs no drag-select)
    _cell_axes(fig, members, x, y)
    _highlight(fig, members, x, y, highlight)
    return fig


def grok_steps_figure(members: pd.DataFrame, x: str, y: str, *, title: str | None = None,
                      highlight: tuple | None = None) -> go.Figure:
    """The median grok step (first step with test accuracy >= 99%) of each (x, y) cell on a log colour
    scale. A member that never grokked counts as later than any that did; a cell whose median member
    never grokked is grey and reads "> STEPS" (capped: it did not grok within its steps), and "(k ✗)"
    counts a cell's members that never grokked."""
    cells = sweep_cells(members, x, y)
    xs, ys = axis_values(members, x), axis_values(members, y)
    z = np.full((len(ys), len(xs)), np.nan)
    never = np.full((len(ys), len(xs)), np.nan)
    text = np.full((len(ys), len(xs)), "", dtype=object)
    for cell in cells.itertuples():
        if not cell.finished:
            text[cell.iy, cell.ix] = "running"
            never[cell.iy, cell.ix] = 0
            continue
        if math.isinf(cell.grok_median):
            never[cell.iy, cell.ix] = 0
            text[cell.iy, cell.ix] = f"> {step_label(cell.steps)}" if cell.steps else "never"
        else:
            z[cell.iy, cell.ix] = math.log10(max(cell.grok_median, 1.0))
            text[cell.iy, cell.ix] = step_label(round(cell.grok_median))
        if cell.never and not math.isinf(cell.grok_median):
            text[cell.iy, cell.ix] += f" ({cell.never} ✗)"
    finite = z[np.isfinite(z)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    ticks = [v for d in range(math.floor(lo), math.ceil(hi) + 1) for v in (10.0**d, 2 * 10.0**d, 5 * 10.0**d)
             if lo - 1e-9 <= math.log10(v) <= hi + 1e-9] or [10.0**lo]
    fig = go.Figure()
    fig.add_trace(go.Heatmap(
        z=never, x=list(range(len(xs))), y=list(range(len(ys))), zmin=0, zmax=1, showscale=False, hoverinfo="skip",
        colorscale=[[0, NEVER_COLOR], [1, NEVER_COLOR]], xgap=2, ygap=2, name="never grokked",
    ))
    fig.add_trace(go.Heatmap(
        z=z, x=list(range(len(xs))), y=list(range(len(ys))), zmin=lo, zmax=hi, colorscale="Viridis_r",
        colorbar=dict(title="grok step", tickvals=[math.log10(t) for t in ticks], ticktext=[step_label(t) for t in ticks]),
        hoverinfo="skip", xgap=2, ygap=2, name="grok step",
    ))
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name="never grokked (median member)",
                             marker=dict(symbol="square", size=12, color=NEVER_COLOR)))
    fig.add_trace(go.Scatter(  # the labels, as text on the cells (one trace for both heatmaps)
        x=cells["ix"], y=cells["iy"], mode="text", text=[text[r.iy, r.ix] for r in cells.itertuples()],
        # dark text on the light (early) end of Viridis_r and on grey, white on the dark (late) end
        textfont=dict(size=12, color=["white" if np.isfinite(z[r.iy, r.ix]) and (z[r.iy, r.ix] - lo) / (hi - lo) > 0.5
                                      else "black" for r in cells.itertuples()]),
        hoverinfo="skip", showlegend=False, name="labels"))
    fig.add_trace(_cell_picker(cells))
    _layout(fig, title or f"Median grok step (test acc ≥ 99%) over {x} × {y}", height=max(360, 120 + 48 * len(ys)))
    fig.update_layout(hovermode="closest", hoverdistance=-1)  # Streamlit sets click-to-select (it needs no drag-select)
    _cell_axes(fig, members, x, y)
    _highlight(fig, members, x, y, highlight)
    return fig


def sweep_outcome_table(members: pd.DataFrame, axis: str, outcome: str, *, by: str | None = None,
                        missing: str = "budget") -> pd.DataFrame:
    """Median, mean, q25, q75, min, max, n and n_missing of `outcome` over the members of each value of
    `axis` (and of `by`): the numbers `sweep_outcome_figure` draws (`lab.Sweep.outcome_by` on all members).
    A step outcome a member never reached counts at its step budget with `missing="budget"` (the median
    is then a lower bound where n_missing > 0) and is left out with `missing="drop"`. Unfinished members
    are left out."""
    _check_axes(members, *([axis] if by is None else [axis, by]))
    if outcome not in members.columns or outcome in ("member", "run", "status", "phase"):
        numeric = [c for c in members.columns if c in STEP_OUTCOMES or str(c).startswith(("final_", "best_"))]
        raise ValueError(f"no outcome {outcome!r}; outcomes: {', '.join(numeric)}")
    if missing not in ("budget", "drop"):
        raise ValueError(f"missing={missing!r}: use 'budget' or 'drop'")
    keys = [axis] if by is None else [axis, by]
    done = members[members["phase"] != "unfinished"] if "phase" in members else members
    values = done[outcome].astype("Float64")
    data = done[keys].copy()
    data["missing"] = values.isna().astype(int).to_numpy()
    if outcome in STEP_OUTCOMES and missing == "budget":
        values = values.fillna(done["steps"].astype("Float64"))
    data["value"] = values.astype(float).to_numpy()
    if missing == "drop":
        data = data[data["value"].notna()]
    rows = []
    for key, group in data.groupby(keys, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        v = group["value"].dropna()
        stats = (dict(median=v.median(), mean=v.mean(), q25=v.quantile(0.25), q75=v.quantile(0.75), min=v.min(),
                      max=v.max()) if len(v) else dict.fromkeys(("median", "mean", "q25", "q75", "min", "max"), np.nan))
        rows.append({**dict(zip(keys, key)), **stats, "n": len(group), "n_missing": int(group["missing"].sum())})
    table = pd.DataFrame(rows, columns=[*keys, "median", "mean", "q25", "q75", "min", "max", "n", "n_missing"])
    order = {k: {value_text(v): i for i, v in enumerate(axis_values(members, k))} for k in keys}
    if len(table):
        table = table.sort_values(keys, key=lambda col: col.map(lambda v: order[col.name].get(value_text(v), 0)))
    return table.reset_index(drop=True)


OUTCOME_LABELS = {"grok_step": "steps to 99% test acc", "memorize_step": "steps to 99% train acc",
                  "t_train": "first step train acc > threshold", "t_test": "first step test acc > threshold"}


def sweep_titles(name: str, x: str | None = None, y: str | None = None, *, axis: str | None = None,
                 outcome: str | None = None, spread: str = "iqr") -> dict[str, str]:
    """The titles of a sweep's figures, shared by the Sweeps page and the `plot_*` calls."""
    titles = {}
    if x and y:
        titles["phase diagram"] = f"{name}: phases over {x} × {y}"
        titles["grok steps"] = f"{name}: median grok step (test acc ≥ 99%) over {x} × {y}"
    if axis and outcome:
        band = SPREADS.get(spread, ("", "", spread))[2]
        titles["outcome"] = f"{name}: median {OUTCOME_LABELS.get(outcome, outcome)} against {axis} ({band} over seeds)"
    return titles


def sweep_outcome_figure(table: pd.DataFrame, axis: str, outcome: str, *, by: str | None = None, spread: str = "iqr",
                         log_y: bool | None = None, title: str | None = None) -> go.Figure:
    """The median of an outcome over seeds against one axis, with a band for the spread ("iqr": the
    25th to 75th percentile; "minmax": min to max), one line per value of `by`: Power et al. 2022's
    Figure 1 (median steps to 99% test accuracy against the training fraction) and Figure 2 (best
    test accuracy against the training fraction, per operator). `table` is `sweep_outcome_table`'s.
    Hollow markers: some members never reached a step outcome (counted at the budget)."""
    if spread not in SPREADS:
        raise ValueError(f"spread must be one of {', '.join(map(repr, SPREADS))}, got {spread!r}")
    lo_col, hi_col, spread_name = SPREADS[spread]
    steps = outcome in STEP_OUTCOMES
    log_y = steps if log_y is None else log_y
    values = list(dict.fromkeys(table[axis]))
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    log_x = numeric and bool(values) and min(values) > 0 and max(values) / min(values) >= 10  # lr, weight decay, init scale
    groups = [(None, table)] if by is None else [(g, table[table[by] == g]) for g in dict.fromkeys(table[by])]
    fig = go.Figure()
    for i, (group, rows) in enumerate(groups):
        color = PALETTE[i % len(PALETTE)]
        xs = list(rows[axis]) if numeric else [value_text(v) for v in rows[axis]]
        name = outcome if group is None else f"{by} = {value_text(group)}"
        band_x = xs + xs[::-1]
        band_y = list(rows[hi_col]) + list(rows[lo_col])[::-1]
        fig.add_trace(go.Scatter(x=band_x, y=band_y, fill="toself", fillcolor=color, opacity=0.18, line=dict(width=0),
                                 hoverinfo="skip", showlegend=False, legendgroup=name, name=f"{name} ({spread_name})"))
        hover = [f"<b>{name}</b><br>{axis} = {value_text(v)}<br>median {m:.6g}<br>{spread_name} {lo:.6g} – {hi:.6g}"
                 f"<br>{n} members" + (f", {k} never reached it (counted at the budget)" if steps and k else "")
                 for v, m, lo, hi, n, k in zip(rows[axis], rows["median"], rows[lo_col], rows[hi_col], rows["n"],
                                               rows["n_missing"])]
        fig.add_trace(go.Scatter(
            x=xs, y=rows["median"], mode="lines+markers", name=name, legendgroup=name, line=dict(color=color, width=2),
            marker=dict(size=9, color=[("white" if steps and k else color) for k in rows["n_missing"]],
                        line=dict(color=color, width=2)),
            hovertext=hover, hovertemplate="%{hovertext}<extra></extra>",
        ))
    label = OUTCOME_LABELS.get(outcome, outcome)
    _layout(fig, title or f"Median {label} against {axis} (band: {spread_name} over seeds)")
    fig.update_xaxes(title_text=axis + (" (log)" if log_x else ""), type="log" if log_x else ("linear" if numeric else "category"))
    if log_x:  # plotly's own log ticks label decades and bare digits; label the swept values instead
        fig.update_xaxes(tickmode="array", tickvals=values, ticktext=[value_text(v) for v in values])
    fig.update_yaxes(title_text=label + (" (log)" if log_y else ""), type="log" if log_y else "linear",
                     exponentformat="power" if log_y else "B")
    if outcome.endswith("_acc") and not log_y:
        fig.update_yaxes(range=[-0.02, 1.02])
    return fig


# one call from a notebook: a Sweep (or its name / path) in, the Sweeps page's figure out


def _sweep(sweep):
    from lab.sweeps.sweep import Sweep, load_sweep

    return sweep if isinstance(sweep, Sweep) else load_sweep(sweep)


def sweep_members(sweep, *, train_acc: float = 0.9, test_acc: float = 0.9, gap: float = 1000,
                  budget: int | None = None, where: Mapping[str, object] | None = None) -> pd.DataFrame:
    """`sweep.members` with t_train, t_test and phase at these thresholds (Liu et al. 2022's Table 1),
    keeping only the members whose axes have the values in `where` (e.g. {"task.operator": "add"})."""
    sweep = _sweep(sweep)
    members = sweep.members.copy()
    if members.empty:
        return members
    if (train_acc, test_acc, gap, budget) != (0.9, 0.9, 1000, None):
        phases = sweep.phases(train_acc=train_acc, test_acc=test_acc, gap=gap, budget=budget).set_index("member")
        for column in ("t_train", "t_test", "phase"):
            members[column] = members["member"].map(phases[column]).to_numpy()
    for key, value in (where or {}).items():
        _check_axes(members, key)
        members = members[members[key] == value]
    return members.reset_index(drop=True)


def _default_axes(sweep, x: str | None, y: str | None) -> tuple[str, str]:
    axes = [*sweep.axes, "seed"]
    x = x or axes[0]
    y = y or next(a for a in axes if a != x)
    return x, y


def plot_phase_diagram(sweep, x: str | None = None, y: str | None = None, *, train_acc: float = 0.9,
                       test_acc: float = 0.9, gap: float = 1000, budget: int | None = None,
                       where: Mapping[str, object] | None = None) -> go.Figure:
    """The phase of every (x, y) cell of a sweep (majority over seeds, with the count): Liu et al. 2022's
    phase diagram, e.g. `plot_phase_diagram("liu_2022_phase", "train.weight_decay", "train.lr")`.
    Defaults: the first two axes (or the first axis and seed), Table 1's thresholds (train and test
    accuracy > 90% within the run; comprehension when test crosses < 1000 steps after train)."""
    sweep = _sweep(sweep)
    x, y = _default_axes(sweep, x, y)
    members = sweep_members(sweep, train_acc=train_acc, test_acc=test_acc, gap=gap, budget=budget, where=where)
    return phase_diagram_figure(members, x, y, thresholds=phase_thresholds_text(train_acc, test_acc, gap, budget),
                                title=sweep_titles(sweep.name, x, y)["phase diagram"])


def plot_grok_steps(sweep, x: str | None = None, y: str | None = None, *,
                    where: Mapping[str, object] | None = None) -> go.Figure:
    """The median grok step of every (x, y) cell of a sweep, log colour scale; never-grokked cells grey."""
    sweep = _sweep(sweep)
    x, y = _default_axes(sweep, x, y)
    return grok_steps_figure(sweep_members(sweep, where=where), x, y, title=sweep_titles(sweep.name, x, y)["grok steps"])


def plot_sweep_outcome(sweep, axis: str | None = None, outcome: str = "grok_step", *, by: str | None = None,
                       spread: str = "iqr", missing: str = "budget", log_y: bool | None = None,
                       where: Mapping[str, object] | None = None) -> go.Figure:
    """An outcome's median over seeds against one axis, with its spread: Power et al.'s Figure 1 is
    `plot_sweep_outcome(s, "task.train_frac", "grok_step")`, Figure 2
    `plot_sweep_outcome(s, "task.train_frac", "best_test_acc", by="task.operator")`."""
    sweep = _sweep(sweep)
    axis = axis or [*sweep.axes, "seed"][0]
    members = sweep_members(sweep, where=where)
    table = sweep_outcome_table(members, axis, outcome, by=by, missing=missing)
    return sweep_outcome_figure(table, axis, outcome, by=by, spread=spread, log_y=log_y,
                                title=sweep_titles(sweep.name, axis=axis, outcome=outcome, spread=spread)["outcome"])
