"""The look every figure shares: colours, the step axis, titles and legends, log axes, square grids.

Each page's module (curves, attention, progress, heads, sweeps) draws with these, so a run has one
colour on every page and every step axis reads the same."""

from __future__ import annotations

import math
import zlib
from typing import Iterable

import numpy as np
import plotly.graph_objects as go

PALETTE = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e",
    "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
]
ATTENTION_SCALE = "Viridis"
SPLIT_DASH = {"train": "dot", "test": "solid"}


# --- colours ---------------------------------------------------------------------------------------


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


# --- axes and layout ---------------------------------------------------------------------------------


def layout(fig: go.Figure, title: str, height: int = 420) -> go.Figure:
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


def log_ticks(values: Iterable[float], min_ticks: int = 3) -> tuple[float, float, list[float]]:
    """(start, end, ticks) of a log scale over these positive values: start and end the nice values
    (1, 2, 5 × 10^k) around them, ticks at 1, 2, 5 × 10^k between (decades only over more than three
    decades; every 1..9 × 10^k when 1, 2, 5 would give fewer than `min_ticks`), so a narrow range
    still gets several labels."""
    values = np.asarray([v for v in values if v is not None and np.isfinite(v) and v > 0], dtype=float)
    if values.size == 0:
        return 1.0, 10.0, [1.0, 10.0]
    lo, hi = float(values.min()), float(values.max())
    decades = range(math.floor(math.log10(lo)), math.floor(math.log10(hi)) + 2)
    nice = [m * 10.0**d for d in decades for m in (1, 2, 5)]
    start = max((v for v in nice if v <= lo * (1 + 1e-9)), default=lo)
    end = min((v for v in nice if v >= hi * (1 - 1e-9)), default=hi)
    if end <= start:
        end = start * 2
    for every in ((1,) if math.log10(end / start) > 3 else (1, 2, 5), tuple(range(1, 10))):
        ticks = [m * 10.0**d for d in decades for m in every]
        ticks = [v for v in ticks if start * (1 - 1e-9) <= v <= end * (1 + 1e-9)]
        if len(ticks) >= min_ticks:
            break
    return start, end, ticks


def log_step_axis(steps: Iterable[float]) -> dict:
    """A log x axis over these steps whose labels say which step they are: 10, 20, 50, 100, 200, 500,
    1000, 2000, 5000, 10k (every decade only, when the steps span more than three). Plotly's own log
    ticks label the decades and then bare digits (`100`, `2`, `3` ... `9`), which a reader cannot place.
    The range runs from the nice value below the first step to the one above the last, so the last
    decade is labelled too."""
    steps = [s for s in steps if s is not None and np.isfinite(s) and s > 0]
    if not steps:
        return dict(type="log")
    start, end, ticks = log_ticks(steps)
    return dict(type="log", range=[math.log10(start), math.log10(end)], tickmode="array",
                tickvals=ticks, ticktext=[step_label(v) for v in ticks])


def power_label(value: float) -> str:
    """A power of ten as it reads on a log axis: 10⁻², 10⁻¹, 10⁰, 10¹ (every decade the same way)."""
    exponent = round(math.log10(value))
    return "10" + str(exponent).translate(str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹"))


def log_value_axis(values: Iterable[float]) -> dict:
    """A log y axis labelled at every decade the values span, all written alike (10⁻¹, 10⁰, 10¹):
    plotly's exponentformat="power" writes "1" and "10" beside "10⁻¹"."""
    values = np.asarray([v for v in values if v is not None and np.isfinite(v) and v > 0], dtype=float)
    if values.size == 0:
        return dict(type="log", exponentformat="power")
    lo, hi = math.floor(math.log10(values.min())), math.ceil(math.log10(values.max()))
    hi = max(hi, lo + 1)
    ticks = [10.0**d for d in range(lo, hi + 1)]
    # the range is whole decades, so that at least two labelled ticks are always in view
    return dict(type="log", range=[lo, hi], tickmode="array", tickvals=ticks, ticktext=[power_label(t) for t in ticks])


def value_axis_log(fig: go.Figure, **kwargs) -> None:
    """Make the y axis of a figure log, labelled by `log_value_axis` over the values its traces hold."""
    values = [v for trace in fig.data if trace.y is not None
              for v in np.asarray([np.nan if y is None else y for y in trace.y], dtype=float)]
    fig.update_yaxes(**log_value_axis(values), **kwargs)


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """About `target` round tick values (1, 2, 2.5 or 5 × 10^k apart) covering [lo, hi]: 900, 1000, 1100,
    not plotly's 940, 1170, 1401 where a second y axis follows the first one's grid."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(target - 1, 1)
    base = 10.0 ** math.floor(math.log10(raw))
    spacing = next(m * base for m in (1, 2, 2.5, 5, 10) if m * base >= raw)
    first = math.floor(lo / spacing) * spacing
    count = math.ceil((hi - first) / spacing - 1e-9) + 1
    return [round(first + i * spacing, 10) for i in range(count)]


def square_cells(fig: go.Figure, row: int, col: int, index: int) -> None:
    """Square cells in the heatmap of subplot (row, col), the `index`-th subplot (0-based): the panel
    shrinks to a square rather than stretching the cells."""
    fig.update_xaxes(constrain="domain", row=row, col=col)
    fig.update_yaxes(scaleanchor=f"x{index + 1 if index else ''}", scaleratio=1, constrain="domain", row=row, col=col)


def over_training(df, log_x: bool):
    """A metrics frame in step order, without step 0 on a log step axis (where it has no place)."""
    df = df.sort_values("step")
    return df[df["step"] > 0] if log_x else df


def step_axis(fig: go.Figure, log_x: bool, **kwargs) -> None:
    """The step (x) axis of a figure: linear, or log with labelled ticks over the steps its traces hold."""
    if not log_x:
        fig.update_xaxes(title_text="step", type="linear", **kwargs)
        return
    steps = [x for trace in fig.data if trace.x is not None for x in np.asarray(trace.x, dtype=float)]
    fig.update_xaxes(title_text="step (log)", **log_step_axis(steps), **kwargs)


def as_numpy(values) -> np.ndarray:
    """A tensor (any device) or array-like as a float numpy array."""
    return np.asarray(values.detach().cpu() if hasattr(values, "detach") else values, dtype=float)
