"""The Progress measures page's figures (Nanda et al. 2023): restricted and excluded loss with train and
test loss, Gini coefficients and Σθ² over training, and the Fourier norms and key frequencies at a
checkpoint."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lab.plots.style import layout, log_value_axis, nice_ticks, over_training, step_axis, value_axis_log

if TYPE_CHECKING:
    from lab.runs.run import Run


LOSS_STYLES = {"train_loss": ("train loss", "#1f77b4", "dot"), "test_loss": ("test loss", "#d62728", "solid"),
               "restricted_loss": ("restricted loss", "#2ca02c", "solid"),
               "excluded_loss": ("excluded loss", "#9467bd", "dash")}
GINI_STYLES = {"gini_embed": ("Gini of W_E Fourier norms", "#ff7f0e"),
               "gini_neuron_logit": ("Gini of neuron-logit Fourier norms", "#17becf")}
PROGRESS_TITLE = "Progress measures: restricted and excluded loss; Gini coefficients and Σθ²"


def _loss_traces(df: pd.DataFrame) -> list[go.Scatter]:
    return [go.Scatter(x=df["step"], y=df[col], mode="lines+markers", name=label, line=dict(color=color, dash=dash, width=2),
                       marker=dict(size=4), hovertemplate=f"{label}<br>step %{{x}}<br>%{{y:.6g}}<extra></extra>")
            for col, (label, color, dash) in LOSS_STYLES.items() if col in df]


def _gini_traces(df: pd.DataFrame) -> list[go.Scatter]:
    return [go.Scatter(x=df["step"], y=df[col], mode="lines+markers", name=label, line=dict(color=color, width=2),
                       marker=dict(size=4), hovertemplate=f"{label}<br>step %{{x}}<br>%{{y:.4f}}<extra></extra>")
            for col, (label, color) in GINI_STYLES.items() if col in df]


def _weights_trace(df: pd.DataFrame) -> go.Scatter:
    return go.Scatter(x=df["step"], y=df["sum_sq_weights"], mode="lines", name="sum of squared weights Σθ²",
                      line=dict(color="#7f7f7f", width=2, dash="dash"),
                      hovertemplate="sum of squared weights<br>step %{x}<br>%{y:.6g}<extra></extra>")


def _weights_axis(df: pd.DataFrame) -> dict:
    """Σθ²'s axis: round ticks over its range (plotly's own follow the Gini axis's grid: 940, 1170, 1401)."""
    ticks = nice_ticks(float(df["sum_sq_weights"].min()), float(df["sum_sq_weights"].max())) if len(df) else []
    return dict(title_text="Σθ²", showgrid=False, tickmode="array", tickvals=ticks,
                ticktext=[f"{t:g}" for t in ticks], range=[ticks[0], ticks[-1]] if ticks else None)


def progress_losses_figure(df: pd.DataFrame, *, log_x: bool = False) -> go.Figure:
    """Train, test, restricted and excluded loss over training (Nanda et al. 2023, fig. 7), log y with
    every decade written alike."""
    df = over_training(df, log_x)
    fig = go.Figure(_loss_traces(df))
    layout(fig, "Restricted and excluded loss, with train and test loss")
    step_axis(fig, log_x)
    value_axis_log(fig, title_text="loss (log)")
    return fig


def progress_measures_figure(df: pd.DataFrame, *, log_x: bool = False) -> go.Figure:
    """Gini coefficients (left axis) and the sum of squared weights (right axis) over training."""
    df = over_training(df, log_x)
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    for trace in _gini_traces(df):
        fig.add_trace(trace, secondary_y=False)
    if "sum_sq_weights" in df:
        fig.add_trace(_weights_trace(df), secondary_y=True)
        fig.update_yaxes(**_weights_axis(df), secondary_y=True)
    layout(fig, "Gini coefficients and total squared weights")
    step_axis(fig, log_x)
    fig.update_yaxes(title_text="Gini", range=[0, 1], secondary_y=False)
    return fig


def progress_figure(df: pd.DataFrame, *, log_x: bool = False, subtitle: str | None = None) -> go.Figure:
    """The Progress measures page's figure over training, one step axis for both panels: above, train,
    test, restricted and excluded loss (log y); below, the Gini coefficients of the Fourier norms
    (left axis, 0..1) and the sum of squared weights (right axis). `df` is `lab.progress_measures`'."""
    df = over_training(df, log_x)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08, row_heights=[0.55, 0.45],
                        specs=[[{}], [{"secondary_y": True}]],
                        subplot_titles=["Restricted and excluded loss, with train and test loss",
                                        "Gini coefficients and total squared weights"])
    for trace in _loss_traces(df):
        fig.add_trace(trace, row=1, col=1)
    for trace in _gini_traces(df):
        fig.add_trace(trace, row=2, col=1, secondary_y=False)
    if "sum_sq_weights" in df:
        fig.add_trace(_weights_trace(df), row=2, col=1, secondary_y=True)
        fig.update_yaxes(**_weights_axis(df), row=2, col=1, secondary_y=True)
    layout(fig, PROGRESS_TITLE, height=760)
    if subtitle:
        fig.update_layout(title=dict(subtitle=dict(text=subtitle, font=dict(size=11))), margin=dict(t=90))
    step_axis(fig, log_x, row=2, col=1)
    if log_x:  # the shared axis above takes the same range and ticks
        shared = fig.layout.xaxis2.to_plotly_json()
        fig.update_xaxes(**{k: shared[k] for k in ("type", "range", "tickmode", "tickvals", "ticktext") if k in shared},
                         row=1, col=1)
    losses = [v for col in LOSS_STYLES if col in df for v in df[col]]
    fig.update_yaxes(**log_value_axis(losses), title_text="loss (log)", row=1, col=1)
    fig.update_yaxes(title_text="Gini", range=[0, 1], row=2, col=1, secondary_y=False)
    fig.update_layout(legend=dict(y=-0.1))
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
    layout(fig, title, height=360)
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
    layout(fig, "Key frequencies (neurons whose activations are dominated by each)"
            + (f" at step {step}" if step is not None else ""), height=320)
    fig.update_xaxes(title_text="frequency k", type="category")
    fig.update_yaxes(title_text="neurons")
    return fig


# --- one call from a notebook ------------------------------------------------------------------------


def plot_progress(run: "Run", kind: str = "all", *, log_x: bool = False, **options) -> go.Figure:
    """Nanda et al.'s progress measures over every checkpoint of a modular run (computed once, then
    read from the run folder): by default the Progress measures page's figure (`progress_figure`:
    restricted and excluded loss with train and test loss above, Gini coefficients and Σθ² below);
    kind "losses" or "gini" gives one panel alone. `options` go to `lab.progress_measures` (e.g.
    `definition="tl_demo"`)."""
    from lab.analysis.progress import progress_measures

    builders = {"all": progress_figure, "losses": progress_losses_figure, "gini": progress_measures_figure}
    if kind not in builders:
        raise ValueError(f"kind must be one of {', '.join(map(repr, builders))}, got {kind!r}")
    return builders[kind](progress_measures(run, progress=False, **options), log_x=log_x)


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
