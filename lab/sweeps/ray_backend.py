"""`lab sweep --backend ray`: a sweep's groups as Ray tasks, on a local Ray instance or a cluster.

Each group of same-shape members (see `lab.sweeps.sweep.training_groups`) is cut into chunks of at most
MAX_MEMBERS_PER_TASK members (fewer when that spreads the work over more CPUs); each chunk is one
Ray task. A task trains its members as one stacked ensemble in a temporary folder on its worker,
and returns the files of their run folders as bytes; the driver writes them into RUNS/SWEEP/
atomically (summary.json last), so no shared filesystem is needed. An unfinished member's
resume state, metrics, config and summary travel with its task, so it continues exactly as
`lab train --resume` would. A task whose worker dies is retried (MAX_RETRIES); an error in the
training itself is not (it would fail again) and stops the sweep with that error.

Ctrl-C sets a stop flag (a tiny Ray actor) that every task polls: running members are checkpointed
and sent back, written, and the sweep exits as interrupted (rerun to continue). A second Ctrl-C
gives up waiting; members then restart from what the driver last wrote.

Every node of a cluster needs the lab installed (`pip install -e '.[ray]'`); the driver needs
nothing on the workers' disks.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from lab.runs import storage
from lab.errors import ConfigError, LabError

MAX_MEMBERS_PER_TASK = 16
MAX_RETRIES = 3
# The files a member needs to continue (everything `lab.sweeps.ensemble` reads back from a run folder);
# its checkpoints stay on the driver.
RESUME_FILES = ("config.json", "summary.json", "metrics.jsonl", storage.RESUME_FILE)
STOP_POLL_S = 1.0


def require_ray():
    """`import ray`, or one line saying which extra to install."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise ConfigError("--backend ray needs Ray: pip install -e '.[ray]'") from None
    return ray


def chunk_sizes(n_members: int, cpus: int, most: int = MAX_MEMBERS_PER_TASK) -> list[int]:
    """Split a group of n members into tasks: at most `most` each, and enough tasks for every CPU
    while each keeps at least 4 members (stacking is what makes a member cheap)."""
    n_tasks = max(math.ceil(n_members / most), min(cpus, math.ceil(n_members / 4)), 1)
    base, extra = divmod(n_members, n_tasks)
    return [base + (i < extra) for i in range(n_tasks) if base + (i < extra) > 0]


def _read_files(run_dir: Path, names=None) -> dict[str, bytes]:
    """Every file under a run folder (or just `names`), as relative path -> bytes."""
    files = {}
    if names is not None:
        for name in names:
            if (run_dir / name).is_file():
                files[name] = (run_dir / name).read_bytes()
        return files
    for path in sorted(run_dir.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            files[path.relative_to(run_dir).as_posix()] = path.read_bytes()
    return files


def train_chunk(members: list[tuple[str, str, dict[str, bytes]]], stop_flag=None) -> list[tuple[str, dict[str, bytes]]]:
    """What a Ray task runs: (member name, config JSON, files it already has) for each member ->
    (member name, files new or changed) after training them as one ensemble in a temporary folder."""
    from lab.config import ExperimentConfig
    from lab.sweeps.ensemble import train_ensemble

    stop = None
    if stop_flag is not None:
        import ray

        last = [0.0, False]

        def stop() -> bool:  # ask the driver at most once a second
            if not last[1] and time.monotonic() - last[0] > STOP_POLL_S:
                last[0] = time.monotonic()
                last[1] = ray.get(stop_flag.is_set.remote())
            return last[1]

    with tempfile.TemporaryDirectory(prefix="lab-sweep-") as tmp:
        root = Path(tmp)
        group = []
        for name, config_json, files in members:
            for rel, data in files.items():
                (root / name / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / name / rel).write_bytes(data)
            group.append((ExperimentConfig.model_validate_json(config_json), root / name))
        train_ensemble(group, progress=False, stop=stop)
        results = []
        for name, _, sent in members:
            files = _read_files(root / name)
            results.append((name, {rel: data for rel, data in files.items() if sent.get(rel) != data}))
        return results


def write_member_files(run_dir: Path, files: dict[str, bytes]) -> None:
    """Write a member's returned files atomically, summary.json last (a reader that sees it finished sees the rest)."""
    for rel in sorted(files, key=lambda r: r == "summary.json"):
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ConfigError(f"a Ray task returned the file {rel!r}, which is outside its run folder")
        storage.atomic_write_bytes(run_dir / rel, files[rel])


def run_groups_on_ray(groups, sweep_dir: Path, address: str | None = None, progress: bool = True, log=None,
                      num_cpus: int | None = None) -> bool:
    """Train the groups as Ray tasks; returns True if the user stopped the sweep (Ctrl-C)."""
    ray = require_ray()
    log = log or (lambda message: print(message, file=sys.stderr))
    started_here = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        else:  # a private instance on this machine, reachable only from it
            ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
                     configure_logging=False, _node_ip_address="127.0.0.1")
        started_here = True
    try:
        return _run(ray, groups, Path(sweep_dir), progress, log)
    finally:
        if started_here:
            ray.shutdown()


def _run(ray, groups, sweep_dir: Path, progress: bool, log) -> bool:
    @ray.remote(num_cpus=0)
    class StopFlag:
        def __init__(self):
            self.value = False

        def set(self):
            self.value = True

        def is_set(self) -> bool:
            return self.value

    remote_chunk = ray.remote(num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=False)(train_chunk)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    flag = StopFlag.remote()
    pending = {}
    n_members = 0
    for group in groups:
        start = 0
        for size in chunk_sizes(len(group), cpus):
            chunk = group[start : start + size]
            start += size
            payload = [(m.name, m.config.model_dump_json(), _read_files(sweep_dir / m.name, RESUME_FILES)) for m in chunk]
            pending[remote_chunk.remote(payload, flag)] = [m.name for m in chunk]
            n_members += len(chunk)
    log(f"ray: {n_members} members in {len(pending)} tasks on {cpus} CPUs")
    done_members = 0
    stop_requested = []

    def on_sigint(signum, frame):
        if stop_requested:  # the second Ctrl-C: stop waiting
            raise KeyboardInterrupt
        stop_requested.append(signum)
        flag.set.remote()
        print("\nlab: stopping: the Ray tasks checkpoint their members and send them back (Ctrl-C again to give up)",
              file=sys.stderr)

    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread
        previous = None
    interrupted = False
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            names = pending.pop(ref)
            try:
                results = ray.get(ref)
            except ray.exceptions.RayTaskError as err:  # a lab error in a task is the same one line as locally
                if isinstance(err.cause, LabError):
                    raise err.cause from None
                raise
            for name, files in results:
                write_member_files(sweep_dir / name, files)
                summary = json.loads(files["summary.json"]) if "summary.json" in files else {}
                interrupted |= summary.get("status") == "interrupted"
            done_members += len(names)
            if progress:
                log(f"ray: {done_members}/{n_members} members back ({len(pending)} tasks running or queued)")
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return interrupted or bool(stop_requested)
