"""How long the dashboard's server takes to answer, page by page: `python -m lab.dashboard_timing --runs-dir runs`.

Drives the real app (dashboard/app.py) with Streamlit's AppTest, in this process, on the runs in a
folder (those `lab demo` ships: modadd_quick and a_and_b). Each number is *server time*: the wall
time of one script run (what the browser waits for before it can draw), not the browser's drawing.

For every page it times the first visit (in-memory caches cleared; what the run folders cache on disk,
such as `lab analyze`'s progress measures, is kept) and then each interaction a user makes there:
moving the checkpoint slider, typing a sentence, changing a and b, switching the ablation method or
split, on the Circuits page typing a corrupted input and switching its summaries and views, coming back
to a page already visited. Each measurement is repeated `--repeat` times with
fresh caches; the table shows the median and the slowest.

The goal (issue 10): every interaction <= 300 ms, every first visit <= 2 s, on an idle 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

APP = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"
TIMEOUT_S = 600  # a slow page is measured, not cut off
FIRST_VISIT_GOAL_S = 2.0
INTERACTION_GOAL_S = 0.3


def _timed(at, action: Callable) -> float:
    start = time.perf_counter()
    action()
    at.run(timeout=TIMEOUT_S)
    seconds = time.perf_counter() - start
    if at.exception:
        raise RuntimeError(f"the page raised: {at.exception[0].value}")
    return seconds


def _widget(at, kind: str, key: str):
    """The widget of this kind and key on the page, or None (the page has no such control for this run)."""
    for widget in getattr(at, kind):
        if widget.key == key:
            return widget
    return None


def _slider_moves(at, key: str) -> list[Callable]:
    """Moves of a checkpoint slider to three positions it was not at: first, middle, second to last."""
    slider = _widget(at, "select_slider", key)
    if slider is None:
        return []
    options = [int(o) for o in slider.options]
    targets = []
    for index in (0, len(options) // 2, len(options) - 2):
        if 0 <= index < len(options) and options[index] != slider.value and options[index] not in targets:
            targets.append(options[index])
    return [lambda step=step: _widget(at, "select_slider", key).set_value(step) for step in targets]


def measure(runs_dir: Path, repeat: int, pages: list[str], app: Path = APP) -> dict[str, list[float]]:
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from lab.runs.run import list_runs

    os.environ["LAB_RUNS_DIR"] = str(runs_dir)
    runs = {row["name"]: row for row in list_runs(runs_dir) if row.get("status") != "damaged"}
    modular = next((n for n, r in runs.items() if r.get("task") == "modular"), None)
    a_and_b = next((n for n, r in runs.items() if r.get("task") == "a_and_b"), None)
    if not runs:
        raise SystemExit(f"dashboard_timing: error: no runs in {runs_dir} (make them with: lab demo --no-dashboard)")

    times: dict[str, list[float]] = defaultdict(list)

    def record(label: str, at, action: Callable) -> None:
        seconds = _timed(at, action)
        times[label].append(seconds)
        print(f"  {label:<52} {seconds * 1000:9.0f} ms", file=sys.stderr, flush=True)

    def each_run(page: str):
        """The first visit of a page (its run picker `PAGE_run`, slider `PAGE_step:RUN`), then for each shipped
        run: pick it, move the checkpoint slider, and yield its name for the page's own controls."""
        record(f"{page}: first visit", at, lambda: at.switch_page(f"views/{page}.py"))
        for name in (a_and_b, modular):
            if name is None:
                continue
            record(f"{page}: pick run {name}", at, lambda name=name: at.selectbox(key=f"{page}_run").set_value(name))
            for move in _slider_moves(at, f"{page}_step:{name}"):
                record(f"{page} ({name}): checkpoint slider", at, move)
            yield name

    for r in range(repeat):
        print(f"repeat {r + 1}/{repeat}", file=sys.stderr)
        st.cache_data.clear()
        st.cache_resource.clear()
        at = AppTest.from_file(str(app), default_timeout=TIMEOUT_S)
        record("runs: first visit", at, lambda: None)
        if "runs" in pages:
            record("runs: filter by name", at, lambda: at.text_input(key="runs_filter").set_value(next(iter(runs))[:3]))
            record("runs: clear the filter", at, lambda: at.text_input(key="runs_filter").set_value(""))
        at.sidebar.multiselect(key="selected_runs").set_value(list(runs)[:3])
        at.run(timeout=TIMEOUT_S)

        if "curves" in pages:
            record("curves: first visit", at, lambda: at.switch_page("views/curves.py"))
            record("curves: log x off", at, lambda: at.toggle(key="curves_log_x").set_value(False))
            record("curves: smoothing 0.8", at, lambda: at.slider(key="curves_smoothing").set_value(0.8))

        if "attention" in pages:
            record("attention: first visit", at, lambda: at.switch_page("views/attention.py"))
            for name in (a_and_b, modular):
                if name is None:
                    continue
                record(f"attention: pick run {name}", at, lambda name=name: at.selectbox(key="attn_run").set_value(name))
                for move in _slider_moves(at, f"attn_step:{name}"):
                    record("attention: checkpoint slider", at, move)
                if _widget(at, "text_input", "attn_text") is not None:
                    for text in ("bbc cab", "a cab grabs a crab", "ab" * 20):
                        record("attention: type a sentence", at,
                               lambda text=text: at.text_input(key="attn_text").set_value(text))
                if _widget(at, "number_input", "attn_a") is not None:
                    for a in (3, 11, 20):
                        record("attention: change a", at, lambda a=a: at.number_input(key="attn_a").set_value(a))
                    record("attention: change b", at, lambda: at.number_input(key="attn_b").set_value(2))

        if "progress" in pages and modular is not None:
            record("progress: first visit", at, lambda: at.switch_page("views/progress.py"))
            record(f"progress: pick run {modular}", at, lambda: at.selectbox(key="progress_run").set_value(modular))
            for move in _slider_moves(at, f"progress_step:{modular}"):
                record("progress: checkpoint slider", at, move)
            record("progress: log x", at, lambda: at.toggle(key="progress_log_x").set_value(True))

        if "heads" in pages:
            for name in each_run("heads"):
                if _widget(at, "radio", "heads_method") is not None:
                    record(f"heads ({name}): ablation method mean", at,
                           lambda: at.radio(key="heads_method").set_value("mean"))
                if _widget(at, "radio", "heads_split") is not None:
                    record(f"heads ({name}): split train", at, lambda: at.radio(key="heads_split").set_value("train"))
                    record(f"heads ({name}): split test", at, lambda: at.radio(key="heads_split").set_value("test"))

        if "circuits" in pages:
            for name in each_run("circuits"):
                record(f"circuits ({name}): summary over training", at,
                       lambda: at.selectbox(key="circuits_measure").set_value("dla"))
                corrupted = _widget(at, "text_input", f"circuits_corrupted:{name}")
                if corrupted is not None:
                    typed = "a cax" if name == a_and_b else "14 + 5 ="
                    record(f"circuits ({name}): type a corrupted input", at,
                           lambda name=name, typed=typed: at.text_input(key=f"circuits_corrupted:{name}").set_value(typed))
                record(f"circuits ({name}): MLP neurons", at, lambda: at.checkbox(key="circuits_neurons").set_value(True))
                record(f"circuits ({name}): full QK matrix", at, lambda: at.toggle(key="circuits_full").set_value(True))
                if _widget(at, "toggle", "circuits_fourier") is not None:
                    record(f"circuits ({name}): Fourier basis", at, lambda: at.toggle(key="circuits_fourier").set_value(True))

        for page in pages:  # back to pages already visited: what a user does most
            record("page switch (visited before)", at, lambda page=page: at.switch_page(f"views/{page}.py"))
    return times


def table(times: dict[str, list[float]]) -> str:
    lines = [f"{'what':<52} {'median':>9} {'slowest':>9} {'n':>3}  goal"]
    for label, values in times.items():
        goal = FIRST_VISIT_GOAL_S if "first visit" in label else INTERACTION_GOAL_S
        median = statistics.median(values)
        lines.append(f"{label:<52} {median * 1000:7.0f} ms {max(values) * 1000:6.0f} ms {len(values):>3}  "
                     f"{'ok' if median <= goal else 'SLOW'} (<= {goal * 1000:.0f} ms)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.dashboard_timing", description=__doc__.splitlines()[0])
    parser.add_argument("--runs-dir", default=None, help="the runs to browse (default: $LAB_RUNS_DIR or ./runs)")
    parser.add_argument("--repeat", type=int, default=3, help="fresh-cache repetitions of every measurement")
    parser.add_argument("--pages", default="runs,curves,attention,progress,heads,circuits",
                        help="comma-separated pages to time (default: all)")
    parser.add_argument("--app", type=Path, default=APP, help="the app to time (default: this checkout's dashboard)")
    args = parser.parse_args(argv)
    from lab.runs.storage import default_runs_dir

    runs_dir = Path(args.runs_dir) if args.runs_dir else default_runs_dir()
    pages = [p.strip() for p in args.pages.split(",") if p.strip()]
    valid = {"runs", "curves", "attention", "progress", "heads", "circuits"}
    bad = [p for p in pages if p not in valid]
    if bad:
        parser.error(f"--pages {','.join(bad)}: not a page; valid: {', '.join(sorted(valid))}")
    if args.repeat < 1:
        parser.error(f"--repeat {args.repeat}: must be at least 1")
    if not runs_dir.is_dir():
        parser.error(f"--runs-dir {runs_dir}: no such folder (make the runs with: lab demo --no-dashboard)")
    before = os.environ.get("LAB_RUNS_DIR")
    try:
        times = measure(runs_dir, args.repeat, pages, args.app)
    finally:  # the app reads the runs folder from the environment; leave the caller's as it was
        if before is None:
            os.environ.pop("LAB_RUNS_DIR", None)
        else:
            os.environ["LAB_RUNS_DIR"] = before
    print(table(times))
    return 0


if __name__ == "__main__":
    sys.exit(main())
