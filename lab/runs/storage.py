"""Run folders: where a training run keeps everything, and how to read it back.

    runs/NAME/
      config.json           the fully resolved ExperimentConfig
      metrics.jsonl         one JSON object per evaluation, in step order
      summary.json          status, memorize/grok steps, wall time, final metrics
      checkpoints/step_0000100.safetensors   model weights after that many steps
      resume.safetensors    weights + optimizer + gradient-filter state of the latest checkpoint (`ResumeState`)

Every file is written to a temporary name and renamed into place, so a reader (the dashboard)
never sees half a file. `metrics.jsonl` grows by appending one whole line per write; a reader
ignores a torn last line, and a resumed run rewrites it (atomically) up to its checkpoint, so no
row is lost or repeated. Checkpoints are safetensors: loading them runs no pickled code.

The trainer (and anything else that writes run folders) goes through these functions; reading a
run folder as an object is `lab.runs.run`.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from lab.errors import RunError, RunLockedError, StorageError
from lab.files import (  # generic file IO, re-exported: run-folder code calls storage.<name>
    MAX_JSON_BYTES, _json_kind, append_jsonl, atomic_write_bytes, atomic_write_json,
    available_memory_bytes, check_regular_file, read_bytes, dumps, finite_json, load_tensors, max_metrics_bytes,
    read_json, read_jsonl, read_text, save_tensors, storage_error,
    write_jsonl,
)

if TYPE_CHECKING:  # torch loads only when tensors are saved or read
    from torch import Tensor

RUNS_DIR_ENV = "LAB_RUNS_DIR"
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
CHECKPOINT_NAME = re.compile(r"^step_(\d+)\.safetensors$")


def default_runs_dir() -> Path:
    """The runs folder when none is given: $LAB_RUNS_DIR, else ./runs. Every default in the lab comes from here."""
    return Path(os.environ.get(RUNS_DIR_ENV) or "runs")


# --- atomic writes -------------------------------------------------------------------------------


# --- metrics -------------------------------------------------------------------------------------


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl, checked: every row has an integer `step` >= 0, steps increase, values are numbers or null."""
    rows = read_jsonl(path)
    previous = -1
    for number, row in enumerate(rows, start=1):
        step = row.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            what = "has no 'step'" if "step" not in row else f"has step {step!r}, expected an integer >= 0"
            raise RunError(f"{path}: row {number} {what}")
        if step <= previous:
            raise RunError(f"{path}: row {number} has step {step} after step {previous}; steps must increase")
        previous = step
        for key, value in row.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise RunError(f"{path}: row {number} has {key} = {value!r}, expected a number or null")
    return rows


# --- run folders ---------------------------------------------------------------------------------


def check_run_name(name: str) -> str:
    if not isinstance(name, str) or not RUN_NAME.match(name) or name in (".", ".."):
        raise RunError(
            f"run name {name!r} is not allowed: use letters, digits, '.', '_' and '-', starting with a letter or digit"
        )
    return name


def new_run_dir(runs_dir: Path, name: str, exact: bool) -> Path:
    """A fresh folder `runs_dir/name` (or `name-2`, `name-3`, ... unless `exact`). Never outside runs_dir."""
    check_run_name(name)
    runs_dir = make_runs_dir(runs_dir)
    candidate, n = name, 1
    while True:
        path = runs_dir / candidate
        try:
            outside = path.resolve().parent != runs_dir.resolve()
        except (RuntimeError, OSError):  # Python 3.11 raises RuntimeError for a symlink loop
            raise RunError(f"{path} is a symlink loop, not a run folder; pick another --name") from None
        if outside:
            raise RunError(f"run name {name!r} points outside the runs folder {runs_dir}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            if exact and path.is_dir() and writer_pid(path) is None and not any(p.name != LOCK_FILE for p in path.iterdir()):
                return path  # an empty folder (a `lab train` killed before it wrote anything): no dead end, reuse it
            if exact:
                pid = writer_pid(path)
                if pid is not None:
                    raise RunLockedError(f"run {str(path)!r} already exists and is being trained by PID {pid}; pick another --name") from None
                raise RunError(
                    f"run {str(path)!r} already exists; continue it with --resume (lab train --resume {path}) or pick another --name"
                ) from None
            n += 1
            candidate = f"{name}-{n}"
        except OSError as err:
            raise storage_error(path, err, "create the run folder") from None


SWEEP_FILE = "sweep.json"


def is_sweep_folder(path: Path) -> bool:
    """Does this folder of the runs folder hold a sweep? Yes if it has a sweep.json, even a damaged one (a
    folder, a symlink loop), or, having lost it, member run folders and no run of its own: a sweep whose
    sweep.json is broken still shows its members as runs (`list_runs`) and can be rebuilt by its rerun."""
    path = Path(path)
    if os.path.lexists(path / SWEEP_FILE):
        return True
    if os.path.lexists(path / "config.json") or os.path.lexists(path / "summary.json"):
        return False
    return bool(member_folders(path))


def member_folders(sweep_dir: Path) -> list[Path]:
    """The run folders of a sweep folder: sub-folders with a config.json or summary.json, in name order; a symlink
    that leads out of the sweep folder is no member (it would make the sweep read another run)."""
    sweep_dir = Path(sweep_dir)
    try:
        children = sorted(sweep_dir.iterdir())
    except OSError:
        return []
    real = os.path.realpath(sweep_dir)
    return [child for child in children
            if not child.name.startswith(".") and os.path.realpath(child) == os.path.join(real, child.name)
            and child.is_dir() and (os.path.lexists(child / "config.json") or os.path.lexists(child / "summary.json"))]


def make_runs_dir(runs_dir: Path) -> Path:
    """The runs folder, created if needed; a file in the way or a read-only disk is one StorageError line."""
    runs_dir = Path(runs_dir)
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise storage_error(runs_dir, err, "create the runs folder") from None
    if not os.access(runs_dir, os.W_OK | os.X_OK):
        raise StorageError(f"cannot write in the runs folder {runs_dir}: permission denied or read-only")
    return runs_dir


SAFE_SYMBOLS = {"+": "plus", "*": "times", "/": "div", "^": "pow", "%": "mod", "=": "eq", "<": "lt", ">": "gt",
                "&": "and", "|": "or", "~": "not", " ": "_", ",": "_", ":": "_"}


def safe_name_part(value: Any) -> str:
    """A value as a piece of a run name: `x2+y2` -> `x2plusy2`, `0.3` -> `0.3`, `[1, 2]` -> `1_2`. Only letters,
    digits, '.', '_' and '-' (what `check_run_name` allows); a sweep derives member names with it.
    Different values can map to one name (`a b` and `a_b`): callers check the names they derive for collisions."""
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, (list, tuple)):
        text = "_".join(safe_name_part(v) for v in value)
    else:
        text = str(value)
    out = "".join(SAFE_SYMBOLS.get(ch, ch) if not re.match(r"[A-Za-z0-9._-]", ch) else ch for ch in text)
    out = re.sub(r"[^A-Za-z0-9._-]", "_", out)  # anything else (letters outside ASCII, quotes, ...)
    out = re.sub(r"_{2,}", "_", out)
    out = re.sub(r"^[^A-Za-z0-9]+", "", out).rstrip("_") or "empty"  # a run name starts with a letter or digit
    return out[:64]


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}.safetensors"


def checkpoint_steps(run_dir: Path) -> list[int]:
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := CHECKPOINT_NAME.match(p.name)))


# --- reading files, checked at the boundary ----------------------------------------------------------
#
# Everything the lab reads from a run folder (or an experiment file) passes through `read_text`: a
# file too large for its kind, a folder where a file should be, or bytes that are not UTF-8 raise
# one line naming the file, instead of a UnicodeDecodeError or a MemoryError from deep inside.

# --- the single-writer lock ----------------------------------------------------------------------
#
# One process at a time writes a run folder: the trainer (`lab train`, `--resume`), a sweep, an
# ensemble. It holds an exclusive flock(2) on RUN/.lock for as long as it writes; the kernel drops
# the lock when the process ends however it ends (kill -9 included), so a lock is never stale. The
# file holds the writer's PID, for the message a second writer gets. Readers (`lab runs`, the
# dashboard, the REPL) never take the lock; `writer_pid` only peeks at it, to tell a run that is
# training from one whose writer died ("interrupted (resumable)").
#
#     with storage.run_lock(run_dir):      # or: lock = storage.acquire_writer(run_dir); ...; lock.release()
#         ...write the run folder...
#
# The lock is re-entrant within a process (a sweep that holds it can call the trainer, which takes it again).

LOCK_FILE = ".lock"
_held: dict[str, list] = {}  # realpath of the run folder -> [fd, count, thread id] for locks this process holds


class WriterLock:
    """The held writer lock of one run folder; `release()` (or leaving `with`) gives it back."""

    def __init__(self, run_dir: Path, key: str):
        self.run_dir, self._key, self.released = Path(run_dir), key, False

    def release(self) -> None:
        import fcntl

        if self.released:
            return
        self.released = True
        entry = _held.get(self._key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _held[self._key]
            fcntl.flock(entry[0], fcntl.LOCK_UN)
            os.close(entry[0])

    def __enter__(self) -> "WriterLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _lock_holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"PID {pid}" if pid.isdigit() else "another process"


def acquire_writer(run_dir: Path, wait_s: float = 0.5) -> WriterLock:
    """Take the writer lock of a run folder, or raise RunLockedError naming the PID that holds it.
    Waits up to `wait_s` only to step past a reader's momentary peek (`writer_pid`), never for a writer."""
    import fcntl

    import threading

    run_dir = Path(run_dir)
    key = os.path.realpath(run_dir)
    if key in _held:
        if _held[key][2] != threading.get_ident():  # two threads of one process are two writers too
            raise RunLockedError(f"{run_dir} is being written by another thread of this process (PID {os.getpid()})")
        _held[key][1] += 1
        return WriterLock(run_dir, key)
    path = run_dir / LOCK_FILE
    try:
        run_dir.mkdir(parents=True, exist_ok=True)  # a fresh run's folder may not exist yet
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise storage_error(path, err, "create the writer lock") from None
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                holder = _lock_holder(path)
                raise RunLockedError(
                    f"{run_dir} is being written by {holder}; wait for it to end, or stop it "
                    f"(Ctrl-C, or kill {holder.removeprefix('PID ')}) and continue with: lab train --resume {run_dir}"
                ) from None
            time.sleep(0.02)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[key] = [fd, 1, threading.get_ident()]
    remove_temp_files(run_dir)
    return WriterLock(run_dir, key)


def remove_temp_files(run_dir: Path) -> None:
    """Delete the half-written temp files (`.summary.json.*.tmp`, `checkpoints/.step_*.tmp`) a killed writer left.
    Called by whichever writer next takes the folder's lock (trainer, ensemble, Ray driver, sweep): no one
    else can be writing them then."""
    run_dir = Path(run_dir)
    for tmp in [*run_dir.glob(".*.tmp"), *run_dir.glob("checkpoints/.*.tmp")]:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a folder named like a temp file, or no permission: not ours to force
            pass


MAX_WRITER_LOCKS = 256  # run folders one process writes at once (a sweep's members in flight)


def max_writer_locks() -> int:
    """How many writer locks (one open file each) this process may hold at once: MAX_WRITER_LOCKS, or fewer
    when it may open few files (ulimit -n; a quarter of the limit, and 64 more, stay for torch, threads and writes)."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_WRITER_LOCKS
    return max(1, min(MAX_WRITER_LOCKS, (soft * 3 // 4 - 64) // 2))


@contextmanager
def run_lock(run_dir: Path) -> Iterator[WriterLock]:
    """`with run_lock(run_dir):` hold the run folder's writer lock for the block (see `acquire_writer`)."""
    lock = acquire_writer(run_dir)
    try:
        yield lock
    finally:
        lock.release()


def writer_pid(run_dir: Path) -> int | None:
    """The PID of the process writing this run folder now, or None when no process is (never blocks, never holds)."""
    import fcntl

    run_dir = Path(run_dir)
    if os.path.realpath(run_dir) in _held:
        return os.getpid()
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY)
    except OSError:  # no lock file: no writer ever started here (or we may not read it)
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(run_dir / LOCK_FILE)
            return int(holder.removeprefix("PID ")) if holder.startswith("PID ") else -1
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# --- resume state --------------------------------------------------------------------------------
#
# resume.safetensors holds everything a run needs to continue bit for bit from its latest checkpoint:
#
#     model/<param>                      the weights, e.g. model/blocks.0.attn.W_Q
#     optimizer/<param>/<field>          AdamW's state of that parameter: step, exp_avg, exp_avg_sq
#     grad_filter/<key>                  the Grokfast filter's state (see `GradFilter.state_tensors`)
#     metadata: step, elapsed_s          updates done; wall time of the run so far
#
# Parameter names contain dots, so the parts are separated by "/". Files written before this layout
# used "model.", "optim.<param>.<field>" and "filter." prefixes; they still load.

RESUME_FILE = "resume.safetensors"


@dataclass
class ResumeState:
    """What `lab train --resume` restores: weights, optimiser and gradient-filter state after `step` updates."""

    step: int
    elapsed_s: float
    model: dict[str, Tensor]
    optimizer: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # param name -> field -> tensor
    grad_filter: dict[str, Tensor] = field(default_factory=dict)


def save_resume_state(run_dir: Path, state: ResumeState) -> None:
    """Write RUN/resume.safetensors atomically (see the layout above)."""
    tensors = {f"model/{name}": t for name, t in state.model.items()}
    for name, fields in state.optimizer.items():
        tensors.update({f"optimizer/{name}/{key}": t for key, t in fields.items()})
    tensors.update({f"grad_filter/{key}": t for key, t in state.grad_filter.items()})
    save_tensors(Path(run_dir) / RESUME_FILE, tensors, {"step": str(state.step), "elapsed_s": str(state.elapsed_s)})


def load_resume_state(run_dir: Path) -> ResumeState:
    """Read RUN/resume.safetensors (current or pre-"/" layout); a missing or damaged file raises RunError."""
    path = Path(run_dir) / RESUME_FILE
    tensors, meta = load_tensors(path)
    try:
        step, elapsed_s = int(meta["step"]), float(meta.get("elapsed_s", 0.0))
        if step < 0:
            raise ValueError
    except (KeyError, ValueError):
        raise RunError(f"{path}: not a resume file (its metadata has no valid 'step'; is it a checkpoint?)") from None
    state = ResumeState(step=step, elapsed_s=elapsed_s, model={})
    old_layout = not any(key.startswith("model/") for key in tensors)
    if old_layout and not any(key.startswith("model.") for key in tensors):
        raise RunError(f"{path}: not a resume file (it holds no model/ entries; is it a checkpoint?)")
    for key, tensor in tensors.items():
        if old_layout:  # "model.<param>", "optim.<param>.<field>", "filter.<key>"
            section, _, rest = key.partition(".")
            section = {"optim": "optimizer", "filter": "grad_filter"}.get(section, section)
            if section == "optimizer":
                rest = "/".join(rest.rsplit(".", 1))
        else:
            section, _, rest = key.partition("/")
        if section == "model":
            state.model[rest] = tensor
        elif section == "optimizer":
            name, _, key_field = rest.rpartition("/")
            state.optimizer.setdefault(name, {})[key_field] = tensor
        elif section == "grad_filter":
            state.grad_filter[rest] = tensor
        else:
            raise RunError(f"{Path(run_dir) / RESUME_FILE}: unknown entry {key!r} (expected model/, optimizer/ or grad_filter/)")
    return state


def resume_step(run_dir: Path) -> int | None:
    """The step resume.safetensors holds (read from its header only), or None if there is no readable one."""
    from safetensors import safe_open

    try:
        check_regular_file(Path(run_dir) / RESUME_FILE)  # a FIFO would block safe_open
        with safe_open(str(Path(run_dir) / RESUME_FILE), framework="pt") as f:
            return int((f.metadata() or {})["step"])
    except Exception:  # missing, damaged, or foreign: no resume point
        return None
