"""Reading runs for the pages, cached so that a rerun (a slider moved, a sentence typed) reads nothing
from disk that has not changed.

Caches are keyed on the file's path and its modification stamp (mtime and size): a file the trainer
rewrote is read again. A run folder can be half-written (training just started), damaged, or removed
while a page is open; these functions raise the lab's one-line errors, which `display.guard` shows.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import streamlit as st

import lab
from lab.errors import RunError
from lab.runs.storage import checkpoint_path, default_runs_dir

# The Runs table's columns, in order (config values of tasks that lack them are left empty).
RUN_COLUMNS = ["name", "sweep", "task", "arch", "n_params", "p", "operator", "train_frac", "weight_decay", "lr", "layers", "heads", "status",
               "step", "steps", "memorize_step", "grok_step", "train_acc", "test_acc", "updated_at", "path", "error"]


def runs_dir() -> Path:
    return default_runs_dir()


def file_stamp(path: str | os.PathLike) -> tuple[int, int] | None:
    """(mtime_ns, size) of a file, or None when it does not exist (yet, or any more)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


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
    return file_stamp(checkpoint_path(run.path, step))


def summary(run: "lab.Run") -> dict:
    try:
        return run.summary
    except RunError:
        return {"status": "damaged"}


def run_rows() -> pd.DataFrame:
    """One row per run with the key config values, for the Runs page and the selectors. Values a
    task does not have (p, operator and train fraction for a_and_b) stay empty."""
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
    df = pd.DataFrame(rows, columns=RUN_COLUMNS)
    if not df.empty:
        df["updated_at"] = pd.to_datetime(df["updated_at"], unit="s", utc=True)
    return df
