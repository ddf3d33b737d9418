"""The grokking-lab dashboard: `lab dashboard` runs `streamlit run` on this file (lab/dashboard_server.py).

The runs folder is lab.runs.storage.default_runs_dir() ($LAB_RUNS_DIR, default ./runs). Pages live in
views/ (not `pages/`, which Streamlit would pick up by itself). They read runs through the public
`lab` API and the cached helpers beside this file (loading, selection, state, display, downloads,
background), and draw with lab.plots, the figures a notebook gets from `lab.plot_*`. `dashboard` is
installed with the `lab` package (pyproject.toml), so `import dashboard` works however Streamlit was
started. Streamlit's settings (headless, no usage statistics) are in .streamlit/config.toml here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import streamlit as st
from PIL import Image

from dashboard import loading, selection, state



def _icon() -> Image.Image:
    """The tab's icon, drawn here: a ":material/..." icon would be fetched from Google's font servers,
    which an offline machine cannot reach. A blue test curve that jumps up late (grokking)."""
    icon = np.full((32, 32, 3), 255, dtype=np.uint8)
    for x in range(2, 30):
        y = 26 if x < 20 else 6 + max(0, 24 - x) * 5  # flat, then the jump
        icon[y - 1:y + 2, x] = (31, 119, 180)
    return Image.fromarray(icon)


st.set_page_config(page_title="grokking-lab", page_icon=_icon(), layout="wide")

VIEWS = Path(__file__).resolve().parent / "views"
pages = [
    st.Page(VIEWS / "runs.py", title="Runs", icon=":material/table_rows:", default=True),
    st.Page(VIEWS / "curves.py", title="Curves", icon=":material/show_chart:"),
    st.Page(VIEWS / "attention.py", title="Attention", icon=":material/grid_on:"),
    st.Page(VIEWS / "progress.py", title="Progress measures", icon=":material/waves:"),
    st.Page(VIEWS / "heads.py", title="Heads", icon=":material/hub:"),
    st.Page(VIEWS / "circuits.py", title="Circuits", icon=":material/account_tree:"),
    st.Page(VIEWS / "induction.py", title="Induction heads", icon=":material/repeat:"),
    st.Page(VIEWS / "sweeps.py", title="Sweeps", icon=":material/grid_view:"),
]
navigation = st.navigation(pages)

st.session_state[state.ROWS] = loading.run_rows()
selection.sidebar_selection(state.rows())

navigation.run()
