"""The Sweeps page's figures: the phase diagram over two axes (Liu et al. 2022), the median grok step of
each cell, and an outcome's median and spread against one axis (Power et al. 2022's Figures 1 and 2).

The builders take a sweep's members table (`lab.Sweep.members`: one row per member, one column per
axis, seed, status, phase, grok_step, ...); `sweep_members` gives it with phases at other thresholds.
Every number they draw comes from `lab.sweeps.stats`, the numbers `lab.Sweep.outcome_by` returns."""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from lab.plots.style import PALETTE, layout, log_ticks, log_value_axis, step_label
from lab.sweeps import stats
from lab.sweeps.stats import STEP_OUTCOMES, axis_values, phase_thresholds_text, value_text  # noqa: F401  (public in lab.plots)

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
MAX_HOVER_MEMBERS = 12


def _member_line(row, gap: float, train_acc: float, test_acc: float) -> str:
    """One member in a cell's hover: its phase and the rule that decided it, and its grok step."""
    line = f"{row['member']}: {row['phase']}"
    if "t_train" in row and "t_test" in row:
        line += f" ({stats.phase_reason(row['t_train'], row['t_test'], gap, train_acc, test_acc, row['phase'])})"
    if "grok_step" in row and row["phase"] != stats.UNFINISHED:
        grok = row["grok_step"]
        ran = row.get("step") if not pd.isna(row.get("step", math.nan)) else row.get("steps")
        line += f"; grokked at {int(grok)}" if not pd.isna(grok) else f"; grok step > {ran}"
    return line


def sweep_cells(members: pd.DataFrame, x: str, y: str, *, gap: float = stats.PHASE_GAP,
                train_acc: float = stats.PHASE_ACC, test_acc: float = stats.PHASE_ACC) -> pd.DataFrame:
    """`lab.sweeps.stats.cells` (one row per (x, y) cell: its majority phase with the count, its
    censored-aware median grok step, ...) with `hover`: the cell and one line per member, each with
    the rule that gave its phase at these thresholds."""
    cells = stats.cells(members, x, y)
    hovers = []
    for cell in cells.itertuples():
        rows = members[members["member"].isin(cell.members)]
        lines = [_member_line(r, gap, train_acc, test_acc) for _, r in rows.iterrows()]
        if len(lines) > MAX_HOVER_MEMBERS:
            lines = lines[:MAX_HOVER_MEMBERS] + [f"… and {len(lines) - MAX_HOVER_MEMBERS} more"]
        head = (f"<b>{x} = {value_text(cell.x)}, {y} = {value_text(cell.y)}</b>: {cell.phase} "
                f"{cell.count}/{cell.finished or cell.n}")
        hovers.append("<br>".join([head, *lines]))
    return cells.assign(hover=hovers)


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


def phase_diagram_figure(members: pd.DataFrame, x: str, y: str, *, thresholds: str | None = None,
                         title: str | None = None, highlight: tuple | None = None, gap: float = stats.PHASE_GAP,
                         train_acc: float = stats.PHASE_ACC, test_acc: float = stats.PHASE_ACC) -> go.Figure:
    """Each (x, y) cell coloured by the majority phase of its members (Liu et al. 2022, Table 1), with
    the count ("grok 3/4": 3 of its 4 finished members grokked); hovering a cell lists its members,
    each with the rule that gave its phase at these thresholds (`gap`, `train_acc`, `test_acc`: those
    the members table's phases were computed at); `highlight` = (x value, y value) outlines one cell."""
    cells = sweep_cells(members, x, y, gap=gap, train_acc=train_acc, test_acc=test_acc)
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
    layout(fig, title or f"Phases over {x} × {y}", height=max(360, 120 + 48 * len(ys)))
    if thresholds:
        fig.update_layout(title=dict(subtitle=dict(text=thresholds, font=dict(size=11))), margin=dict(t=80))
    fig.update_layout(hovermode="closest", hoverdistance=-1)  # Streamlit sets click-to-select (it needs no drag-select)
    _cell_axes(fig, members, x, y)
    _highlight(fig, members, x, y, highlight)
    return fig


def grok_steps_figure(members: pd.DataFrame, x: str, y: str, *, title: str | None = None,
                      highlight: tuple | None = None) -> go.Figure:
    """The median grok step (first step with test accuracy >= 99%) of each (x, y) cell on a log colour
    scale, censored-aware (`lab.sweeps.stats`): a member that never grokked is later than its steps,
    never a number; a cell whose median depends on such a member is grey and reads "> N" (its lower
    bound), and "(k ✗)" counts a cell's members that never grokked."""
    cells = sweep_cells(members, x, y)
    xs, ys = axis_values(members, x), axis_values(members, y)
    z = np.full((len(ys), len(xs)), np.nan)
    never = np.full((len(ys), len(xs)), np.nan)
    text = np.full((len(ys), len(xs)), "", dtype=object)
    for cell in cells.itertuples():
        median, exact = stats.stat_value(cell._asdict(), "grok_median")
        if not cell.finished:
            text[cell.iy, cell.ix] = "running"
            never[cell.iy, cell.ix] = 0
        elif not exact or math.isnan(median):  # the median member never grokked within its steps: censored
            never[cell.iy, cell.ix] = 0
            text[cell.iy, cell.ix] = f"> {step_label(median)}" if not math.isnan(median) else "never"
        else:
            z[cell.iy, cell.ix] = math.log10(max(median, 1.0))
            text[cell.iy, cell.ix] = step_label(round(median)) + (f" ({cell.never} ✗)" if cell.never else "")
    finite = z[np.isfinite(z)]
    lo, hi, ticks = log_ticks(10.0 ** finite if finite.size else [1.0, 10.0])
    fig = go.Figure()
    fig.add_trace(go.Heatmap(
        z=never, x=list(range(len(xs))), y=list(range(len(ys))), zmin=0, zmax=1, showscale=False, hoverinfo="skip",
        colorscale=[[0, NEVER_COLOR], [1, NEVER_COLOR]], xgap=2, ygap=2, name="never grokked",
    ))
    fig.add_trace(go.Heatmap(
        z=z, x=list(range(len(xs))), y=list(range(len(ys))), zmin=math.log10(lo), zmax=math.log10(hi),
        colorscale="Viridis_r",
        colorbar=dict(title="grok step", tickvals=[math.log10(t) for t in ticks], ticktext=[step_label(t) for t in ticks]),
        hoverinfo="skip", xgap=2, ygap=2, name="grok step",
    ))
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name="“> N”: the median never grokked within N steps",
                             marker=dict(symbol="square", size=12, color=NEVER_COLOR)))
    fig.add_trace(go.Scatter(  # the labels, as text on the cells (one trace for both heatmaps)
        x=cells["ix"], y=cells["iy"], mode="text", text=[text[r.iy, r.ix] for r in cells.itertuples()],
        # dark text on the light (early) end of Viridis_r and on grey, white on the dark (late) end
        textfont=dict(size=12, color=["white" if np.isfinite(z[r.iy, r.ix])
                                      and (z[r.iy, r.ix] - math.log10(lo)) / math.log10(hi / lo) > 0.5
                                      else "black" for r in cells.itertuples()]),
        hoverinfo="skip", showlegend=False, name="labels"))
    fig.add_trace(_cell_picker(cells))
    layout(fig, title or f"Median grok step (test acc ≥ 99%) over {x} × {y}", height=max(360, 120 + 48 * len(ys)))
    fig.update_layout(hovermode="closest", hoverdistance=-1)  # Streamlit sets click-to-select (it needs no drag-select)
    _cell_axes(fig, members, x, y)
    _highlight(fig, members, x, y, highlight)
    return fig


def sweep_outcome_table(members: pd.DataFrame, axis: str, outcome: str, *, by: str | None = None,
                        missing: str = "censor") -> pd.DataFrame:
    """`lab.sweeps.stats.outcome_table`: the numbers `sweep_outcome_figure` draws and `lab.Sweep.outcome_by`
    returns (median, q25, q75, min, max, mean, each exact or censored with its bound in `<stat>_above`)."""
    return stats.outcome_table(members, axis, outcome, by=by, missing=missing)


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
    Hollow markers: some members never reached a step outcome within their steps; an open ▲: the median
    itself is censored, drawn at its lower bound (the hover says "> N"). A censored quartile or
    extreme is drawn at its lower bound too."""
    if spread not in SPREADS:
        raise ValueError(f"spread must be one of {', '.join(map(repr, SPREADS))}, got {spread!r}")
    lo_col, hi_col, spread_name = SPREADS[spread]
    steps = outcome in STEP_OUTCOMES
    log_y = steps if log_y is None else log_y
    values = list(dict.fromkeys(table[axis]))
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    log_x = numeric and bool(values) and min(values) > 0 and max(values) / min(values) >= 10  # lr, weight decay, init scale
    groups = [(None, table)] if by is None else [(g, table[table[by] == g]) for g in dict.fromkeys(table[by])]
    fmt = step_label if steps else (lambda v: f"{v:.4g}")
    fig = go.Figure()
    drawn: list[float] = []
    for i, (group, rows) in enumerate(groups):
        color = PALETTE[i % len(PALETTE)]
        rows = [row for _, row in rows.iterrows()]
        xs = [row[axis] if numeric else value_text(row[axis]) for row in rows]
        name = outcome if group is None else f"{by} = {value_text(group)}"
        # censored statistics are drawn at their lower bound: the median as an open ▲ ("later than this")
        medians = [stats.stat_value(row, "median") for row in rows]
        lows = [stats.stat_value(row, lo_col)[0] for row in rows]
        highs = [stats.stat_value(row, hi_col)[0] for row in rows]
        drawn += [v for v, _ in medians] + lows + highs
        fig.add_trace(go.Scatter(x=xs + xs[::-1], y=highs + lows[::-1], fill="toself", fillcolor=color, opacity=0.18,
                                 line=dict(width=0), hoverinfo="skip", showlegend=False, legendgroup=name,
                                 name=f"{name} ({spread_name})"))
        hover = [f"<b>{name}</b><br>{axis} = {value_text(row[axis])}<br>median {stats.stat_text(row, 'median', fmt)}"
                 f"<br>{spread_name} {stats.stat_text(row, lo_col, fmt)} to {stats.stat_text(row, hi_col, fmt)}"
                 f"<br>{int(row['n'])} finished members"
                 + (f", {int(row['n_censored'])} never reached it within their steps" if steps and row["n_censored"] else "")
                 + (f"; {int(row['n_unfinished'])} still training (left out)" if row["n_unfinished"] else "")
                 for row in rows]
        fig.add_trace(go.Scatter(
            x=xs, y=[v for v, _ in medians], mode="lines+markers", name=name, legendgroup=name,
            line=dict(color=color, width=2),
            marker=dict(size=[9 if exact else 12 for _, exact in medians],
                        symbol=["circle" if exact else "triangle-up-open" for _, exact in medians],
                        # white (hollow) where some never reached it; an open ▲ draws its outline in this colour
                        color=["white" if steps and row["n_censored"] and exact else color
                               for row, (_, exact) in zip(rows, medians)],
                        line=dict(color=color, width=2)),
            hovertext=hover, hovertemplate="%{hovertext}<extra></extra>",
        ))
    if steps and any(not exact for row in table.to_dict("records") for exact in [stats.stat_value(row)[1]]):
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name="median later than this (censored)",
                                 marker=dict(symbol="triangle-up-open", size=12, color="#444")))
    label = OUTCOME_LABELS.get(outcome, outcome)
    layout(fig, title or f"Median {label} against {axis} (band: {spread_name} over seeds)")
    fig.update_xaxes(title_text=axis + (" (log)" if log_x else ""), type="log" if log_x else ("linear" if numeric else "category"))
    if numeric:  # the swept values, not plotly's own ticks (decades and bare digits on log, 1.2, 1.4 on linear)
        fig.update_xaxes(tickmode="array", tickvals=values, ticktext=[value_text(v) for v in values])
    if log_y and steps:  # steps read as steps: 200, 500, 1000, 2000, 5k
        start, end, ticks = log_ticks(drawn)
        fig.update_yaxes(title_text=label + " (log)", type="log", range=[math.log10(start), math.log10(end)],
                         tickmode="array", tickvals=ticks, ticktext=[step_label(t) for t in ticks])
    elif log_y:
        fig.update_yaxes(**log_value_axis(drawn), title_text=label + " (log)")
    else:
        fig.update_yaxes(title_text=label, type="linear")
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
    if budget is not None:  # t_train / t_test were looked for up to here only: censored at it, not at the run's end
        members["budget"] = budget
    for key, value in (where or {}).items():
        stats.check_axes(members, key, sweep=sweep.name)
        members = members[members[key] == value]
    return members.reset_index(drop=True)


def _default_axes(sweep, x: str | None, y: str | None) -> tuple[str, str]:
    axes = [*sweep.axes, "seed"]
    x = x or axes[0]
    y = y or next(a for a in axes if a != x)
    stats.check_axes(sweep.members, x, y, sweep=sweep.name)
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
                                title=sweep_titles(sweep.name, x, y)["phase diagram"], gap=gap, train_acc=train_acc,
                                test_acc=test_acc)


def plot_grok_steps(sweep, x: str | None = None, y: str | None = None, *,
                    where: Mapping[str, object] | None = None) -> go.Figure:
    """The median grok step of every (x, y) cell of a sweep, log colour scale; never-grokked cells grey."""
    sweep = _sweep(sweep)
    x, y = _default_axes(sweep, x, y)
    return grok_steps_figure(sweep_members(sweep, where=where), x, y, title=sweep_titles(sweep.name, x, y)["grok steps"])


def plot_sweep_outcome(sweep, axis: str | None = None, outcome: str = "grok_step", *, by: str | None = None,
                       spread: str = "iqr", missing: str = "censor", log_y: bool | None = None,
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
