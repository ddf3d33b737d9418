"""What every dashboard page shares: the runs folder, cached loading, the run selection, downloads.

Loading is cached with `st.cache_resource` / `st.cache_data` keyed on the file's path and its
modification stamp (mtime and size), so that a rerun (a slider moved, a sentence typed) reads
nothing from disk that has not changed, and a file the trainer rewrote is read again.

A run folder can be half-written (training just started), damaged, or removed while a page is
open: every read goes through `guard`, which turns the lab's errors into one line in the page.
"""

from __future__ import annotations

import io
import os
import shutil
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping

import pandas as pd
import streamlit as st

import lab
from lab.runs import RUNS_DIR_ENV, RunError

SELECTED = "selected_runs"  # session-state key of the sidebar's run selection (carried across pages)
LIVE_REFRESH_S = 3.0  # how often pages showing a run that is still training re-read it


def runs_dir() -> Path:
    return Path(os.environ.get(RUNS_DIR_ENV) or "runs")


def file_stamp(path: str | os.PathLike) -> tuple[int, int] | None:
    """(mtime_ns, size) of a file, or None when it does not exist (yet, or any more)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


class PageError(Exception):
    """A problem to show as one line in the page (not a traceback)."""


@contextmanager
def guard(what: str = "") -> Iterator[None]:
    """Show a run that cannot be read (missing, half-written, damaged, bad input) as one `st.error` line.

    Everything inside the block after the failing call is skipped; the rest of the page goes on.
    """
    try:
        yield
    except (RunError, PageError, ValueError, OSError, KeyError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        st.error(f"{what}: {message}" if what else message, icon="⚠️")


# --- cached loading ---------------------------------------------------------------------------------


def list_runs() -> list[dict]:
    """`lab.list_runs` of the runs folder; a folder removed while it is listed is just not listed."""
    for _ in range(3):
        try:
            return lab.list_runs(runs_dir())
        except FileNotFoundError:
            continue  # a run folder vanished between listing and reading it: list again
    return []


@st.cache_resource(show_spinner=False, max_entries=64)
def _load_run(path: str, config_stamp: tuple[int, int]) -> "lab.Run":
    run = lab.load_run(path)
    run.config  # validate now, so a damaged config fails here (and is not cached)
    return run


def get_run(path: str | os.PathLike) -> "lab.Run":
    """The `lab.Run` for a folder, cached on the folder and its config's modification stamp."""
    stamp = file_stamp(Path(path) / "config.json")
    if stamp is None:
        raise RunError(f"{Path(path) / 'config.json'}: no such file (the run was removed, or is still being created)")
    return _load_run(str(path), stamp)


@st.cache_data(show_spinner=False, max_entries=256)
def _metrics(path: str, stamp: tuple[int, int] | None) -> pd.DataFrame:
    return lab.load_run(path).metrics if stamp is not None else pd.DataFrame()


def get_metrics(path: str | os.PathLike) -> pd.DataFrame:
    """metrics.jsonl as a DataFrame (empty when there is none yet), cached on the file's stamp."""
    return _metrics(str(path), file_stamp(Path(path) / "metrics.jsonl"))


def checkpoint_steps(run: "lab.Run") -> list[int]:
    try:
        return run.checkpoint_steps
    except OSError:
        return []


def checkpoint_stamp(run: "lab.Run", step: int) -> tuple[int, int] | None:
    from lab.runs import checkpoint_path

    return file_stamp(checkpoint_path(run.path, step))


def summary(run: "lab.Run") -> dict:
    try:
        return run.summary
    except RunError:
        return {"status": "damaged"}


def run_rows() -> pd.DataFrame:
    """One row per run with the key config values, for the Runs page and the selectors."""
    rows = []
    for row in list_runs():
        row = dict(row)
        row.update({k: None for k in ("p", "operator", "train_frac", "weight_decay", "lr", "layers", "heads")})
        if row.get("status") == "damaged" and not (Path(row["path"]) / "summary.json").exists():
            row.update(status="starting", error=None)  # a config and no summary yet: training is just starting
        if row.get("status") != "damaged":
            try:
                config = get_run(row["path"]).config
                task = config.task
                row.update(p=getattr(task, "p", None), operator=getattr(task, "operator", None),
                           train_frac=getattr(task, "train_frac", None), weight_decay=config.train.weight_decay,
                           lr=config.train.lr, layers=config.model.n_layers, heads=config.model.n_heads)
                row["task"] = row.get("task") or task.name
            except (RunError, OSError, ValueError) as err:
                row["status"] = "damaged"
                row["error"] = str(err).splitlines()[0]
        rows.append(row)
    columns = ["name", "task", "p", "operator", "train_frac", "weight_decay", "lr", "layers", "heads", "status",
               "step", "steps", "memorize_step", "grok_step", "train_acc", "test_acc", "updated_at", "path", "error"]
    df = pd.DataFrame(rows, columns=columns)
    if not df.empty:
        df["updated_at"] = pd.to_datetime(df["updated_at"], unit="s", utc=True).dt.tz_convert(None)
    return df


# --- selection ----------------------------------------------------------------------------------------


def no_runs_message() -> None:
    folder = runs_dir()
    st.info(
        f"No runs in `{folder}` yet. Start one in a terminal:\n\n"
        f"```\nlab train modadd_quick{' --runs-dir ' + str(folder) if str(folder) != 'runs' else ''}\n```\n\n"
        "It appears here as soon as it has written its first checkpoint; this page refreshes by itself."
    )


def sidebar_selection(rows: pd.DataFrame) -> list[str]:
    """The sidebar's multiselect of runs, shared by every page (it lives in session state)."""
    names = [n for n, s in zip(rows["name"], rows["status"]) if s != "damaged"] if not rows.empty else []
    current = [n for n in st.session_state.get(SELECTED, []) if n in names]  # drop runs that were removed
    if SELECTED not in st.session_state or not current and names and not st.session_state.get("_selection_touched"):
        current = names[: min(3, len(names))]  # first visit: the newest runs
    st.session_state[SELECTED] = current
    st.sidebar.multiselect("Runs", names, key=SELECTED, help="Pick runs on the Runs page or here; every page uses them.",
                           on_change=lambda: st.session_state.__setitem__("_selection_touched", True))
    st.sidebar.caption(f"runs folder: `{runs_dir()}`")
    return list(st.session_state[SELECTED])


def selected_paths() -> dict[str, str]:
    """name -> path of the selected runs that still exist."""
    rows = st.session_state.get("_rows")
    if rows is None or rows.empty:
        return {}
    paths = dict(zip(rows["name"], rows["path"]))
    return {n: paths[n] for n in st.session_state.get(SELECTED, []) if n in paths}


def pick_run(label: str, *, task: str | None = None, key: str) -> "lab.Run | None":
    """A selectbox over the selected runs (of one task, if given) that have a checkpoint; None with a note if none."""
    rows = st.session_state.get("_rows")
    if rows is None or rows.empty:
        no_runs_message()
        return None
    ok = rows[rows["status"] != "damaged"]
    if task:
        ok = ok[ok["task"] == task]
    selected = [n for n in st.session_state.get(SELECTED, []) if n in set(ok["name"])]
    names = selected + [n for n in ok["name"] if n not in selected]
    if not names:
        what = f"{task} runs" if task else "runs"
        st.info(f"No {what} in `{runs_dir()}`. Start one with `lab train {'modadd_quick' if task != 'a_and_b' else 'a_and_b'}`.")
        return None
    _restore(key, names)
    name = st.selectbox(label, names, key=key, help="The runs picked in the sidebar come first.")
    _keep(key, name)
    path = dict(zip(ok["name"], ok["path"]))[name]
    with guard(name):
        return get_run(path)
    return None


def pick_step(run: "lab.Run", key: str, label: str = "Checkpoint step") -> int | None:
    """A slider over the run's saved checkpoint steps (default: the last), to scrub through training."""
    steps = checkpoint_steps(run)
    if not steps:
        st.info(f"{run.name} has no checkpoint yet; it appears here when training writes one.")
        return None
    if len(steps) == 1:
        st.caption(f"{label}: {steps[0]} (the only checkpoint)")
        return steps[0]
    state_key = f"{key}:{run.name}"
    _restore(state_key, steps, default=steps[-1])
    step = st.select_slider(label, options=steps, key=state_key,
                            help="Drag to scrub through training; each position is a saved checkpoint.")
    _keep(state_key, step)
    return step


def _restore(key: str, options: list, default=None) -> None:
    """Give a widget back the value it had when the user was last on this page (Streamlit forgets the
    state of widgets on a page that is not shown); drop a value that is no longer an option."""
    if key not in st.session_state and f"_keep:{key}" in st.session_state:
        st.session_state[key] = st.session_state[f"_keep:{key}"]
    if key in st.session_state and st.session_state[key] not in options:
        del st.session_state[key]
    if key not in st.session_state and default is not None:
        st.session_state[key] = default


def _keep(key: str, value) -> None:
    st.session_state[f"_keep:{key}"] = value


def live_interval(paths: Mapping[str, str] | None = None) -> float | None:
    """Refresh interval for fragments: LIVE_REFRESH_S while any of these runs (default: any run) is training."""
    rows = st.session_state.get("_rows")
    if rows is None or rows.empty:
        return LIVE_REFRESH_S  # nothing yet: keep looking for the first run
    running = rows[rows["status"].isin(["running", "starting"])]
    if paths is not None:
        running = running[running["name"].isin(list(paths))]
    return LIVE_REFRESH_S if not running.empty else None


# --- downloads ----------------------------------------------------------------------------------------


def png_export_available() -> bool:
    """kaleido is installed and a Chromium it can drive is present (never downloaded)."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return False
    candidates = [os.environ.get("BROWSER_PATH"), shutil.which("chromium"), shutil.which("chromium-browser"),
                  shutil.which("google-chrome")]
    return any(c and os.path.exists(c) for c in candidates)


def _png_zip(figures: Mapping[str, "object"]) -> bytes:
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


def download_figures(figures: Mapping[str, "object"], page: str) -> None:
    """Buttons to download the page's figures: one HTML file (always), PNGs in a zip (where kaleido can run).
    The files are built only when a button is clicked."""
    from dashboard.figures import figures_html

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
            cols[1].download_button("PNG (zip)", data=lambda: _png_zip(figures), file_name=f"{slug}_png.zip",
                                    mime="application/zip", key=f"dl_png_{slug}", on_click="ignore")
        else:
            cols[1].caption("PNG export needs the `kaleido` package and Chromium (`apt install chromium`).")


def chart(fig, key: str) -> None:
    st.plotly_chart(fig, key=key, config={"displaylogo": False})


# --- background precomputation ------------------------------------------------------------------------


import atexit  # noqa: E402
import weakref  # noqa: E402

_PREFETCHERS: "weakref.WeakSet[Prefetcher]" = weakref.WeakSet()


@atexit.register
def _stop_prefetchers() -> None:
    for prefetcher in list(_PREFETCHERS):
        prefetcher.stop()


class Prefetcher:
    """Computes `fn(key)` for every key in a background thread, so that scrubbing through checkpoints
    answers from memory instead of running the model on the spot. `get` returns None for a key not
    computed yet (the page then computes it itself); errors are kept and re-raised by `get`."""

    def __init__(self, fn: Callable, keys: list):
        import threading

        self._fn = fn
        self._results: dict = {}
        self._errors: dict = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(list(keys),), daemon=True, name="dashboard-prefetch")
        self._thread.start()
        _PREFETCHERS.add(self)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the key being computed (a thread killed inside torch at exit aborts the process)."""
        self._stop.set()
        self._thread.join(timeout)

    def _work(self, keys: list) -> None:
        for key in keys:
            if self._stop.is_set():
                return
            with self._lock:
                if key in self._results:
                    continue
            try:
                value = self._fn(key)
            except Exception as err:  # a damaged checkpoint: remembered, shown when that step is asked for
                with self._lock:
                    self._errors[key] = err
                continue
            with self._lock:
                self._results.setdefault(key, value)

    def get(self, key):
        with self._lock:
            if key in self._errors:
                raise self._errors[key]
            return self._results.get(key)

    def put(self, key, value) -> None:
        with self._lock:
            self._results[key] = value

    @property
    def done(self) -> int:
        with self._lock:
            return len(self._results) + len(self._errors)


def by_distance(steps: list[int], start: int) -> list[int]:
    """Steps ordered by how far (in checkpoints) they are from `start`: the ones a user scrubs to next come first."""
    if start not in steps:
        return list(steps)
    i = steps.index(start)
    return sorted(steps, key=lambda s: (abs(steps.index(s) - i), steps.index(s)))
