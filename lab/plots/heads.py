"""The Heads page's figures: what ablating each head does, and where <cls> looks (a_and_b)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lab.plots.style import layout

if TYPE_CHECKING:
    from lab.runs.run import Run


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
    layout(fig, title, height=360)
    fig.update_layout(showlegend=False)
    fig.update_xaxes(type="category", title_text="head")
    fig.update_yaxes(title_text="Δ loss (ablated − baseline)", row=1, col=1)
    fig.update_yaxes(title_text="Δ accuracy (ablated − baseline)", row=1, col=2)
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
    layout(fig, "Attention from <cls> to the letters a and b, per head", height=340)
    fig.update_layout(barmode="group")
    fig.update_xaxes(type="category", title_text="head")
    fig.update_yaxes(title_text="attention mass", range=[0, 1])
    return fig


# --- one call from a notebook ------------------------------------------------------------------------


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

