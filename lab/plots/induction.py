"""The Induction page's figures (Olsson et al. 2022): the induction measures of a next-token run over training,
under its training loss, so the loss bump and the heads' formation line up as grokking's phases do on the
Progress page; and, at one checkpoint, the loss by token position and every head's scores."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lab.plots.style import PALETTE, layout, over_training, step_axis

if TYPE_CHECKING:
    from lab.analysis.induction import InductionHistory
    from lab.runs.run import Run

INDUCTION_TITLE = "Induction heads forming: loss, in-context learning and head scores over training"
KIND_LABELS = {"previous_token": "previous-token", "duplicate_token": "duplicate-token", "induction": "induction"}
LOSS_STYLES = {  # column -> (label, colour, dash); train and test loss come from metrics.jsonl (every evaluation)
    "train_loss": ("train loss", "#1f77b4", "dot"), "test_loss": ("test loss", "#d62728", "solid"),
    "repeated_loss": ("test loss on the repeated segment", "#2ca02c", "solid"),
    "other_loss": ("test loss elsewhere", "#7f7f7f", "dash"),
    "induction_loss": ("induction loss (random tokens repeated)", "#9467bd", "dash"),
}
MARKS = {"loss_drop_step": ("loss drop", "#2ca02c"), "formation_step": ("induction head formed", "#ff7f0e")}


def _line(x, y, label: str, color: str, dash: str = "solid", fmt: str = ".4g", **kwargs) -> go.Scatter:
    return go.Scatter(x=x, y=y, mode="lines+markers", name=label, line=dict(color=color, dash=dash, width=2),
                      marker=dict(size=4), hovertemplate=f"{label}<br>step %{{x}}<br>%{{y:{fmt}}}<extra></extra>", **kwargs)


def _head_color(layer: int, head: int, n_heads: int) -> str:
    return PALETTE[(layer * n_heads + head) % len(PALETTE)]


def induction_figure(history: "InductionHistory", metrics: pd.DataFrame | None = None, *, log_x: bool = False) -> go.Figure:
    """Four panels on one step axis: the training and test loss (from `metrics`, metrics.jsonl's rows) with the
    repeated-segment and diagnostic induction losses at each checkpoint; the in-context-learning score;
    each head's induction score, with half and all of a perfect induction head's score; each head's
    previous-token score. Dashed verticals mark the loss drop and the step the induction head formed."""
    measures = over_training(history.measures, log_x)
    fig = make_subplots(rows=4, cols=1, shared_xaxes=True, vertical_spacing=0.05, row_heights=[0.34, 0.18, 0.26, 0.22],
                        subplot_titles=["Loss", f"In-context-learning score (loss at position {history.icl_positions[1]} "
                                        f"minus loss at position {history.icl_positions[0]})",
                                        "Induction score of each head", "Previous-token score of each head"])
    if metrics is not None and len(metrics):
        metrics = over_training(metrics, log_x)
        for column in ("train_loss", "test_loss"):
            if column in metrics:
                label, color, dash = LOSS_STYLES[column]
                fig.add_trace(_line(metrics["step"], metrics[column], label, color, dash), row=1, col=1)
    for column in ("repeated_loss", "other_loss", "induction_loss"):
        if measures[column].notna().any():
            label, color, dash = LOSS_STYLES[column]
            fig.add_trace(_line(measures["step"], measures[column], label, color, dash), row=1, col=1)
    fig.add_trace(_line(measures["step"], measures["icl_score"], "in-context-learning score", "#8c564b"), row=2, col=1)
    heads = history.heads[history.heads["step"].isin(measures["step"])]
    n_heads = int(heads["head"].max()) + 1 if len(heads) else 1
    for row, kind in ((3, "induction"), (4, "previous_token")):
        for (layer, head), group in heads[heads["kind"] == kind].groupby(["layer", "head"]):
            fig.add_trace(_line(group["step"], group["score"], f"L{layer}H{head}", _head_color(layer, head, n_heads),
                                "solid" if layer else "dot", ".3f", legendgroup=f"L{layer}H{head}", showlegend=row == 3),
                          row=row, col=1)
    if len(heads):
        perfect = history.perfect_induction
        for level, text in ((perfect, "perfect induction head"), (perfect / 2, "half: formed")):
            fig.add_hline(y=level, line=dict(color="#7f7f7f", dash="dot", width=1), annotation_text=text,
                          annotation_position="top left", annotation_font_size=10, row=3, col=1)
    for (attr, (text, color)), side in zip(MARKS.items(), ("right", "left")):  # the drop usually comes first: its label to the left
        step = getattr(history, attr)
        if step is not None and (step > 0 or not log_x):
            fig.add_vline(x=step, line=dict(color=color, dash="dash", width=1.5))
            # an annotation on a log axis is placed by log10 of its x
            fig.add_annotation(x=math.log10(step) if log_x else step, xref="x", y=0.98, yref="y domain",
                               text=f" {text} ({step}) ", showarrow=False, xanchor=side, yanchor="top",
                               font=dict(size=10, color=color))
    layout(fig, INDUCTION_TITLE, height=980)
    fig.update_layout(margin=dict(t=90))
    step_axis(fig, log_x, row=4, col=1)
    if log_x:  # the shared axes above take the same range and ticks
        shared = fig.layout.xaxis4.to_plotly_json()
        for row in (1, 2, 3):
            fig.update_xaxes(**{k: shared[k] for k in ("type", "range", "tickmode", "tickvals", "ticktext") if k in shared},
                             row=row, col=1)
    # linear: the drop of interest is a few tenths of a nat out of ln(vocab) on a log axis's whole decade
    fig.update_yaxes(title_text="loss", row=1, col=1)
    fig.update_yaxes(title_text="late − early", row=2, col=1)
    fig.update_yaxes(title_text="score", rangemode="tozero", row=3, col=1)
    fig.update_yaxes(title_text="score", range=[0, 1], row=4, col=1)
    fig.update_layout(legend=dict(y=-0.06))
    return fig


def position_loss_figure(history: "InductionHistory", step: int) -> go.Figure:
    """Loss by token position at `step` beside the first checkpoint's: the test split (solid) and the
    diagnostic batch (random tokens repeated, dashed: its second half is where induction pays). The two
    positions the in-context-learning score compares are marked."""
    first = int(history.measures["step"].iloc[0])
    fig = go.Figure()
    for source, dash in (("test", "solid"), ("diagnostic", "dash")):
        for at, color in ([(first, "#7f7f7f")] if step != first else []) + [(step, "#1f77b4")]:
            rows = history.by_position[(history.by_position["step"] == at) & (history.by_position["source"] == source)]
            what = "test split" if source == "test" else "random tokens repeated"
            fig.add_trace(go.Scatter(x=rows["position"], y=rows["loss"], mode="lines", name=f"{what}, step {at}",
                                     line=dict(color=color, dash=dash, width=2),
                                     hovertemplate=f"{what}, step {at}<br>position %{{x}}<br>loss %{{y:.4g}}<extra></extra>"))
    for position, text in zip(history.icl_positions, ("early", "late")):
        fig.add_vline(x=position, line=dict(color="#8c564b", dash="dot", width=1), annotation_text=f"{text} ({position})",
                      annotation_font_size=10)
    layout(fig, f"Loss by token position at step {step}" + (f" (grey: step {first})" if step != first else ""), height=380)
    fig.update_xaxes(title_text="position of the prediction (tokens of context − 1)")
    fig.update_yaxes(title_text="loss", rangemode="tozero")
    return fig


def head_scores_figure(history: "InductionHistory", step: int) -> go.Figure:
    """Every head's previous-token, duplicate-token and induction score at `step`: one layer × head heatmap each."""
    heads = history.heads[history.heads["step"] == step]
    fig = make_subplots(rows=1, cols=len(KIND_LABELS), subplot_titles=[f"{label} score" for label in KIND_LABELS.values()],
                        horizontal_spacing=0.08)
    for col, kind in enumerate(KIND_LABELS, start=1):
        grid = heads[heads["kind"] == kind].pivot(index="layer", columns="head", values="score")
        fig.add_trace(go.Heatmap(z=grid.values, x=[f"H{h}" for h in grid.columns], y=[f"L{layer}" for layer in grid.index],
                                 zmin=0, zmax=1, colorscale="Viridis", showscale=col == len(KIND_LABELS),
                                 text=np.round(grid.values, 3), texttemplate="%{text}",
                                 hovertemplate=f"{KIND_LABELS[kind]} score<br>%{{y}}%{{x}}: %{{z:.3f}}<extra></extra>"),
                      row=1, col=col)
        fig.update_yaxes(autorange="reversed", row=1, col=col)
    layout(fig, f"Head scores at step {step}", height=330)
    fig.update_layout(title=dict(subtitle=dict(text=f"TransformerLens head_detector scores on {history.diagnostic}",
                                               font=dict(size=11))), margin=dict(t=100))
    return fig


# --- one call from a notebook ------------------------------------------------------------------------


def plot_induction(run: "Run", kind: str = "all", step: int | None = None, *, log_x: bool = False) -> go.Figure:
    """The induction measures of a next-token run (computed once per checkpoint, then read from the run folder;
    `lab.induction_history`): by default the Induction page's figure over training (`induction_figure`); kind
    "positions" (loss by token position) or "heads" (every head's scores) at `step` (default the last checkpoint)."""
    from lab.analysis.induction import induction_history
    from lab.runs.run import Run, load_run

    run = run if isinstance(run, Run) else load_run(run)
    builders = ("all", "positions", "heads")
    if kind not in builders:
        raise ValueError(f"kind must be one of {', '.join(map(repr, builders))}, got {kind!r}")
    history = induction_history(run)
    if kind == "all":
        return induction_figure(history, run.metrics, log_x=log_x)
    step = run.resolve_step(step)
    return position_loss_figure(history, step) if kind == "positions" else head_scores_figure(history, step)
