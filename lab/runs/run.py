"""A run folder as a Python object: `run = lab.load_run("runs/x")`, then `run.model()`, `run.metrics`, ...

This is the one public way to read a run; the CLI (`lab runs`), the REPL and the dashboard all
use it, and none of them reach into the trainer.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

from lab.runs import storage
from lab.errors import RunError


def _run_path(run: str | os.PathLike, runs_dir: str | os.PathLike | None = None) -> Path:
    path = Path(run)
    if (path / "config.json").is_file():
        return path
    root = Path(runs_dir or storage.default_runs_dir())
    # "NAME" or "SWEEP/MEMBER" under the runs folder; with runs_dir given, also "runs/NAME" -> runs_dir/NAME
    candidates = [root / path] if not path.is_absolute() else []
    if path.parent == Path(".") or runs_dir is not None:
        candidates.append(root / path.name)
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    if path.is_dir():
        raise RunError(f"{path / 'config.json'}: no such file; {path} is not a run folder")
    raise RunError(f"no run {str(run)!r}: not a run folder, nor a run name under {runs_dir or storage.default_runs_dir()}")


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
        return read_run_config(self.path)

    @property
    def summary(self) -> dict:
        """summary.json: status, step, memorize_step, grok_step, wall_time_s, final metrics. A missing one is
        rebuilt (not written) from the resume state and metrics.jsonl; a damaged one raises RunError."""
        if not (self.path / "summary.json").exists():
            return rebuilt_summary(self.path)
        return read_summary(self.path)

    @property
    def status(self) -> str:
        """The run's status as it is now: summary.json's, except that a run whose summary says "running" but
        whose writer has gone (killed, machine rebooted) is "interrupted (resumable)"."""
        return live_status(self.path, self.summary.get("status"))

    @property
    def writer_pid(self) -> int | None:
        """PID of the process writing this run now (it holds RUN/.lock), or None."""
        return storage.writer_pid(self.path)

    @cached_property
    def n_params(self) -> int:
        """The model's parameter count (from summary.json; runs older than that field count the config's model)."""
        count = self.summary.get("n_params")
        if count is None:
            from lab.models.architectures import n_params

            count = n_params(self.config.model)
        return int(count)

    @property
    def arch(self) -> str:
        """The model architecture: "transformer", "mlp", "cnn" or "linear"."""
        return self.config.model.arch

    @property
    def metrics_rows(self) -> list[dict]:
        return storage.read_metrics(self.path / "metrics.jsonl")

    @property
    def metrics(self):
        """metrics.jsonl as a pandas DataFrame, one row per evaluation."""
        import pandas as pd

        return pd.DataFrame(self.metrics_rows)

    @property
    def checkpoint_steps(self) -> list[int]:
        return storage.checkpoint_steps(self.path)

    @cached_property
    def task(self):
        from lab.tasks import make_task

        return make_task(self.config.task)

    def resolve_step(self, step: int | str | None) -> int:
        """A checkpoint step: None (the last), an int, or an int-like string ("850"); anything else raises."""
        steps = self.checkpoint_steps
        if not steps:
            raise RunError(f"{self.path / 'checkpoints'}: the run has no checkpoint yet")
        if step is None:
            return steps[-1]
        step = _as_step(step, steps)
        if step not in steps:
            shown = steps if len(steps) <= 12 else steps[:5] + ["..."] + steps[-5:]
            raise RunError(f"no checkpoint at step {step} in {self.path}; saved steps: {', '.join(map(str, shown))}")
        return step

    def state_dict(self, step: int | None = None) -> dict:
        step = self.resolve_step(step)
        tensors, _ = storage.load_tensors(storage.checkpoint_path(self.path, step))
        return tensors

    def model(self, step: int | None = None, device: str = "cpu", cache: bool = True):
        """The model at a checkpoint (default: the last), in eval mode: the one checkpoint -> model loader.
        Cached per (step, device) unless `cache=False` (for passes over many checkpoints)."""
        from lab.models.architectures import build_model

        from lab.models.limits import check_fits

        step = self.resolve_step(step)
        device = check_device(device)
        key = (step, str(device))
        if key in self._models:
            return self._models[key]
        # config.json could claim a model this machine cannot hold (d_vocab = 1e11): refuse before allocating
        check_fits(self.config.model, lambda: build_model(self.config.model), device, training=False,
                   source=str(self.path / "config.json"))
        model = build_model(self.config.model)
        try:
            model.load_state_dict(self.state_dict(step))
        except RuntimeError as err:
            raise RunError(f"{storage.checkpoint_path(self.path, step)}: weights do not fit the config ({str(err).splitlines()[0]})") from None
        model = model.to(device).eval()
        if cache:
            self._models[key] = model
        return model

    def predict(self, text_or_tokens, step: int | None = None):
        """The model's answer for a text (`"12 + 34 ="`, `"a cab"`) or token ids: a `lab.Prediction`
        with `label`, `label_id`, `probability` and `probabilities`. Bad text raises ValueError."""
        from lab.models.prediction import predict_with

        return predict_with(self.model(step), self.task, text_or_tokens)

    def generate(self, prompt: str, n: int = 20, temperature: float = 1.0, seed: int | None = None,
                 step: int | None = None) -> str:
        """A continuation of `prompt` sampled from a next-token run (the text task): `n` tokens drawn one
        at a time at `temperature` (0 = greedy), repeatable with `seed`, from the model at checkpoint
        `step` (default: the last); the model reads the last n_ctx tokens (`lab.models.prediction.sample_tokens`).
        Returns the continuation alone, as it follows the prompt in the task's writing: `task.decode(prompt's
        ids) + continuation` is the whole text (so a continuation that starts with a word starts with its
        space, one that starts with a comma does not). Bad n or temperature, or a classification run, raise
        one ValueError line."""
        from lab.models.prediction import check_sampling, sample_tokens

        if self.task.read_position is not None:
            raise ValueError(f"run.generate is for next-token runs (a target at every position); {self.name} is a "
                             f"{self.task.name!r} classifier: use run.predict(text) for its answer")
        check_sampling(n, temperature, seed)  # before loading a checkpoint
        prompt_ids = self.task.encode(prompt)
        new_ids = sample_tokens(self.model(step), prompt_ids, n, temperature, seed)
        written, whole = self.task.decode(prompt_ids), self.task.decode(prompt_ids + new_ids)
        return whole[len(written):] if whole.startswith(written) else self.task.decode(new_ids)


def _as_step(step, steps: list[int]) -> int:
    """850, numpy.int64(850) or "850" -> 850; 850.5, True, "last" -> RunError listing the saved steps."""
    import numbers

    if isinstance(step, numbers.Integral) and not isinstance(step, bool):
        return int(step)
    if isinstance(step, str) and step.strip().isdigit():
        return int(step.strip())
    shown = steps if len(steps) <= 12 else steps[:5] + ["..."] + steps[-5:]
    raise RunError(f"step={step!r} is not a checkpoint step: give an integer, one of {', '.join(map(str, shown))} (or None for the last)")


def check_device(device):
    """A device a model can be moved to ('cpu', 'cuda', 'cuda:1', a torch.device) as a torch.device, or one RunError line."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise RunError(f"device={device!r} is not a device; use 'cpu' or 'cuda' (or 'cuda:N')") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError(f"device={device!r}: no CUDA device is available on this machine; use 'cpu'")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise RunError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type not in ("cpu", "mps"):
        raise RunError(f"device={device!r} is not supported here; use 'cpu' or 'cuda'")
    return parsed


def read_run_config(run_dir: str | os.PathLike):
    """RUN/config.json as an `ExperimentConfig`, checked: schema, and the task-decided model fields (vocabulary,
    context) agreeing with the task. Every problem is one RunError line naming the file."""
    from pydantic import ValidationError

    from lab.config import ExperimentConfig, describe_validation_error
    from lab.errors import ConfigError

    path = Path(run_dir) / "config.json"
    data = storage.read_json(path)
    try:
        config = ExperimentConfig.model_validate(data)
        return config.resolve()
    except ValidationError as err:
        raise RunError(f"{path}: damaged config ({describe_validation_error(err, data)})") from None
    except ConfigError as err:  # an unknown task, or model sizes that disagree with the task
        raise RunError(f"{path}: damaged config ({err})") from None


# summary.json's keys and the types they may have (each may also be null, except status)
SUMMARY_TYPES = {"status": str, "name": str, "experiment": str, "task": str, "step": int, "steps": int,
                 "memorize_step": int, "grok_step": int, "wall_time_s": (int, float), "final": dict,
                 "started_at": (int, float), "updated_at": (int, float), "device": str, "arch": str, "n_params": int,
                 "diverged_at": int, "hint": str}


def read_summary(run_dir: str | os.PathLike) -> dict:
    """RUN/summary.json, checked against SUMMARY_TYPES (a damaged one is one RunError line naming the file)."""
    path = Path(run_dir) / "summary.json"
    summary = storage.read_json(path)
    for key, kind in SUMMARY_TYPES.items():
        value = summary.get(key)
        if value is None and key != "status":
            continue
        if isinstance(value, bool) or not isinstance(value, kind):
            expected = "text" if kind is str else "an object" if kind is dict else "a number"
            raise RunError(f"{path}: damaged summary ({key} = {value!r}, expected {expected})")
    for key, value in (summary.get("final") or {}).items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise RunError(f"{path}: damaged summary (final.{key} = {value!r}, expected a number)")
    return summary


def rebuilt_summary(run_dir: str | os.PathLike) -> dict:
    """What summary.json would say, from resume.safetensors' step and metrics.jsonl, for a run that lost it
    (or never wrote it); `"rebuilt": True` says so. `lab train --resume` writes the real one back."""
    from lab.runs.outcomes import grok_step, memorize_step

    run_dir = Path(run_dir)
    try:
        rows = storage.read_metrics(run_dir / "metrics.jsonl")
    except RunError:
        rows = []
    step = storage.resume_step(run_dir)
    rows = [row for row in rows if step is not None and row["step"] <= step]
    final = rows[-1] if rows else {}
    try:
        config = read_run_config(run_dir)
        task, steps, experiment = config.task.name, config.train.steps, config.name
    except RunError:
        task = steps = experiment = None
    status = "finished" if step is not None and steps is not None and step >= steps else "running"
    return {"name": run_dir.name, "experiment": experiment, "task": task, "status": status, "step": step or 0,
            "steps": steps, "memorize_step": memorize_step(rows), "grok_step": grok_step(rows),
            "wall_time_s": final.get("elapsed_s") or 0.0,
            "final": {k: final[k] for k in ("train_loss", "train_acc", "test_loss", "test_acc", "weight_norm") if k in final},
            "rebuilt": True}


INTERRUPTED = "interrupted (resumable)"


def live_status(run_dir: str | os.PathLike, status: str | None) -> str | None:
    """The status as it is now, from summary.json's and whether a writer holds the run's lock: "running" whose
    writer died is INTERRUPTED; "interrupted" (or no summary yet) with a live writer is "running" (a sweep's
    Ray driver holds a member's lock while its task trains it elsewhere)."""
    if status == "running" and storage.writer_pid(run_dir) is None:
        return INTERRUPTED
    if status in ("interrupted", None) and storage.writer_pid(run_dir) is not None:
        return "running"
    return status


def load_run(run: str | os.PathLike, runs_dir: str | os.PathLike | None = None) -> Run:
    """A run by path (`"runs/x"`) or by name under the runs folder (`"x"`). Raises RunError naming the missing file."""
    return Run(_run_path(run, runs_dir))


def _row_summary(path: Path) -> dict:
    """The summary a `list_runs` row shows: summary.json with its live status (a run whose writer died is
    "interrupted (resumable)"); for a folder without one, "starting" while its writer lives, else rebuilt."""
    if (path / "summary.json").exists():
        summary = read_summary(path)
    elif storage.writer_pid(path) is not None:
        return {"status": "starting"}
    else:
        summary = rebuilt_summary(path)
    return {**summary, "status": live_status(path, summary.get("status"))}


def list_runs(runs_dir: str | os.PathLike | None = None) -> list[dict]:
    """One row per run folder (the rows `lab runs` prints), newest first. Damaged runs are listed as such."""
    runs_dir = Path(runs_dir or storage.default_runs_dir())
    if not runs_dir.is_dir():
        return []
    folders = []  # (folder, name, sweep): runs, and the members of sweeps (folders holding sweep.json) one level down
    for path in sorted(p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if storage.is_sweep_folder(path):  # its members are listed even when its sweep.json is damaged or lost
            folders += [(member, f"{path.name}/{member.name}", path.name) for member in storage.member_folders(path)]
        else:
            folders.append((path, path.name, None))
    rows = []
    for path, name, sweep in folders:
        if not (path / "config.json").exists() and not (path / "summary.json").exists():
            continue
        row = {"name": name, "sweep": sweep, "path": str(path), "task": None, "status": "damaged", "step": None, "steps": None,
               "memorize_step": None, "grok_step": None, "arch": None, "n_params": None, "train_acc": None, "test_acc": None, "test_loss": None, "updated_at": path.stat().st_mtime}
        try:
            summary = _row_summary(path)
            row.update({k: summary.get(k) for k in ("task", "status", "step", "steps", "memorize_step", "grok_step", "arch", "n_params")})
            row.update({k: (summary.get("final") or {}).get(k) for k in ("train_acc", "test_acc", "test_loss")})
            row["updated_at"] = summary.get("updated_at") or row["updated_at"]
        except (RunError, OSError) as err:  # one damaged run is listed as damaged; the others are unaffected
            row["status"] = "damaged"
            row["error"] = str(err).splitlines()[0] if str(err) else type(err).__name__
        rows.append(row)
    return sorted(rows, key=lambda r: r["updated_at"], reverse=True)
