"""Runs: every run in the runs folder with its key config and results; ticking rows selects runs for every page."""

from __future__ import annotations

import streamlit as st

from dashboard import display, downloads, loading, selection, state
from lab import plots

st.title("Runs")

MISSING = "—"  # shown for a value the run's task does not have (a_and_b has no p, operator or train fraction)


def _hidden(column: dict) -> dict:
    """A column left out at first; the table's column menu (top right) shows it."""
    return {**column, "hidden": True}


# Widths in pixels, so that every column fits beside the sidebar on a laptop screen (1366 px).
COLUMNS = {
    "name": st.column_config.TextColumn("run", width=116),
    "task": st.column_config.TextColumn("task", width=64),
    "arch": _hidden(st.column_config.TextColumn("arch", width=60, help="model.arch: transformer, mlp, cnn or linear")),
    "n_params": _hidden(st.column_config.NumberColumn("params", format="%d", width=60, help="trained parameters")),
    "p": st.column_config.NumberColumn("p", format="%d", width=38),
    "operator": st.column_config.TextColumn("op", width=38),
    "train_frac": st.column_config.NumberColumn("frac", format="%.2f", width=46, help="training fraction"),
    "weight_decay": st.column_config.NumberColumn("wd", format="%g", width=44, help="weight decay"),
    "lr": st.column_config.NumberColumn("lr", format="%g", width=52, help="learning rate"),
    "layers": _hidden(st.column_config.NumberColumn("layers", format="%d", width=52)),
    "heads": _hidden(st.column_config.NumberColumn("heads", format="%d", width=52)),
    "status": st.column_config.TextColumn("status", width=66),
    "step": st.column_config.NumberColumn("step", format="%d", width=52, help="the last step trained"),
    "steps": _hidden(st.column_config.NumberColumn("of", format="%d", width=52, help="steps planned")),
    "memorize_step": st.column_config.NumberColumn("mem. at", format="%d", width=60,
                                                   help="first step with train accuracy >= 99%"),
    "grok_step": st.column_config.NumberColumn("grok at", format="%d", width=60,
                                               help="first step with test accuracy >= 99%"),
    "train_acc": st.column_config.NumberColumn("train", format="%.3f", width=56, help="train accuracy"),
    "test_acc": st.column_config.NumberColumn("test", format="%.3f", width=56, help="test accuracy"),
    "updated_at": st.column_config.DatetimeColumn("updated", format="distance", width=124,
                                                  help="when the run last wrote its summary"),
    "error": st.column_config.TextColumn("problem", width=240),
}


def _on_select() -> None:
    names = st.session_state.get("_table_names", [])
    rows = st.session_state["runs_table"].selection.rows
    st.session_state[state.SELECTED] = [names[i] for i in rows if i < len(names)]
    st.session_state[state.SELECTION_TOUCHED] = True


rows = state.rows()
if rows.empty:
    selection.no_runs_message()

    @st.fragment(run_every=selection.LIVE_REFRESH_S)
    def _wait_for_runs() -> None:
        if loading.list_runs():
            st.rerun()  # the first run appeared: draw the whole page

    _wait_for_runs()
    st.stop()

cols = st.columns([2, 1, 1])
query = cols[0].text_input("Filter by name", key="runs_filter", placeholder="part of a run name")
tasks = cols[1].multiselect("Task", sorted(t for t in rows["task"].dropna().unique()), key="runs_tasks")
statuses = cols[2].multiselect("Status", sorted(rows["status"].dropna().unique()), key="runs_status")


@st.fragment(run_every=selection.live_interval())
def runs_table() -> None:
    table = loading.run_rows()
    st.session_state[state.ROWS] = table
    if query:
        table = table[table["name"].str.contains(query, case=False, regex=False)]
    if tasks:
        table = table[table["task"].isin(tasks)]
    if statuses:
        table = table[table["status"].isin(statuses)]
    table = table.reset_index(drop=True)
    st.session_state["_table_names"] = list(table["name"])
    shown = [c for c in COLUMNS if c != "error" or table["error"].notna().any()]
    st.dataframe(table[shown], column_config=COLUMNS, hide_index=True, key="runs_table", placeholder=MISSING,
                 on_select=_on_select, selection_mode="multi-row", width="stretch")
    n_running = int((table["status"] == "running").sum())
    st.caption(f"{len(table)} of {len(state.rows())} runs shown. Click a header to sort; tick rows to select "
               "runs (the selection is in the sidebar and carries to every page)."
               + (f" {n_running} still training: this table refreshes every {selection.LIVE_REFRESH_S:g} s." if n_running else ""))


runs_table()

st.subheader("Grokking curves of the selected runs")
paths = selection.selected_paths()


@st.fragment(run_every=selection.live_interval(paths))
def overview() -> None:
    if not paths:
        st.info("Select runs (tick rows above, or in the sidebar) to see their curves.")
        return
    metrics, events = {}, {}
    for name, path in paths.items():
        with display.guard(name):
            metrics[name] = loading.get_metrics(path)
            events[name] = loading.summary(loading.get_run(path))
    fig = plots.curves_figure(metrics, "accuracy", log_x=True, log_y=False, events=events)
    display.chart(fig, key="runs_overview")
    st.session_state["_runs_figures"] = {"accuracy": fig}


overview()
downloads.download_figures(st.session_state.get("_runs_figures", {}), "Runs")
