"""The Attention page's figures: every head's pattern over an input (a causal model's masked cells grey),
the read position's row as a strip for long inputs, the modular task's attention over all pairs (a, b),
and a text run's likeliest next tokens after every position."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lab.plots.style import ATTENTION_SCALE, as_numpy, layout, square_cells

if TYPE_CHECKING:
    from lab.analysis.attention import AttentionResult
    from lab.runs.run import Run

LONG_INPUT = 48  # tokens: above this an attention grid gets one head per row, every row labelled
MIN_CELL_PX = 14  # the height of a query row: a tick label (12 px font) fits in it, so every row is labelled
STRIP_WINDOW = 80  # positions the read-position strip shows at once (a range slider pans along)
PLOT_WIDTH_PX = 620  # about the plotting width of a dashboard column, to tell whether key labels fit
CHAR_PX = 7.5  # about the width of one character of a 12 px tick label
LINE_PX = 12  # the height of a tick label's line


def _key_labels(tokens: Sequence[str], cell_px: float) -> list[str]:
    """Key labels of a narrow-column strip that never overlap: a label wider than its column (`<cls>`
    beside one-character columns) drops to a second line, below its neighbours' labels."""
    return [f"<br>{t}" if len(t) * CHAR_PX > cell_px and len(t) > 1 else t for t in tokens]


def _key_axis(tokens: Sequence[str], cell_px: float) -> dict:
    """Tick labels of a grid's keys that never cover each other: level when each fits its column; else
    slanted -45° (neighbours then lie cell_px·sin 45° apart: room for a 12 px line from 17 px columns
    on); else upright, every k-th key so that labelled keys lie LINE_PX apart."""
    if all(len(t) * CHAR_PX <= cell_px for t in tokens):
        return {**_index_axis(tokens), "tickangle": 0}
    if cell_px * math.sin(math.radians(45)) >= LINE_PX:
        return {**_index_axis(tokens), "tickangle": -45}
    every = math.ceil(LINE_PX / cell_px)
    return {**_index_axis(tokens, math.ceil(len(tokens) / every)), "tickangle": -90}


def _index_axis(labels: Sequence[str], max_labels: int = 10_000) -> dict:
    """Tick labels for a numeric axis: tokens repeat ("a", "a"), so the axis must not be categorical."""
    n = len(labels)
    step = max(1, math.ceil(n / max_labels))
    ticks = list(range(0, n, step))
    return dict(tickmode="array", tickvals=ticks, ticktext=[labels[i] for i in ticks], tickangle=0)


MASKED_COLOR = "#c8c8c8"  # the grey of cells a query may not look at: masked, which is not the same as zero attention


def attention_grid_figure(pattern, tokens: Sequence[str], title: str = "Attention", mask=None) -> go.Figure:
    """One heatmap per (layer, head) of a (layer, head, query, key) pattern, rows queries, columns keys,
    both labelled with the tokens; colour scale fixed to 0..1. Where `mask` (query, key) is True (a causal
    model's later keys) the cell is left empty, showing the grey MASKED_COLOR behind it, and has no hover.

    Every query row is at least MIN_CELL_PX tall, so that every row carries its token's label. Up to
    LONG_INPUT tokens the heads sit side by side, one row per layer, with square cells; a longer
    input gets one head per row (its columns narrower than its rows: the key labels are thinned to
    those that fit, and the mouse zooms in). Where a key label is wider than its column (`<cls>`),
    the key labels slant so that none covers its neighbour's."""
    pattern = as_numpy(pattern)
    n_layers, n_heads, n_q, n_k = pattern.shape
    if mask is not None:
        pattern = np.where(as_numpy(mask)[None, None] > 0, np.nan, pattern)  # (query, key) over every head
    tokens = list(tokens)
    long = max(n_q, n_k) > LONG_INPUT
    rows, cols = (n_layers * n_heads, 1) if long else (n_layers, n_heads)
    panel = max(n_q * MIN_CELL_PX, 260 if n_heads > 2 else 300)  # px per subplot row
    key_axis = _key_axis(tokens[:n_k], PLOT_WIDTH_PX / cols / n_k)
    # slanted key labels (words) hang below their panel: the next row's titles move down by their height
    slant_px = max(map(len, tokens[:n_k])) * CHAR_PX * math.sin(math.radians(45)) if key_axis["tickangle"] == -45 else 0.0
    plot_px = rows * panel + (rows - 1) * slant_px
    fig = make_subplots(
        rows=rows, cols=cols, horizontal_spacing=0.06,
        vertical_spacing=(min(0.12 if rows > 1 else 0.05, 80 / (rows * panel + 1)) * rows * panel + slant_px) / (plot_px + 1),
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
                customdata=hover, hoverongaps=False,
                hovertemplate=f"L{layer}H{head}<br>query→key %{{customdata}}<br>attention %{{z:.4f}}<extra></extra>",
                name=f"L{layer}H{head}",
            ), row=row, col=col)
            fig.update_xaxes(title_text="key" if row == rows else None, showgrid=False, zeroline=False, **key_axis, row=row, col=col)
            fig.update_yaxes(title_text="query" if col == 1 else None, autorange="reversed", showgrid=False, zeroline=False,
                             **_index_axis(tokens[:n_q]), row=row, col=col)
            if not long:
                square_cells(fig, row, col, index)
    fig.update_layout(title=dict(text=title, x=0.01), height=80 + round(plot_px) + 40,
                      margin=dict(l=60, r=20, t=80, b=50), template="plotly_white")
    if mask is not None:
        fig.update_layout(plot_bgcolor=MASKED_COLOR)  # shows through the empty (masked) cells only
    return fig


def attention_figure(result: "AttentionResult", run_name: str) -> go.Figure:
    """`attention_grid_figure` of one `lab.attention` result, titled with the run and checkpoint; a causal
    model's masked cells grey."""
    masked = "; grey: masked (causal)" if result.mask is not None else ""
    return attention_grid_figure(
        result.pattern, result.tokens, mask=result.mask,
        title=f"{run_name}, step {result.step}: attention per head (rows: queries, columns: keys){masked}")


def next_tokens_figure(result: "AttentionResult", run_name: str) -> go.Figure:
    """A next-token run's TOP_K likeliest next tokens after every position of a `lab.attention` result, as a
    table: one row per position (labelled with its token), one column per rank and a last column with
    the token typed next; each cell the token and its probability, coloured by the probability (0..1)."""
    if not result.top_next:
        raise ValueError("no next-token predictions: this is for next-token runs (the text task), not classifiers")
    n_pos, k = len(result.top_next), len(result.top_next[0])
    typed = [(result.tokens[pos + 1], result.typed_next_probability[pos]) if pos + 1 < n_pos else ("", float("nan"))
             for pos in range(n_pos)]
    cells = [row + [typed[pos]] for pos, row in enumerate(result.top_next)]  # (pos, k + 1) of (label, probability)
    z = np.array([[p for _, p in row] for row in cells])  # (pos, k + 1)
    text = [[f"{label} {p:.2f}" if label else "" for label, p in row] for row in cells]
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(k + 1)), y=list(range(n_pos)), zmin=0.0, zmax=1.0, colorscale="Blues",
        colorbar=dict(title="probability"), xgap=2, ygap=2, hoverongaps=False,
        text=text, texttemplate="%{text}", textfont=dict(size=12),
        customdata=np.array([[f"{pos}:{result.tokens[pos]}"] * (k + 1) for pos in range(n_pos)]),
        hovertemplate="after %{customdata}: %{text}<extra></extra>",
    ))
    layout(fig, f"{run_name}, step {result.step}: the {k} likeliest next tokens after each position, and the one typed",
           height=150 + max(n_pos, 3) * 26)
    fig.update_xaxes(tickmode="array", tickvals=list(range(k + 1)), side="top",
                     ticktext=[f"#{r}" for r in range(1, k + 1)] + ["typed next"], showgrid=False)
    fig.update_yaxes(autorange="reversed", showgrid=False, **_index_axis([f"{i}:{t}" for i, t in enumerate(result.tokens)]))
    return fig


def read_attention_figure(result: "AttentionResult", read_position: int | None, run_name: str) -> go.Figure:
    """The one row that decides the answer: attention from the read position (`<cls>` for a_and_b,
    `=` for modular; `read_position` None: the last word of a next-token run) to every position, one strip
    per head, every column labelled with its token. A long input shows STRIP_WINDOW positions at once, around the most attended one, with a range
    slider underneath to pan along."""
    pattern = as_numpy(result.pattern)
    n_layers, n_heads, n_q, n_k = pattern.shape
    query = -1 % n_q if read_position is None else read_position % n_q  # None: a next-token run's last word
    z = pattern[:, :, query, :].reshape(n_layers * n_heads, n_k)  # (layer*head, key)
    heads = [f"L{layer}H{head}" for layer in range(n_layers) for head in range(n_heads)]
    tokens = list(result.tokens)[:n_k]
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(n_k)), y=heads, zmin=0.0, zmax=1.0, colorscale=ATTENTION_SCALE,
        colorbar=dict(title="attention"), xgap=1, ygap=1,
        customdata=np.array([[f"{k}:{t}" for k, t in enumerate(tokens)]] * len(heads)),
        hovertemplate="%{y}<br>" + f"{tokens[query]} → " + "%{customdata}<br>attention %{z:.4f}<extra></extra>",
    ))
    layout(fig, f"{run_name}, step {result.step}: what {tokens[query]} reads, per head ({n_k} positions)",
            height=140 + 34 * len(heads) + (60 if n_k > STRIP_WINDOW else 0))
    # The window opens where the read position looks hardest (the lone `a` in a long sentence, say).
    start = int(np.clip(int(np.argmax(z.max(axis=0))) - STRIP_WINDOW // 2, 0, max(0, n_k - STRIP_WINDOW)))
    fig.update_xaxes(title_text="position: " + ("token" if read_position is None else "character"), tickmode="array", tickvals=list(range(n_k)),
                     ticktext=_key_labels(tokens, PLOT_WIDTH_PX / min(n_k, STRIP_WINDOW)), tickangle=0, range=[start - 0.5, start + min(n_k, STRIP_WINDOW) - 0.5])
    if n_k > STRIP_WINDOW:
        fig.update_xaxes(rangeslider=dict(visible=True, thickness=0.12))
    fig.update_yaxes(autorange="reversed", type="category")
    return fig


def modular_grid_figure(grid, title: str = "Attention from '=' to 'a' over all (a, b)") -> go.Figure:
    """One p-by-p heatmap per (layer, head) of a (layer, head, p, p) tensor: rows a, columns b, 0..1, each square."""
    grid = as_numpy(grid)
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
            square_cells(fig, layer + 1, head + 1, layer * n_heads + head)  # p × p: a square, as the table is
    fig.update_layout(title=dict(text=title, x=0.01), height=80 + 300 * n_layers, template="plotly_white",
                      margin=dict(l=60, r=20, t=80, b=50))
    return fig


def modular_attention_figure(grid, run_name: str, step: int) -> go.Figure:
    """`modular_grid_figure` of one `lab.modular_attention_grid` result, titled with the run and checkpoint."""
    return modular_grid_figure(grid, title=f"{run_name}, step {step}: attention = → a")


# --- one call from a notebook ------------------------------------------------------------------------


def plot_attention(run: "Run", text: str, step: int | None = None) -> go.Figure:
    """Every head's attention pattern over `text` at a checkpoint (default: the last), as on the
    Attention page; e.g. `plot_attention(run, "grab a cab")`, `plot_attention(run, "5 + 7 =")` or, for a text
    run, `plot_attention(run, "To be, or not to be")` (a causal model's masked cells grey)."""
    from lab.analysis.attention import attention

    return attention_figure(attention(run, text, step=step), run.name)


def plot_read_attention(run: "Run", text: str, step: int | None = None) -> go.Figure:
    """What the read position (`<cls>` or `=`; a text run's last word) attends to, one strip per head: the
    Attention page's view of long inputs."""
    from lab.analysis.attention import attention

    return read_attention_figure(attention(run, text, step=step), run.task.read_position, run.name)


def plot_next_tokens(run: "Run", text: str, step: int | None = None) -> go.Figure:
    """A next-token run's TOP_K likeliest next tokens (with probabilities) after every position of `text`,
    e.g. `plot_next_tokens(run, "To be, or not to be")`: the Attention page's table of them."""
    from lab.analysis.attention import attention

    return next_tokens_figure(attention(run, text, step=step), run.name)


def plot_modular_attention(run: "Run", step: int | None = None) -> go.Figure:
    """Attention from `=` to `a` over every pair (a, b), one p-by-p grid per head (modular runs)."""
    from lab.analysis.attention import modular_attention_grid

    step = run.resolve_step(step)
    return modular_attention_figure(modular_attention_grid(run, step=step), run.name, step)
