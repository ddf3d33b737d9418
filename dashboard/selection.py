"""Which runs and checkpoints a page shows: the sidebar's run selection (shared by every page), a
page's run picker and checkpoint slider, and how often a page showing a training run refreshes."""

from __future__ import annotations

from typing import Mapping

import pandas as pd
import streamlit as st

import lab
from dashboard import loading, state
from dashboard.display import guard

LIVE_REFRESH_S = 3.0  # how often pages showing a run that is still training re-read it


def no_runs_message() -> None:
    folder = loading.runs_dir()
    st.info(
        f"No runs in `{folder}` yet. Start one in a terminal:\n\n"
        f"```\nlab train modadd_quick{' --runs-dir ' + str(folder) if str(folder) != 'runs' else ''}\n```\n\n"
        "It appears here as soon as it has written its first checkpoint; this page refreshes by itself."
    )


# Streamlit cuts a multiselect's chips to a fixed width, which leaves sweep members (SWEEP/MEMBER, told apart
# by their end) all reading "modadd_quick-swe…": let the sidebar's chips take its width and wrap instead.
WRAP_CHIPS = """<style>
[data-testid="stSidebar"] [data-testid="stMultiSelect"] [role="group"] { max-height: none; }
[data-testid="stSidebar"] [data-testid="stMultiSelectTagsContainer"] { max-height: none; overflow: visible; }
[data-testid="stSidebar"] [data-testid="stMultiSelectTagsContainer"] [data-tag] { max-width: 100%; height: auto; }
[data-testid="stSidebar"] [data-testid="stMultiSelectTagsContainer"] [data-tag] > span {
  max-width: none; white-space: normal; overflow-wrap: anywhere; text-overflow: clip; }
</style>"""


def sidebar_selection(rows: pd.DataFrame) -> list[str]:
    """The sidebar's multiselect of runs, shared by every page (it lives in session state)."""
    names = [n for n, s in zip(rows["name"], rows["status"]) if s != "damaged"] if not rows.empty else []
    current = [n for n in state.selected_names() if n in names]  # drop runs that were removed
    first_visit = state.SELECTED not in st.session_state
    if first_visit or not current and names and not st.session_state.get(state.SELECTION_TOUCHED):
        current = names[: min(3, len(names))]  # the newest runs
    st.session_state[state.SELECTED] = current
    st.sidebar.multiselect("Runs", names, key=state.SELECTED,
                           help="Pick runs on the Runs page or here; every page uses them.",
                           on_change=lambda: st.session_state.__setitem__(state.SELECTION_TOUCHED, True))
    st.sidebar.html(WRAP_CHIPS)
    st.sidebar.caption(f"runs folder: `{loading.runs_dir()}`")
    return state.selected_names()


def ticked_rows(shown: list[str]) -> list[int]:
    """Rows of a table listing `shown` (run names, in row order) that the sidebar's selection ticks."""
    selected = set(state.selected_names())
    return [i for i, name in enumerate(shown) if name in selected]


def sync_table(key: str, shown: list[str]) -> None:
    """Before drawing the runs table `key` over `shown`: tick the rows of the sidebar's runs (a selection
    made in the sidebar or on another page, rows filtered in or out), and remember the row order, which
    `on_ticks` needs to read the user's ticks (row numbers) as runs.

    Sent with every drawing, not only when it differs: the browser's table forgets ticks it did not make
    itself when it is drawn again with new data (every few seconds while a run trains), and the next
    click would then send only its own tick."""
    # In the form the browser sends it back ("cells" too): a differing form would read as a change, and
    # run `on_ticks` with the table's old ticks after a change made in the sidebar.
    st.session_state[key] = {"selection": {"rows": ticked_rows(shown), "columns": [], "cells": []}}
    st.session_state[state.TABLE_ROWS] = shown


def on_ticks(key: str) -> None:
    """The user ticked or unticked rows of the runs table `key`: the sidebar's selection becomes the ticked
    runs, plus the selected runs the table does not show now (filtered out), in the order they were picked.

    A callback runs before the rerun it triggers; the table lives in a fragment, whose widgets rerun only
    the fragment, so `rerun_if_ticked` (in the fragment) reruns the whole app to redraw the sidebar."""
    shown = st.session_state.get(state.TABLE_ROWS, [])
    ticked = [shown[i] for i in sorted(st.session_state[key]["selection"]["rows"]) if i < len(shown)]
    before = state.selected_names()
    kept = [n for n in before if n not in shown or n in ticked]
    st.session_state[state.SELECTED] = kept + [n for n in ticked if n not in kept]
    st.session_state[state.SELECTION_TOUCHED] = True
    st.session_state[state.TICKED] = True


def rerun_if_ticked() -> None:
    if st.session_state.pop(state.TICKED, False):
        st.rerun()  # the whole app, not just the fragment: the sidebar and the curves below show the new selection


def selected_paths() -> dict[str, str]:
    """name -> path of the selected runs that still exist."""
    rows = state.rows()
    if rows.empty:
        return {}
    paths = dict(zip(rows["name"], rows["path"]))
    return {n: paths[n] for n in state.selected_names() if n in paths}


def pick_run(label: str, *, task: str | None = None, key: str) -> "lab.Run | None":
    """A selectbox over the selected runs (of one task, if given) that have a checkpoint; None with a note if none."""
    rows = state.rows()
    if rows.empty:
        no_runs_message()
        return None
    ok = rows[rows["status"] != "damaged"]
    if task:
        ok = ok[ok["task"] == task]
    selected = [n for n in state.selected_names() if n in set(ok["name"])]
    names = selected + [n for n in ok["name"] if n not in selected]
    if not names:
        what = f"{task} runs" if task else "runs"
        st.info(f"No {what} in `{loading.runs_dir()}`. "
                f"Start one with `lab train {'modadd_quick' if task != 'a_and_b' else 'a_and_b'}`.")
        return None
    state.restore(key, names)
    name = st.selectbox(label, names, key=key, help="The runs picked in the sidebar come first.")
    state.keep(key, name)
    path = dict(zip(ok["name"], ok["path"]))[name]
    with guard(name):
        return loading.get_run(path)
    return None


def pick_step(run: "lab.Run", key: str, label: str = "Checkpoint step") -> int | None:
    """A slider over the run's saved checkpoint steps (default: the last), to scrub through training."""
    steps = loading.checkpoint_steps(run)
    if not steps:
        st.info(f"{run.name} has no checkpoint yet; it appears here when training writes one.")
        return None
    if len(steps) == 1:
        st.caption(f"{label}: {steps[0]} (the only checkpoint)")
        return steps[0]
    state_key = f"{key}:{run.name}"
    state.restore(state_key, steps, default=steps[-1])
    step = st.select_slider(label, options=steps, key=state_key,
                            help="Drag to scrub through training; each position is a saved checkpoint.")
    state.keep(state_key, step)
    return step


def live_interval(paths: Mapping[str, str] | None = None) -> float | None:
    """Refresh interval for fragments: LIVE_REFRESH_S while any of these runs (default: any run) is training."""
    rows = state.rows()
    if rows.empty:
        return LIVE_REFRESH_S  # nothing yet: keep looking for the first run
    running = rows[rows["status"].isin(["running", "starting"])]
    if paths is not None:
        running = running[running["name"].isin(list(paths))]
    return LIVE_REFRESH_S if not running.empty else None
