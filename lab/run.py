"""A run folder as a Python object: `run = lab.load_run("runs/x")`, then `run.model()`, `run.metrics`, ...

This is the one public way to read a run; the CLI (`lab runs`), the REPL and the dashboard all
use it, and none of them reach into the trainer.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

from lab import runs as store
from lab.runs import RunError


def _run_path(run: str | os.PathLike, runs_dir: str | os.PathLike | None = None) -> Path:
    path = Path(run)
    if (path / "config.json").is_file():
        return path
    if path.parent == Path(".") or runs_dir is not None:
        candidate = Path(runs_dir or store.default_runs_dir()) / path.name
        if (candidate / "config.json").is_file():
            return candidate
    if path.is_dir():
        raise RunError(f"{path / 'config.json'}: no such file; {path} is not a run folder")
    raise RunError(f"no run {str(run)!r}: not a run folder, nor a run name under {runs_dir or store.default_runs_dir()}")


class Run:
    """Read-only view of one run folder. Files are read when first asked for; `reload()` re-reads them."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.name = self.path.name
        self._models: dict[tuple[int, str], object] = {}

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, task={self.summary.get('task')!r}, status={self.summary.get('status')!r})"

    def reload(self) -> "Run":
        for attr in ("config", "task"):
            self.__dict__.pop(attr, None)
        self._models.clear()
        return self

    @cached_property
    def config(self):
        """The fully resolved `ExperimentConfig`."""
        from pydantic import ValidationError

        from lab.config import ExperimentConfig

        try:
            return ExperimentConfig.model_validate(store.read_json(self.path / "config.json"))
        except ValidationError as err:
            raise RunError(f"{self.path / 'config.json'}: damaged config ({err.errors()[0]['msg']})") from None

    @property
    def summary(self) -> dict:
        """summary.json: status, step, memorize_step, grok_step, wall_time_s, final metrics."""
        return store.read_json(self.path / "summary.json") if (self.path / "summary.json").exists() else {"status": "unknown"}

    @property
    def metrics_rows(self) -> list[dict]:
        return store.read_jsonl(self.path / "metrics.jsonl")

    @property
    def metrics(self):
        """metrics.jsonl as a pandas DataFrame, one row per evaluation."""
        import pandas as pd

        return pd.DataFrame(self.metrics_rows)

    @property
    def checkpoint_steps(self) -> list[int]:
        return store.checkpoint_steps(self.path)

    @cached_property
    def task(self):
        from lab.tasks import make_task

        return make_task(self.config.task)

    def resolve_step(self, step: int | None) -> int:
        steps = self.checkpoint_steps
        if not steps:
            raise RunError(f"{self.path / 'checkpoints'}: the run has no checkpoint yet")
        if step is None:
            return steps[-1]
        if step not in steps:
            shown = steps if len(steps) <= 12 else steps[:5] + ["..."] + steps[-5:]
            raise RunError(f"no checkpoint at step {step} in {self.path}; saved steps: {', '.join(map(str, shown))}")
        return step

    def state_dict(self, step: int | None = None) -> dict:
        step = self.resolve_step(step)
        tensors, _ = store.load_tensors(store.checkpoint_path(self.path, step))
        return tensors

    def model(self, step: int | None = None, device: str = "cpu"):
        """The model at a checkpoint (default: the last), in eval mode. Cached per (step, device)."""
        from lab.model import Transformer

        step = self.resolve_step(step)
        key = (step, str(device))
        if key not in self._models:
            model = Transformer(self.config.model)
            try:
                model.load_state_dict(self.state_dict(step))
            except RuntimeError as err:
                raise RunError(f"{store.checkpoint_path(self.path, step)}: weights do not fit the config ({str(err).splitlines()[0]})") from None
            self._models[key] = model.to(device).eval()
        return self._models[key]

    def predict(self, text_or_tokens, step: int | None = None):
        """The model's answer for a text (`"12 + 34 ="`, `"a cab"`) or token ids: a `lab.probe.Prediction`
        with `label`, `label_id`, `probability` and `probabilities`. Bad text raises ValueError."""
        from lab.probe import predict

        return predict(self, text_or_tokens, step=step)


def load_run(run: str | os.PathLike, runs_dir: str | os.PathLike | None = None) -> Run:
    """A run by path (`"runs/x"`) or by name under the runs folder (`"x"`). Raises RunError naming the missing file."""
    return Run(_run_path(run, runs_dir))


def list_runs(runs_dir: str | os.PathLike | None = None) -> list[dict]:
    """One row per run folder (the rows `lab runs` prints), newest first. Damaged runs are listed as such."""
    runs_dir = Path(runs_dir or store.default_runs_dir())
    if not runs_dir.is_dir():
        return []
    rows = []
    for path in sorted(p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (path / "config.json").exists() and not (path / "summary.json").exists():
            continue
        row = {"name": path.name, "path": str(path), "task": None, "status": "damaged", "step": None, "steps": None,
               "memorize_step": None, "grok_step": None, "train_acc": None, "test_acc": None, "updated_at": path.stat().st_mtime}
        try:
            summary = store.read_json(path / "summary.json")
            row.update({k: summary.get(k) for k in ("task", "status", "step", "steps", "memorize_step", "grok_step")})
            row.update({k: summary.get("final", {}).get(k) for k in ("train_acc", "test_acc")})
            row["updated_at"] = summary.get("updated_at", row["updated_at"])
        except RunError as err:
            row["error"] = str(err)
        rows.append(row)
    return sorted(rows, key=lambda r: r["updated_at"], reverse=True)
