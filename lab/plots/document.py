"""Several figures in one self-contained HTML file (the pages' "download figures")."""

from __future__ import annotations

from typing import Mapping

import plotly.graph_objects as go


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
