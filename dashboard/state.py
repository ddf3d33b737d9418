"""What a browser session remembers across pages and reruns (Streamlit's session state).

Streamlit forgets the value of a widget whose page is not shown; `restore` and `keep` carry a
widget's value over a visit to another page, so coming back finds the checkpoint, the run and the
sentence where the user left them.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

SELECTED = "selected_runs"  # the sidebar's run selection, shared by every page
ROWS = "_rows"  # the runs table (loading.run_rows) of this script run
SELECTION_TOUCHED = "_selection_touched"  # the user changed the selection (so an empty one is meant)
TABLE_ROWS = "_table_rows"  # the run names of the Runs table's rows, in the order last drawn
TICKED = "_ticked"  # the user just ticked rows of the Runs table (the app reruns to redraw the sidebar)


def rows() -> pd.DataFrame:
    """The runs table read at the top of this script run (app.py), empty before the first."""
    table = st.session_state.get(ROWS)
    return table if table is not None else pd.DataFrame()


def selected_names() -> list[str]:
    return list(st.session_state.get(SELECTED, []))


def restore(key: str, options: list, default=None) -> None:
    """Give a widget back the value it had when the user was last on this page; drop a value that
    is no longer an option (a run removed, a checkpoint deleted)."""
    if key not in st.session_state and f"_keep:{key}" in st.session_state:
        st.session_state[key] = st.session_state[f"_keep:{key}"]
    if key in st.session_state and st.session_state[key] not in options:
        del st.session_state[key]
    if key not in st.session_state and default is not None:
        st.session_state[key] = default


def keep(key: str, value) -> None:
    st.session_state[f"_keep:{key}"] = value
