"""The grokking-lab dashboard: `lab dashboard` runs `streamlit run dashboard/app.py` (see lab/dashboard_server.py).

The runs folder comes from $LAB_RUNS_DIR (default ./runs). Pages live in dashboard/views/ (not
`pages/`, which Streamlit would pick up by itself); they share dashboard/common.py and build their
plotly figures with dashboard/figures.py. Everything about runs is read through the public `lab` API.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `dashboard/` is a top-level folder of the repository, next to the `lab` package, not inside it:
# put the repository root on the path so that `import dashboard.common` works however Streamlit was started.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from dashboard import common  # noqa: E402

st.set_page_config(page_title="grokking-lab", page_icon=":material/monitoring:", layout="wide")

HERE = Path(__file__).resolve().parent
pages = [
    st.Page(HERE / "views" / "runs.py", title="Runs", icon=":material/table_rows:", default=True),
    st.Page(HERE / "views" / "curves.py", title="Curves", icon=":material/show_chart:"),
    st.Page(HERE / "views" / "attention.py", title="Attention", icon=":material/grid_on:"),
    st.Page(HERE / "views" / "progress.py", title="Progress measures", icon=":material/waves:"),
    st.Page(HERE / "views" / "heads.py", title="Heads", icon=":material/hub:"),
]
navigation = st.navigation(pages)

st.session_state["_rows"] = common.run_rows()
common.sidebar_selection(st.session_state["_rows"])

navigation.run()
