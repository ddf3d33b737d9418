"""Runs: every run in the runs folder with its key config and results; ticking rows selects runs for every page."""

from __future__ import annotations

import streamlit as st

from dashboard import common, figures

st.title("Runs")

COLUMNS = {
    "name": st.column_config.TextColumn("run"),
    "task": st.column_config.TextColumn("task"),
    "p": st.column_config.NumberColumn("p", format="%d"),
    "operator": st.column_config.TextColumn("op"),
    "train_frac": st.column_config.NumberColumn("train frac", format="%.2f"),
    "weight_decay": st.column_config.NumberColumn("weight decay", format="%g"),
    "lr": st.column_config.NumberColumn("lr", format="%g"),
    "layers": st.column_config.NumberColumn("layers", format="%d"),
    "heads": st.column_config.NumberColumn("heads", format="%d"),
    "status": st.column_config.TextColumn("status"),
    "step": st.column_config.NumberColumn("step", format="%d"),
    "steps": st.column_config.NumberColumn("of", format="%d"),
    "memorize_step": st.column_config.NumberColumn("memorized at", format="%d"),
    "grok_step": st.column_config.NumberColumn("grokked at", format="%d"),
    "train_acc": st.column_config.NumberColumn("train acc", format="%.4f"),
    "test_acc": st.column_config.NumberColumn("test acc", format="%.4f"),
    "updated_at": st.column_config.DatetimeColumn("updated (UTC)", format="YYYY-MM-DD HH:mm:ss"),
    "error": st.column_config.TextColumn("problem"),
}


def _on_select() -> None:
    names = st.session_state.get("_table_names", [])
    rows = st.session_state["runs_table"].selection.rows
    st.session_state[common.SELECTED] = [names[i] for i in rows if i < len(names)]
    st.session_state["_selection_touched"] = True


rows = st.session_state["_rows"]
if rows.empty:
    common.no_runs_message()

    @st.fragment(run_every=common.LIVE_REFRESH_S)
    def _wait_for_runs() -> None:
        if common.list_runs():
            st.rerun()  # the first run appeared: draw the whole page

    _wait_for_runs()
    st.stop()

cols = st.columns([2, 1, 1])
query = cols[0].text_input("Filter by name", key="runs_filter", placeholder="part of a run name")
tasks = cols[1].multiselect("Task", sorted(t for t in rows["task"].dropna().unique()), key="runs_tasks")
statuses = cols[2].multiselect("Status", sorted(rows["status"].dropna().unique()), key="runs_status")


@st.fragment(run_every=common.live_interval())
def runs_table() -> None:
    table = common.run_rows()
    st.session_state["_rows"] = table
    if query:
        table = table[table["name"].str.contains(query, case=False, regex=False)]
    if tasks:
        table = table[table["task"].isin(tasks)]
    if statuses:
        table = table[table["status"].isin(statuses)]
    table = table.reset_index(drop=True)
    st.session_state["_table_names"] = list(table["name"])
    shown = [c for c in COLUMNS if c != "error" or table["error"].notna().any()]
    st.dataframe(table[shown], column_config=COLUMNS, hide_index=True, key="runs_table",
                 on_select=_on_select, selection_mode="multi-row", width="stretch")
    n_running = int((table["status"] == "running").sum())
    st.caption(f"{len(table)} of {len(st.session_state['_rows'])} runs shown. Click a header to sort; tick rows to select "
               "runs (the selection is in the sidebar and carries to every page)."
               + (f" {n_running} still training: this table refreshes every {common.LIVE_REFRESH_S:g} s." if n_running else ""))


runs_table()

st.subheader("Grokking curves of the selected runs")
paths = common.selected_paths()


@st.fragment(run_every=common.live_interval(paths))
def overview() -> None:
    if not paths:
        st.info("Select runs (tick rows above, or in the sidebar) to see their curves.")
        return
    metrics, events = {}, {}
    for name, path in paths.items():
        with common.guard(name):
            metrics[name] = common.get_metrics(path)
            events[name] = common.summary(common.get_run(path))
    fig = figures.curves_figure(metrics, "accuracy", log_x=True, log_y=False, events=events)
    common.chart(fig, key="runs_overview")
    st.session_state["_runs_figures"] = {"accuracy": fig}


overview()
common.download_figures(st.session_state.get("_runs_figures", {}), "Runs")
