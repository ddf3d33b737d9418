"""`lab sweep --backend ray`: a sweep's groups as Ray tasks, on a local Ray instance or a cluster.

Each group of same-shape members (see `lab.sweeps.sweep.training_groups`) is cut into chunks of at most
MAX_MEMBERS_PER_TASK members (fewer when that spreads the work over more CPUs); each chunk is one
Ray task. A task trains its members as one stacked ensemble in a temporary folder on its worker,
and returns the files of their run folders as bytes; the driver writes them into RUNS/SWEEP/
atomically (summary.json last), so no shared filesystem is needed. An unfinished member's
resume state, metrics, config and summary travel with its task, so it continues exactly as
`lab train --resume` would. A task whose worker dies is retried (MAX_RETRIES); an error in the
training itself is not (it would fail again) and stops the sweep with that error.

The driver holds each member's writer lock while the member's task is out (the task trains a copy; the
driver writes the member's folder), so `lab train --resume` of that member, or another sweep, is refused
while it trains; a member someone else is writing is refused before its task starts. Tasks are
submitted as members come free, at most `storage.max_writer_locks()` members at once, so a sweep of
thousands holds a bounded number of locks. A writer that next takes a member's lock removes the temp
files a killed driver left in it (`storage.remove_temp_files`).

The private instance (no --address) listens on 127.0.0.1 only, whatever RAY_ADDRESS says, and dies with
the driver. An --address where nothing answers is one line within CONNECT_TIMEOUT_S.

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
import socket
import sys
import tempfile
import time
from collections import deque
from contextlib import contextmanager, nullcontext
from pathlib import Path

from lab.runs import storage
from lab.errors import ConfigError, LabError, RunLockedError

MAX_MEMBERS_PER_TASK = 16
MAX_RETRIES = 3
# The files a member needs to continue (everything `lab.sweeps.ensemble` reads back from a run folder);
# its checkpoints stay on the driver.
RESUME_FILES = ("config.json", "summary.json", "metrics.jsonl", storage.RESUME_FILE)
STOP_POLL_S = 1.0
CONNECT_TIMEOUT_S = 30  # an --address must answer within this, or the sweep stops with one line


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
    """Every file under a run folder (or just `names`), as relative path -> bytes (bounded reads of regular files:
    a FIFO or device in a member's folder is one RunError line, not a hang)."""
    files = {}
    limit = storage.max_metrics_bytes()
    if names is not None:
        for name in names:
            if os.path.lexists(run_dir / name):
                files[name] = storage.read_bytes(run_dir / name, limit)
        return files
    for path in sorted(run_dir.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            files[path.relative_to(run_dir).as_posix()] = storage.read_bytes(path, limit)
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
    log = log or (lambda message: print(message, file=sys.stderr))
    with ray_session(address, num_cpus) as ray:
        return _run(ray, groups, Path(sweep_dir), progress, log)


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None):
    """Ray, connected for the block: to the cluster at `address`, or to a private instance started here (shut down
    after the block); an instance this process is already connected to is used as it is. `lab sweep` enters it
    before it writes anything, so an unreachable --address leaves no trace."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    if address:
        connect_to_cluster(ray, address)
    else:
        start_local_ray(ray, num_cpus=num_cpus or os.cpu_count())
    try:
        yield ray
    finally:
        ray.shutdown()
        stop_watchdog()


def stop_watchdog() -> None:
    """After `ray.shutdown()` of the private instance: the watchdog kills any leftover and exits."""
    global _watchdog
    if _watchdog is not None:
        _watchdog.stdin.close()
        _watchdog.wait()
        _watchdog = None


def start_local_ray(ray, num_cpus: int | None = None, **options) -> None:
    """A private Ray instance on this machine whose every server listens on 127.0.0.1 only.

    `address="local"`: a new instance even when RAY_ADDRESS names a cluster. Ray turns a loopback node
    address into the machine's outward one, and binds its servers (GCS, raylet, workers, agents) to that,
    unless its cluster mode is off (ray/_private/services.py `resolve_ip_for_localhost` and
    `get_node_ip_address` read ray_constants.ENABLE_RAY_CLUSTER, env RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER):
    it is off while the instance starts. Its processes are started fate-shared: they end with this one.
    tests/test_hostile_sweeps.py checks the binding with `ss -ltn`."""
    with _loopback_node():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, _node_ip_address="127.0.0.1", **options)
    _start_watchdog()


_watchdog = None  # the watchdog process of this driver's private instance (`_start_watchdog`)


def _start_watchdog() -> None:
    """A small process that SIGKILLs what the private instance left when this driver ends, however it ends.

    Ray fate-shares its GCS and raylet with the driver, but after kill -9 of the driver its agents
    (DashboardAgent, RuntimeEnvAgent) and idle workers, orphaned, live on. The watchdog learns the driver's
    descendants while it lives and, when the pipe from the driver closes (the driver exited or was killed),
    kills those still running (Linux: /proc)."""
    import subprocess

    global _watchdog
    if _watchdog is not None or not os.path.isdir("/proc"):
        return
    import ray

    _watchdog = subprocess.Popen([sys.executable, "-c", "import sys; from lab.sweeps.ray_backend import watch; "
                                  "watch(int(sys.argv[1]), sys.argv[2])", str(os.getpid()), os.path.dirname(ray.__file__)],
                                 stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def watch(driver: int, ray_dir: str, every_s: float = 0.5) -> None:
    """The watchdog's loop (`_start_watchdog`): track `driver`'s Ray descendants until stdin closes, then kill them."""
    import select

    seen: dict[int, str | None] = {}
    while True:
        for pid in descendants(driver) - {os.getpid()} - set(seen):
            if _is_ray_process(pid, ray_dir):  # only Ray's: never another child the driver's user started
                seen[pid] = _start_time(pid)
        readable, _, _ = select.select([sys.stdin], [], [], every_s)
        if readable and not os.read(sys.stdin.fileno(), 1024):  # EOF: the driver is gone
            break
    time.sleep(every_s)  # a normal shutdown ends its processes itself; give it a moment
    for pid, started in seen.items():
        if started is not None and _start_time(pid) == started:  # the same process, not a reused PID
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (children, their children, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _is_ray_process(pid: int, ray_dir: str) -> bool:
    """Workers and agents (named "ray::..."), gcs_server, raylet and Ray's Python helpers (run from the installed
    ray package, `ray_dir`): by their command line."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read().replace(b"\0", b" ")
    except OSError:
        return False
    return command.startswith(b"ray::") or ray_dir.encode() + b"/" in command


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@contextmanager
def _loopback_node():
    """While Ray starts or connects: this node's address stays 127.0.0.1 (see `start_local_ray`)."""
    from ray._private import ray_constants

    cluster_mode = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_mode


def connect_to_cluster(ray, address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """`ray.init(address=...)`, or one ConfigError line within about `timeout_s` when no Ray cluster answers there.

    Ray itself waits minutes for an unreachable GCS, in C++ that no signal interrupts, printing time-outs.
    So the address is first tried with a plain TCP connection (a closed port fails at once), then by a
    child process that asks the GCS for its cluster id (`_PROBE`) and is killed at `timeout_s`."""
    hint = "start it (ray start --head), or leave out --address to use a private Ray instance on this machine"
    host = ""
    if address != "auto":
        host, _, port = address.removeprefix("ray://").rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--address {address!r}: give HOST:PORT of a Ray cluster's head (e.g. 127.0.0.1:6379), or 'auto'")
        try:
            socket.create_connection((host, int(port)), timeout=min(10.0, timeout_s)).close()
        except OSError as err:
            reason = "timed out" if isinstance(err, TimeoutError) else (os.strerror(err.errno).lower() if err.errno else str(err))
            raise ConfigError(f"--address {address}: no Ray cluster answers there ({reason}); {hint}") from None
    if not address.startswith("ray://"):  # (a Ray Client server speaks another protocol)
        import subprocess

        try:
            probe = subprocess.run([sys.executable, "-c", _PROBE, address, str(int(timeout_s * 1000 * 0.6))],
                                   capture_output=True, text=True, timeout=timeout_s)
            failure = None if probe.returncode == 0 else (probe.stdout.strip().splitlines() or ["it did not answer"])[-1]
        except subprocess.TimeoutExpired:
            failure = f"no answer within {timeout_s:.0f} s"
        if failure is not None and ("InvalidAuthToken" in failure or "Unauthenticated" in failure):
            # Ray enables a token only for clusters it finds itself; for an explicit address the user says so
            raise ConfigError(f"--address {address}: the cluster requires token authentication; set RAY_AUTH_MODE=token "
                              f"(with its token in ~/.ray/auth_token or RAY_AUTH_TOKEN) and rerun")
        if failure is not None:
            raise ConfigError(f"--address {address}: no Ray cluster answers there ({failure}); {hint}")
    # a cluster on this machine's loopback (a private instance of another `lab sweep`) is reached as such;
    # Ray would otherwise dial the machine's outward address, where nothing listens
    loopback = host in ("127.0.0.1", "localhost", "::1")
    try:
        with _loopback_node() if loopback else nullcontext():
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ConfigError(f"--address {address}: {str(err).splitlines()[0]}; {hint}") from None


# Run by `connect_to_cluster` in a child process: exit 0 if a Ray GCS at argv[1] ("auto": the one this machine last
# started) gives its cluster id within argv[2] ms; else print why, on the last line. stderr (Ray's C++ log) is dropped.
_PROBE = """
import sys
try:
    from ray._private.services import get_ray_address_from_environment
    from ray._raylet import InnerGcsClient
    address = get_ray_address_from_environment(sys.argv[1], None) if sys.argv[1] == "auto" else sys.argv[1]
    if not address:
        raise ConnectionError("no running Ray instance found on this machine")
    InnerGcsClient.standalone(address, None, int(sys.argv[2]))
except Exception as err:
    print(str(err).splitlines()[0] if str(err) else type(err).__name__)
    sys.exit(1)
"""


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
    chunks = deque()
    for group in groups:
        start = 0
        for size in chunk_sizes(len(group), cpus):
            chunks.append(group[start : start + size])
            start += size
    n_members, n_tasks = sum(map(len, chunks)), len(chunks)
    log(f"ray: {n_members} members in {n_tasks} tasks on {cpus} CPUs")
    most = storage.max_writer_locks()
    pending: dict = {}  # task -> (member names, their writer locks), for the tasks out now

    def submit() -> None:
        """Send tasks while members may be in flight: each member's lock first, then its files (under the lock)."""
        while chunks and not stop_requested and (not pending or sum(len(n) for n, _ in pending.values()) + len(chunks[0]) <= most):
            chunk = chunks.popleft()
            locks = []
            try:
                for m in chunk:
                    locks.append(_lock_member(sweep_dir / m.name))
                payload = [(m.name, m.config.model_dump_json(), _read_files(sweep_dir / m.name, RESUME_FILES)) for m in chunk]
            except BaseException:
                for lock in locks:
                    lock.release()
                raise
            pending[remote_chunk.remote(payload, flag)] = ([m.name for m in chunk], locks)

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
        submit()
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            names, locks = pending.pop(ref)
            try:
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
            finally:
                for lock in locks:
                    lock.release()
            done_members += len(names)
            if progress:
                log(f"ray: {done_members}/{n_members} members back ({len(pending)} tasks running, {len(chunks)} queued)")
            submit()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        for _, locks in pending.values():  # stopped early: members whose tasks are still out are free again
            for lock in locks:
                lock.release()
    return interrupted or bool(stop_requested) or bool(chunks)


def _lock_member(run_dir: Path):
    """The member's writer lock, or one line naming who writes it (`lab train --resume`, another sweep)."""
    try:
        return storage.acquire_writer(run_dir)
    except RunLockedError:
        pid = storage.writer_pid(run_dir)
        raise RunLockedError(f"sweep member {run_dir} is being written by {f'PID {pid}' if pid else 'another process'}; "
                             f"wait for it to end (or stop it), then rerun this command to continue the sweep") from None
