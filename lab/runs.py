"""Run folders: where a training run keeps everything, and how to read it back.

    runs/NAME/
      config.json           the fully resolved ExperimentConfig
      metrics.jsonl         one JSON object per evaluation, in step order
      summary.json          status, memorize/grok steps, wall time, final metrics
      checkpoints/step_0000100.safetensors   model weights after that many steps
      resume.safetensors    weights + optimizer + gradient-filter state of the latest checkpoint

Every file is written to a temporary name and renamed into place, so a reader (the dashboard)
never sees half a file. `metrics.jsonl` grows by appending one whole line per write; a reader
ignores a torn last line, and a resumed run rewrites it (atomically) up to its checkpoint, so no
row is lost or repeated. Checkpoints are safetensors: loading them runs no pickled code.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

RUNS_DIR_ENV = "LAB_RUNS_DIR"
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
CHECKPOINT_NAME = re.compile(r"^step_(\d+)\.safetensors$")


class RunError(ValueError):
    """A run folder, run name or run file is missing, damaged or not allowed; one clear line."""


def default_runs_dir() -> Path:
    return Path(os.environ.get(RUNS_DIR_ENV) or "runs")


# --- atomic writes -------------------------------------------------------------------------------


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def save_tensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors, atomically."""
    from safetensors.torch import save

    tensors = {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def load_tensors(path: Path) -> tuple[dict, dict[str, str]]:
    """Load safetensors -> (tensors, metadata); a damaged file raises RunError naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})
    except FileNotFoundError:
        raise RunError(f"{path}: no such file") from None
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise RunError(f"{path}: not a readable safetensors file ({err})") from None


# --- metrics -------------------------------------------------------------------------------------


def append_jsonl(path: Path, row: dict) -> None:
    """Append one whole line in a single write, so a crash leaves at most a torn last line."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(row) + "\n").encode())
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> list[dict]:
    """Every complete row; a torn final line (from a killed writer) is ignored."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    rows = []
    lines = text.split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # torn last line: no newline after it
                break
            raise RunError(f"{path}: line {number} is not valid JSON") from None
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(row) + "\n" for row in rows).encode())


# --- run folders ---------------------------------------------------------------------------------


def check_run_name(name: str) -> str:
    if not RUN_NAME.match(name) or name in (".", ".."):
        raise RunError(
            f"run name {name!r} is not allowed: use letters, digits, '.', '_' and '-', starting with a letter or digit"
        )
    return name


def new_run_dir(runs_dir: Path, name: str, exact: bool) -> Path:
    """A fresh folder `runs_dir/name` (or `name-2`, `name-3`, ... unless `exact`). Never outside runs_dir."""
    check_run_name(name)
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    candidate, n = name, 1
    while True:
        path = runs_dir / candidate
        if path.resolve().parent != runs_dir.resolve():
            raise RunError(f"run name {name!r} points outside the runs folder {runs_dir}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            if exact:
                raise RunError(
                    f"run {str(path)!r} already exists; continue it with --resume {path} or pick another --name"
                ) from None
            n += 1
            candidate = f"{name}-{n}"


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}.safetensors"


def checkpoint_steps(run_dir: Path) -> list[int]:
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := CHECKPOINT_NAME.match(p.name)))


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RunError(f"{path}: no such file") from None
    except json.JSONDecodeError as err:
        raise RunError(f"{path}: damaged JSON ({err})") from None
