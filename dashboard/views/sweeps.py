"""Sweeps: a sweep's phase diagram over any two axes (Liu et al. 2022), its grok steps, and any outcome
against one axis with the spread over seeds (Power et al. 2022's Figures 1 and 2); picking a cell opens
its members' curves. The figures are `lab.plot_phase_diagram`, `lab.plot_grok_steps` and
`lab.plot_sweep_outcome`'s (lab/plots/), drawn from the same members table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

import lab
from dashboard import display, downloads, loading, selection, state
from lab import plots
from lab.sweeps import stats as lab_stats

st.title("Sweeps")

ALL = "(all)"
OUTCOMES = {  # outcome column -> what the picker says
    "grok_step": "steps to 99% test acc (grok step)",
    "memorize_step": "steps to 99% train acc",
    "best_test_acc": "best test acc",
    "final_test_acc": "final test acc",
    "final_train_acc": "final train acc",
    "final_test_loss": "final test loss",
    "t_train": "first step train acc > threshold",
    "t_test": "first step test acc > threshold",
    "wall_time_s": "wall time (s)",
}
CELL_CHARTS = {"phase diagram": "sweeps_phase_diagram", "grok steps": "sweeps_grok_steps"}  # figure -> chart key
SPREADS = {"iqr": "interquartile range (25th–75th percentile)", "minmax": "min–max"}


# --- reading, cached on the files' modification stamps ------------------------------------------------


def sweep_stamp(path: str) -> tuple:
    """Changes whenever sweep.json or any member's summary or metrics is rewritten (a running sweep)."""
    folder = Path(path)
    stamps = [loading.file_stamp(folder / "sweep.json")]
    for member in sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []:
        stamps += [loading.file_stamp(member / "summary.json"), loading.file_stamp(member / "metrics.jsonl")]
    return tuple(stamps)


@st.cache_data(show_spinner=False, max_entries=8)
def _sweeps(runs_dir: str, stamps: tuple) -> list[dict]:
    return lab.list_sweeps(runs_dir)


def list_sweeps() -> list[dict]:
    root = loading.runs_dir()
    folders = sorted(str(p) for p in root.iterdir() if (p / "sweep.json").is_file()) if root.is_dir() else []
    return _sweeps(str(root), tuple((f, sweep_stamp(f)) for f in folders))


@st.cache_data(show_spinner="Reading the sweep's members…", max_entries=32)
def members_table(path: str, stamp: tuple, train_acc: float, test_acc: float, gap: float, budget: int | None) -> pd.DataFrame:
    return plots.sweep_members(lab.load_sweep(path), train_acc=train_acc, test_acc=test_acc, gap=gap, budget=budget)


def sweep_command(folder: Path) -> str:
    """The command that starts an example sweep into `folder`, one argument per line so that it fits its
    box; `--runs-dir` only when `folder` is not ./runs (where `lab sweep` writes by default)."""
    lines = ["lab sweep modadd_quick", "--grid train.weight_decay=0.3,1,3", "--grid task.train_frac=0.3,0.5", "--seeds 2"]
    if Path(folder).resolve() != Path("runs").resolve():
        lines.append(f"--runs-dir {folder}")
    return " \\\n    ".join(lines)


def no_sweeps_message() -> None:
    folder = loading.runs_dir()
    st.info(
        f"No sweeps in `{folder}` yet. Start one in a terminal, e.g.\n\n```\n{sweep_command(folder)}\n```\n\n"
        "or one of the reproductions: `lab sweep liu_2022_phase`, `lab sweep power_2022_fractions`. "
        "It appears here as soon as it starts; this page refreshes by itself."
    )


# --- the page -----------------------------------------------------------------------------------------

sweeps = list_sweeps()
if not sweeps:
    no_sweeps_message()

    @st.fragment(run_every=selection.LIVE_REFRESH_S)
    def _wait_for_sweeps() -> None:
        root = loading.runs_dir()
        if root.is_dir() and any((p / "sweep.json").is_file() for p in root.iterdir()):
            st.rerun()

    _wait_for_sweeps()
    st.stop()

by_name = {row["name"]: row for row in sweeps}
state.restore("sweeps_name", list(by_name))
name = st.selectbox("Sweep", list(by_name), key="sweeps_name", help="Newest first. A sweep is `lab sweep`'s folder.")
state.keep("sweeps_name", name)
info = by_name[name]
if info.get("error"):
    st.error(f"{name}: {info['error']}", icon="⚠️")
    st.stop()
statuses = ", ".join(f"{n} {s}" for s, n in sorted(info.get("statuses", {}).items())) or "no members yet"
axes_text = "; ".join(f"`{k}` = {', '.join(plots.value_text(v) for v in vals)}" for k, vals in info["axes"].items())
st.caption(f"experiment `{info['experiment']}` · {info['members']} members ({statuses}) · axes: {axes_text or 'none'}"
           + (f" · {info['seeds']} seeds" if info.get("seeds") else "") + f" · `{info['path']}`")

with st.expander("Phase thresholds (Liu et al. 2022, Table 1)", expanded=False):
    cols = st.columns(4)
    train_acc = cols[0].number_input("train acc above (%)", 1.0, 99.99, 90.0, 1.0, key="sweeps_train_acc") / 100
    test_acc = cols[1].number_input("test acc above (%)", 1.0, 99.99, 90.0, 1.0, key="sweeps_test_acc") / 100
    gap = cols[2].number_input("comprehension gap (steps)", 0, 10_000_000, 1000, 100, key="sweeps_gap",
                               help="comprehension when test crosses less than this many steps after train; grokking when later")
    budget = cols[3].number_input("within (steps; 0 = the whole run)", 0, 100_000_000, 0, 1000, key="sweeps_budget",
                                  help="Liu et al. use 10⁵ steps")
thresholds = plots.phase_thresholds_text(train_acc, test_acc, gap, budget or None)
st.caption(f"Phases: {thresholds}.")

axis_options = [*info["axes"], "seed"]


def _pick_filters(members: pd.DataFrame, shown: list[str]) -> pd.DataFrame:
    """A selectbox per axis not on the figure: all its values pooled (the default), or one value."""
    others = [a for a in info["axes"] if a not in shown]
    if not others:
        return members
    cols = st.columns(len(others))
    for col, axis in zip(cols, others):
        values = plots.axis_values(members, axis)
        labels = [ALL, *(plots.value_text(v) for v in values)]
        key = f"sweeps_fix:{name}:{axis}"
        state.restore(key, labels)
        label = col.selectbox(f"{axis}", labels, key=key, help="pool every value (with the seeds) or fix one")
        state.keep(key, label)
        if label != ALL:
            members = members[members[axis] == values[labels.index(label) - 1]]
    return members


def _selected_cell(event, chart: str) -> tuple[int, int] | None:
    """The (ix, iy) of a cell newly clicked or box-selected on a heatmap (None if the pick did not change)."""
    def field(obj, name):  # the chart's state: an attribute dictionary, or a plain dict
        return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)

    points = list(field(field(event, "selection") or {}, "points") or [])
    if not points:
        return None
    pick = (int(round(points[0]["x"])), int(round(points[0]["y"])))
    if st.session_state.get(f"_sweeps_pick:{chart}") == pick:
        return None
    st.session_state[f"_sweeps_pick:{chart}"] = pick
    return pick


def cell_members_table(rows: pd.DataFrame, gap: float, train_acc: float, test_acc: float) -> pd.DataFrame:
    """A cell's members as the page lists them: the phase with the rule that decided it, the steps as
    text ("> 600" for a step never reached within the run, never a number or None), the accuracies."""
    shown = lab_stats.members_text(rows)
    shown["why"] = [lab_stats.phase_reason(r.t_train, r.t_test, gap, train_acc, test_acc, r.phase)
                    for r in rows.itertuples()]
    columns = ["member", "phase", "why", "memorize_step", "grok_step"]
    return shown[[c for c in columns if c in shown]]


def cell_members_columns(thresholds: str) -> dict:
    """Widths (px) that fit the page's column (~700 px) with the full names: nothing cut on the right."""
    return {
        "member": st.column_config.TextColumn("member", width=240),
        "phase": st.column_config.TextColumn("phase", width=100, help=f"Liu et al. 2022, Table 1: {thresholds}"),
        "why": st.column_config.TextColumn("why this phase", width=210,
                                           help="the steps at which train and test accuracy crossed the thresholds"),
        "memorize_step": st.column_config.TextColumn("memorised", width=70, help="first step with train acc ≥ 99%"),
        "grok_step": st.column_config.TextColumn("grokked", width=70, help="first step with test acc ≥ 99%"),
    }


def _select_members(paths: list[str]) -> None:
    names = [f"{name}/{Path(p).name}" for p in paths]
    st.session_state[state.SELECTED] = names
    st.session_state[state.SELECTION_TOUCHED] = True


@st.fragment(run_every=selection.LIVE_REFRESH_S if info.get("statuses", {}).get("running") else None)
def sweep_view() -> None:
    path = info["path"]
    members = None
    with display.guard(name):
        members = members_table(path, sweep_stamp(path), train_acc, test_acc, gap, budget or None)
    if members is None:
        return
    if members.empty:
        st.info(f"{name} has no members yet.")
        return
    figs: dict = {}

    # phase diagram and grok steps over two axes
    st.subheader("Phase diagram")
    if len(axis_options) < 2:
        st.info("This sweep has a single axis and no seeds: the phase diagram needs two; see the outcome plot below.")
        cells = pd.DataFrame()
    else:
        cols = st.columns(2)
        state.restore(f"sweeps_x:{name}", axis_options, default=axis_options[0])
        x = cols[0].selectbox("x axis", axis_options, key=f"sweeps_x:{name}")
        state.keep(f"sweeps_x:{name}", x)
        y_options = [a for a in axis_options if a != x]
        state.restore(f"sweeps_y:{name}", y_options, default=y_options[0])
        y = cols[1].selectbox("y axis", y_options, key=f"sweeps_y:{name}")
        state.keep(f"sweeps_y:{name}", y)
        shown = _pick_filters(members, [x, y])
        cells = plots.sweep_cells(shown, x, y)
        # a cell's name is its coordinates only, so that it stays picked while its phase changes (thresholds, training)
        labels = [f"{x} = {plots.value_text(r.x)}, {y} = {plots.value_text(r.y)}" for r in cells.itertuples()]
        phases = {label: f"{label}: {r.phase} {r.count}/{r.finished or r.n}" for label, r in zip(labels, cells.itertuples())}
        positions = [(r.ix, r.iy) for r in cells.itertuples()]
        # A cell clicked (or box-selected) in either heatmap becomes the picked cell; the charts' selection
        # is in session state before they are drawn, so the pick is outlined in this very run.
        for chart in CELL_CHARTS:
            pick = _selected_cell(st.session_state.get(CELL_CHARTS[chart]), chart)
            if pick in positions:
                st.session_state["sweeps_cell"] = labels[positions.index(pick)]
        state.restore("sweeps_cell", labels)
        picked = cells.iloc[labels.index(st.session_state.get("sweeps_cell", labels[0]))]
        titles = plots.sweep_titles(name, x, y)
        figs["phase diagram"] = plots.phase_diagram_figure(shown, x, y, thresholds=thresholds, title=titles["phase diagram"],
                                                           highlight=(picked["x"], picked["y"]), gap=gap,
                                                           train_acc=train_acc, test_acc=test_acc)
        figs["grok steps"] = plots.grok_steps_figure(shown, x, y, title=titles["grok steps"],
                                                     highlight=(picked["x"], picked["y"]))
        for chart, key in CELL_CHARTS.items():
            st.plotly_chart(figs[chart], key=key, on_select="rerun", selection_mode=("points", "box"),
                            config={"displaylogo": False})
        st.caption("Cells show the majority phase of their finished members and how many share it (ties go to the "
                   "phase listed first); hover a cell for its members and the rule that gave each its phase, click one "
                   "to open their curves below. Grok step: first step with test acc ≥ 99%; a member that never grokked "
                   "is later than the steps it ran, never a number: grey cells read “> N” where the median depends on "
                   "such members (N: its lower bound); “(k ✗)”: members that never grokked.")

    # an outcome against one axis, median and spread over seeds
    st.subheader("Outcome against one axis")
    cols = st.columns([2, 2, 2, 2])
    line_axes = axis_options if len(info["axes"]) else ["seed"]
    state.restore(f"sweeps_axis:{name}", line_axes, default=next((a for a in line_axes if a.endswith("train_frac")), line_axes[0]))
    axis = cols[0].selectbox("axis", line_axes, key=f"sweeps_axis:{name}")
    state.keep(f"sweeps_axis:{name}", axis)
    outcome = cols[1].selectbox("outcome", list(OUTCOMES), format_func=OUTCOMES.get, key="sweeps_outcome")
    by_options = ["(none)", *[a for a in info["axes"] if a != axis]]
    state.restore(f"sweeps_by:{name}", by_options)
    by = cols[2].selectbox("one line per", by_options, key=f"sweeps_by:{name}")
    state.keep(f"sweeps_by:{name}", by)
    by = None if by == "(none)" else by
    spread = cols[3].radio("band", list(SPREADS), format_func=lambda s: {"iqr": "IQR", "minmax": "min–max"}[s],
                           horizontal=True, key="sweeps_spread", help="the spread over seeds (and pooled axes) drawn around the median")
    with display.guard(name):
        table = plots.sweep_outcome_table(members, axis, outcome, by=by)
        title = plots.sweep_titles(name, axis=axis, outcome=outcome, spread=spread)["outcome"]
        figs["outcome"] = plots.sweep_outcome_figure(table, axis, outcome, by=by, spread=spread, title=title)
        display.chart(figs["outcome"], key="sweeps_outcome_chart")
        st.caption(f"Line: median over the members at each value (seeds and every axis not drawn pooled); band: "
                   f"{SPREADS[spread]}. A step never reached is censored: later than the steps the member ran "
                   "(hollow marker: some members never reached it; open ▲: the median itself is censored, drawn at its "
                   "lower bound; hover for “> N”). Unfinished members are left out. "
                   "Power et al.'s Figure 1: grok step against `task.train_frac`; "
                   "Figure 2: best test acc against `task.train_frac`, one line per operator.")

    # one cell's members and their curves
    if not cells.empty:
        st.subheader("A cell's members")
        label = st.selectbox("Cell", labels, key="sweeps_cell", format_func=phases.get,
                             help="or click a cell in either heatmap")
        state.keep("sweeps_cell", label)
        cell = cells.iloc[labels.index(label)]
        rows = members[members["member"].isin(cell["members"])]
        st.dataframe(cell_members_table(rows, gap, train_acc, test_acc), hide_index=True, width="stretch",
                     column_config=cell_members_columns(thresholds))
        paths = dict(zip(rows["member"], rows["run"]))
        metrics, events = {}, {}
        for member, run_path in paths.items():
            with display.guard(member):
                metrics[member] = loading.get_metrics(run_path)
                events[member] = loading.summary(loading.get_run(run_path))
        if metrics:
            colors = plots.run_colors(metrics)
            figs["cell accuracy"] = plots.curves_figure(metrics, "accuracy", log_x=True, log_y=False, events=events, colors=colors)
            figs["cell loss"] = plots.curves_figure(metrics, "loss", log_x=True, log_y=True, events=events, colors=colors)
            display.chart(figs["cell accuracy"], key="sweeps_cell_accuracy")
            display.chart(figs["cell loss"], key="sweeps_cell_loss")
            st.button("Select these members in the sidebar (for the other pages)", key="sweeps_select_members",
                      on_click=_select_members, args=(list(paths.values()),))

    with st.expander(f"All {len(members)} members"):
        st.dataframe(lab_stats.members_text(members).drop(columns=["run"], errors="ignore"), hide_index=True,
                     width="stretch", column_config={"phase": st.column_config.TextColumn(
                         "phase", help=f"Liu et al. 2022, Table 1: {thresholds}")})
    st.session_state["_sweeps_figures"] = figs


sweep_view()
downloads.download_figures(st.session_state.get("_sweeps_figures", {}), "Sweeps")
