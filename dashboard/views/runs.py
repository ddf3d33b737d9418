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


# Widths in pixels, so that every column fits beside the sidebar on a laptop screen (1366 px): the run
# column is wide enough for a sweep member's name (its values and seed, e.g. init_scale2.0-weight_decay1.0-seed1),
# which is what tells the members apart; "updated" is left out at first to make room (the rows are newest first).
COLUMNS = {
    "name": None,  # SWEEP/MEMBER, the name the sidebar shows: the data behind the two columns below, not drawn
    "sweep": st.column_config.TextColumn("sweep", width=70, help="the sweep this run is a member of"),
    "run": st.column_config.TextColumn("run", width=222, help="the run's name; for a sweep member, its name in "
                                       "the sweep (its values and seed). The sidebar shows SWEEP/MEMBER."),
    "task": st.column_config.TextColumn("task", width=62),
    "arch": _hidden(st.column_config.TextColumn("arch", width=60, help="model.arch: transformer, mlp, cnn or linear")),
    "n_params": _hidden(st.column_config.NumberColumn("params", format="%d", width=60, help="trained parameters")),
    "p": st.column_config.NumberColumn("p", format="%d", width=34),
    "operator": st.column_config.TextColumn("op", width=36),
    "train_frac": st.column_config.NumberColumn("frac", format="%.2f", width=42, help="training fraction"),
    "weight_decay": st.column_config.NumberColumn("wd", format="%g", width=44, help="weight decay"),
    "lr": st.column_config.NumberColumn("lr", format="%g", width=46, help="learning rate"),
    "layers": _hidden(st.column_config.NumberColumn("layers", format="%d", width=52)),
    "heads": _hidden(st.column_config.NumberColumn("heads", format="%d", width=52)),
    "status": st.column_config.TextColumn("status", width=70),
    "step": st.column_config.NumberColumn("step", format="%d", width=44, help="the last step trained"),
    "steps": _hidden(st.column_config.NumberColumn("of", format="%d", width=52, help="steps planned")),
    "memorize_step": st.column_config.NumberColumn("mem.", format="%d", width=54,
                                                   help="memorised at: the first step with train accuracy >= 99%; "
                                                        "— if none within the steps trained (the step column)"),
    "grok_step": st.column_config.NumberColumn("grok at", format="%d", width=54,
                                               help="first step with test accuracy >= 99%; — if none within the "
                                                    "steps trained (the step column): not grokked, not a value"),
    "train_acc": st.column_config.NumberColumn("train", format="%.3f", width=46, help="train accuracy"),
    "test_acc": st.column_config.NumberColumn("test", format="%.3f", width=46, help="test accuracy"),
    "updated_at": _hidden(st.column_config.DatetimeColumn("updated", format="distance", width=124,
                                                          help="when the run last wrote its summary")),
    "error": st.column_config.TextColumn("problem", width=240),
}


TABLE = "runs_table"
MAX_ROWS = 20  # rows drawn without scrolling inside the table; more scroll (and the caption says so)
ROW_PX = 35  # Streamlit's row height (the header is one row too)


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
    selection.rerun_if_ticked()
    table = loading.run_rows()
    st.session_state[state.ROWS] = table
    if query:
        table = table[table["name"].str.contains(query, case=False, regex=False)]
    if tasks:
        table = table[table["task"].isin(tasks)]
    if statuses:
        table = table[table["status"].isin(statuses)]
    table = table.reset_index(drop=True)
    table.insert(2, "run", [name.removeprefix(f"{sweep}/") if isinstance(sweep, str) else name
                            for name, sweep in zip(table["name"], table["sweep"])])
    shown = [c for c in COLUMNS if c != "error" or table["error"].notna().any()]
    selection.sync_table(TABLE, list(table["name"]))
    height = "content" if len(table) <= MAX_ROWS else ROW_PX * (MAX_ROWS + 1) + 3
    st.dataframe(table[shown], column_config=COLUMNS, hide_index=True, key=TABLE, placeholder=MISSING,
                 on_select=lambda: selection.on_ticks(TABLE), selection_mode="multi-row", width="stretch",
                 height=height)
    n_running = int((table["status"] == "running").sum())
    scroll = f" (scroll inside the table for the other {len(table) - MAX_ROWS})" if len(table) > MAX_ROWS else ""
    st.caption(f"{len(table)} of {len(state.rows())} runs shown{scroll}. Click a header to sort; tick rows to select "
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
