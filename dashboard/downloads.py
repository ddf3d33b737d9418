"""A page's figures as files: one self-contained HTML (always) and PNGs in a zip (where kaleido and a
Chromium it can drive are installed; nothing is ever downloaded)."""

from __future__ import annotations

import io
import os
import shutil
import zipfile
from typing import Mapping

import streamlit as st

from lab.plots import figures_html


def png_export_available() -> bool:
    """kaleido is installed and a Chromium it can drive is present (never downloaded)."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return False
    candidates = [os.environ.get("BROWSER_PATH"), shutil.which("chromium"), shutil.which("chromium-browser"),
                  shutil.which("google-chrome")]
    return any(c and os.path.exists(c) for c in candidates)


def png_zip(figures: Mapping[str, object]) -> bytes:
    import plotly.io as pio

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i, (name, fig) in enumerate(figures.items()):
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
            try:
                width = 1100
                height = int(fig.layout.height or 450)
                archive.writestr(f"{i:02d}_{safe}.png", pio.to_image(fig, format="png", width=width, height=height))
            except Exception as err:  # kaleido/Chromium trouble: say so inside the zip rather than fail the page
                archive.writestr(f"{i:02d}_{safe}.error.txt", f"PNG export failed: {err}\n")
    return buffer.getvalue()


def download_figures(figures: Mapping[str, object], page: str) -> None:
    """Buttons to download the page's figures: one HTML file (always), PNGs in a zip (where kaleido can run).
    The files are built only when a button is clicked."""
    figures = {name: fig for name, fig in figures.items() if fig is not None}
    if not figures:
        return
    slug = page.lower().replace(" ", "_")
    with st.expander(f"Download this page's figures ({len(figures)})"):
        cols = st.columns(2)
        cols[0].download_button("HTML (interactive, offline)", data=lambda: figures_html(figures, f"grokking-lab: {page}"),
                                file_name=f"{slug}.html", mime="text/html", key=f"dl_html_{slug}",
                                on_click="ignore")
        if png_export_available():
            cols[1].download_button("PNG (zip)", data=lambda: png_zip(figures), file_name=f"{slug}_png.zip",
                                    mime="application/zip", key=f"dl_png_{slug}", on_click="ignore")
        else:
            cols[1].caption("PNG export needs the `kaleido` package and Chromium (`apt install chromium`).")
