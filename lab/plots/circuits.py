"""The Circuits page's figures: activation patching, direct logit attribution, the logit lens, QK / OV
circuits, composition scores, and how each forms over training under the run's accuracy curves.

Builders take what the analyses return (`patching_figure(lab.activation_patching(run))`, ...); the
`plot_*` calls run the analysis and draw:

    lab.plot_patching(ab)                        # default pair of the task
    lab.plot_circuit_history(ab, "qk")           # each head's preference for `a` / `b` over training
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lab.plots.curves import curves_figure
from lab.plots.style import PALETTE, as_numpy, layout, step_axis

if TYPE_CHECKING:
    from lab.analysis.circuits import OVCircuit, QKCircuit
    from lab.analysis.patching import PatchingResult
    from lab.runs.run import Run

DIVERGING = "RdBu"  # red = hurts the answer, blue = helps it, white = nothing
MEASURE_TITLES = {
    "patching": "fraction of the logit difference each head's output restores (patching z)",
    "dla": "direct logit attribution (clean input, answer vs corrupted answer)",
    "lens": "answer probability read after each stage (logit lens, clean input)",
    "qk": "QK circuit: <cls>'s score for `a` / `b` above an average character",
}


def _diverging(values) -> float:
    """A symmetric colour range around 0 that holds every value (at least ±1e-6)."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    return max(float(np.abs(finite).max()) if finite.size else 0.0, 1e-6)


def patching_figure(result: "PatchingResult", column: str = "restored") -> go.Figure:
    """Top: layer x position for the residual stream, attention and MLP outputs; bottom: each head's
    output, queries, keys, values and pattern. Colour: `column` ("restored", 1 = the clean answer is back,
    or "value", the raw metric)."""
    sites = list(dict.fromkeys(result.positions["site"]))
    fig = make_subplots(rows=2, cols=len(sites), row_heights=[0.55, 0.45], vertical_spacing=0.18,
                        specs=[[{}] * len(sites), [{"colspan": len(sites)}] + [None] * (len(sites) - 1)],
                        subplot_titles=[*sites, "per head (all positions)"])
    zmax = 1.0 if column == "restored" else _diverging(pd.concat([result.positions[column], result.heads[column]]))
    colorbar = dict(title=column, len=0.9)
    for i, site in enumerate(sites):
        grid = result.grid(site, column).numpy()  # (layer, position)
        fig.add_trace(go.Heatmap(
            z=grid, x=[f"{p}:{t}" for p, t in enumerate(result.tokens)], y=[f"L{l}" for l in range(grid.shape[0])],
            zmin=-zmax, zmax=zmax, colorscale=DIVERGING, showscale=i == 0, colorbar=colorbar,
            hovertemplate=f"{site} %{{y}} at %{{x}}: {column} %{{z:.3f}}<extra></extra>",
        ), row=1, col=i + 1)
    heads = result.heads.pivot(index="site", columns="component", values=column)
    heads = heads.reindex([s for s in ("z", "q", "k", "v", "pattern") if s in heads.index])
    fig.add_trace(go.Heatmap(z=heads.to_numpy(), x=list(heads.columns), y=list(heads.index), zmin=-zmax, zmax=zmax,
                             colorscale=DIVERGING, showscale=False,
                             hovertemplate=f"%{{x}} %{{y}}: {column} %{{z:.3f}}<extra></extra>"), row=2, col=1)
    fig.update_yaxes(autorange="reversed", row=1)
    title = (f"Activation patching: {result.clean!r} ({result.answer}) into {result.corrupted!r} ({result.wrong}); "
             f"{result.metric} clean {result.clean_value:.2f}, corrupted {result.corrupted_value:.2f}")
    return layout(fig, title, height=460)


def attribution_figure(frame: pd.DataFrame, top_neurons: int = 20) -> go.Figure:
    """Bars: each component's direct logit attribution (heads blue, MLPs green, embeddings and biases grey);
    with neuron rows, the `top_neurons` largest in size beside them."""
    colors = {"head": PALETTE[0], "mlp": PALETTE[2], "neuron": PALETTE[4]}
    main = frame[frame["kind"] != "neuron"]
    neurons = frame[frame["kind"] == "neuron"]
    neurons = neurons.reindex(neurons["attribution"].abs().sort_values(ascending=False).index).head(top_neurons)
    shown = pd.concat([main, neurons])
    fig = go.Figure(go.Bar(
        x=shown["component"], y=shown["attribution"], marker_color=[colors.get(k, "#9e9e9e") for k in shown["kind"]],
        hovertemplate="%{x}: %{y:.3f}<extra></extra>",
    ))
    direction = frame.attrs.get("direction", "the answer's logit")
    n = frame.attrs.get("n_inputs")
    layout(fig, f"Direct logit attribution to {direction}" + (f" (mean over {n} inputs)" if n and n > 1 else ""), height=380)
    fig.update_yaxes(title_text="attribution (logits)", zeroline=True)
    return fig


def logit_lens_figure(frame: pd.DataFrame) -> go.Figure:
    """The answer's probability (and, over a split, the accuracy) read after each stage."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=frame["stage"], y=frame["answer_prob"], mode="lines+markers", name="answer probability",
                             line=dict(color=PALETTE[0], width=2)))
    if frame.attrs.get("n_inputs", 1) > 1:
        fig.add_trace(go.Scatter(x=frame["stage"], y=frame["accuracy"], mode="lines+markers", name="accuracy (top guess)",
                                 line=dict(color=PALETTE[1], width=2, dash="dot")))
    fig.update_traces(customdata=frame["answer_rank"], hovertemplate="%{x}: %{y:.3f} (mean rank %{customdata:.2f})<extra></extra>")
    layout(fig, f"Logit lens: {frame.attrs.get('answer', 'the answer')} read from the residual stream", height=340)
    fig.update_yaxes(title_text="probability", range=[-0.02, 1.02])
    return fig


def _head_grids(tensor, row_labels, col_labels, title: str, hover: str, *, centre: bool) -> go.Figure:
    """One heatmap per head of a (layer, head, rows, cols) tensor."""
    values = as_numpy(tensor)
    layers, heads = values.shape[:2]
    names = [f"L{l}H{h}" for l in range(layers) for h in range(heads)]
    cols = min(len(names), 4)
    rows = -(-len(names) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=names, horizontal_spacing=0.06, vertical_spacing=0.12)
    zmax = _diverging(values) if centre else None
    for i, name in enumerate(names):
        grid = values[i // heads, i % heads]
        if centre:
            grid = grid - grid.mean()
        fig.add_trace(go.Heatmap(z=grid, x=col_labels, y=row_labels, colorscale=DIVERGING, zmid=0,
                                 zmin=-zmax if zmax else None, zmax=zmax, showscale=i == 0,
                                 hovertemplate=f"{name} {hover}<extra></extra>"),
                      row=i // cols + 1, col=i % cols + 1)
    fig.update_yaxes(autorange="reversed")
    return layout(fig, title, height=320 * rows + 80)


def qk_circuit_figure(qk: "QKCircuit", full: bool = False) -> go.Figure:
    """Bars of each head's score for every key token from the read token (centred: above or below an average
    token); `full=True` draws the whole query x key matrix per head instead."""
    if full:
        return _head_grids(qk.scores, qk.tokens, qk.tokens, f"Full QK circuit ({qk.basis} basis): query rows, key columns",
                           "query %{y}, key %{x}: %{z:.2f}", centre=True)
    values = as_numpy(qk.read_scores)
    layers, heads, _ = values.shape
    fig = go.Figure()
    for l in range(layers):
        for h in range(heads):
            row = values[l, h] - values[l, h].mean()
            fig.add_trace(go.Bar(x=qk.key_tokens, y=row, name=f"L{l}H{h}", marker_color=PALETTE[(l * heads + h) % len(PALETTE)],
                                 hovertemplate=f"L{l}H{h}: {qk.read_token} → %{{x}} %{{y:.2f}}<extra></extra>"))
    layout(fig, f"QK circuit from {qk.read_token!r}: each head's score for every key ({qk.basis} basis), "
                f"above or below an average key", height=380)
    fig.update_layout(barmode="group")
    fig.update_yaxes(title_text="attention score (centred)")
    return fig


def ov_circuit_figure(ov: "OVCircuit") -> go.Figure:
    """One heatmap per head: what attending fully to a source token (rows) adds to each output logit (columns)."""
    return _head_grids(ov.values, ov.tokens, ov.outputs, f"Full OV circuit ({ov.basis} basis): source rows, output columns",
                       "source %{y} → output %{x}: %{z:.2f}", centre=False)


def composition_figure(frame: pd.DataFrame) -> go.Figure:
    """Q-, K- and V-composition scores, earlier heads (rows) by later heads (columns)."""
    modes = list(dict.fromkeys(frame["mode"]))
    fig = make_subplots(rows=1, cols=len(modes), subplot_titles=[f"{m}-composition" for m in modes])
    zmax = float(frame["score"].max()) if not frame.empty else 1.0
    for i, mode in enumerate(modes):
        grid = frame[frame["mode"] == mode].pivot(index="earlier", columns="later", values="score")
        fig.add_trace(go.Heatmap(z=grid.to_numpy(), x=list(grid.columns), y=list(grid.index), zmin=0, zmax=zmax,
                                 colorscale="Blues", showscale=i == 0,
                                 hovertemplate=f"{mode}: %{{y}} → %{{x}} %{{z:.3f}}<extra></extra>"),
                      row=1, col=i + 1)
    fig.update_yaxes(autorange="reversed")
    return layout(fig, "Composition scores between layers (||W_OV^A W^B|| / ||W_OV^A|| ||W^B||)", height=360)


def circuit_history_figure(history: pd.DataFrame, metrics: pd.DataFrame, measure: str, run_name: str, *,
                           events: dict | None = None, log_x: bool = True) -> go.Figure:
    """Top: the run's train (dotted) and test (solid) accuracy with its memorise (●) and grok (★) steps;
    bottom: `measure` of `lab.circuit_history` per component at every checkpoint. Dashed lines mark the
    memorise and grok steps on both."""
    rows = history[history["measure"] == measure]
    if rows.empty:
        raise ValueError(f"no {measure!r} in this history; it has: {', '.join(sorted(set(history['measure'])))}")
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.4, 0.6], vertical_spacing=0.08)
    curves = curves_figure({run_name: metrics}, "accuracy", log_x=log_x, log_y=False, events={run_name: events or {}})
    for trace in curves.data:
        fig.add_trace(trace, row=1, col=1)
    for i, (component, part) in enumerate(rows.groupby("component", sort=False)):
        part = part[part["step"] > 0] if log_x else part
        fig.add_trace(go.Scatter(x=part["step"], y=part["value"], mode="lines+markers", name=component,
                                 line=dict(color=PALETTE[i % len(PALETTE)], width=2), marker=dict(size=5),
                                 hovertemplate=f"{component}: %{{y:.3f}} at step %{{x}}<extra></extra>"), row=2, col=1)
    low, high = float(rows["value"].min()), float(rows["value"].max())
    for event, word in (("memorize_step", "memorised"), ("grok_step", "grokked")):
        step = (events or {}).get(event)
        if step is None or (log_x and step <= 0):
            continue
        # vertical lines as traces (shapes on a log axis take log10 coordinates, traces take steps)
        for row, (y0, y1) in ((1, (0.0, 1.0)), (2, (low, high))):
            fig.add_trace(go.Scatter(x=[step, step], y=[y0, y1], mode="lines", name=f"{word} at {step}",
                                     legendgroup=event, showlegend=row == 1, line=dict(color="#555", dash="dash", width=1),
                                     hoverinfo="skip"), row=row, col=1)
    step_axis(fig, log_x)
    fig.update_xaxes(title_text=None, row=1, col=1)
    fig.update_yaxes(title_text="accuracy", range=[-0.02, 1.02], row=1, col=1)
    fig.update_yaxes(title_text=measure, row=2, col=1)
    return layout(fig, f"{run_name}: {MEASURE_TITLES.get(measure, measure)}", height=600)


# --- one call: the analysis and its figure ---------------------------------------------------------------


def plot_patching(run: "Run", clean: str | None = None, corrupted: str | None = None, step: int | None = None) -> go.Figure:
    from lab.analysis.patching import activation_patching

    return patching_figure(activation_patching(run, clean, corrupted, step=step))


def plot_logit_attribution(run: "Run", text: str | None = None, step: int | None = None, *, split: str = "test",
                           neurons: bool = False) -> go.Figure:
    from lab.analysis.attribution import logit_attribution

    return attribution_figure(logit_attribution(run, text, split=split, step=step, neurons=neurons))


def plot_logit_lens(run: "Run", text: str | None = None, step: int | None = None, *, split: str = "test") -> go.Figure:
    from lab.analysis.logit_lens import logit_lens

    return logit_lens_figure(logit_lens(run, text, split=split, step=step))


def plot_qk_circuit(run: "Run", step: int | None = None, *, fourier: bool = False, full: bool = False) -> go.Figure:
    from lab.analysis.circuits import qk_circuit

    return qk_circuit_figure(qk_circuit(run, step, fourier=fourier), full=full)


def plot_ov_circuit(run: "Run", step: int | None = None, *, fourier: bool = False) -> go.Figure:
    from lab.analysis.circuits import ov_circuit

    return ov_circuit_figure(ov_circuit(run, step, fourier=fourier))


def plot_composition_scores(run: "Run", step: int | None = None) -> go.Figure:
    from lab.analysis.circuits import composition_scores

    return composition_figure(composition_scores(run, step))


def plot_circuit_history(run: "Run", measure: str = "patching", *, log_x: bool = True) -> go.Figure:
    from lab.analysis.circuit_history import circuit_history

    summary = run.summary
    events = {key: summary.get(key) for key in ("memorize_step", "grok_step")}
    return circuit_history_figure(circuit_history(run), run.metrics, measure, run.name, events=events, log_x=log_x)
