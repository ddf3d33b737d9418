"""kill -9 at random moments (issue 12): whatever moment a `lab train` dies at (importing, before its first
checkpoint, while writing one, between evaluations, during a resume), the run is never a dead end and, once
resumed, its metrics equal those of an uninterrupted run bit for bit (wall time aside).

3 kills in the default run; 12 more (import phase, every part of training, a second kill during the resume)
with `-m slow`. The kill moments come from a seeded generator, printed on failure to reproduce a case.
Killed runs train in parallel; the resumes and the uninterrupted reference run all happen in one helper
process, so a case costs about one process start.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_data

from lab.runs import storage

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # the same in every process: bit-for-bit
STEPS = 300
CONFIG = tiny_data(steps=STEPS, eval_every=10, checkpoint_every=40)

# Resumes each killed run (or starts it afresh if it died before writing its config), then trains the
# uninterrupted reference; prints the exit codes as JSON.
HELPER = """
import json, sys
from pathlib import Path
from lab.cli import main
config, runs, *names = sys.argv[1:]
codes = {}
for name in names:
    folder = Path(runs) / name
    if (folder / "config.json").is_file():
        codes[name] = main(["train", "--resume", str(folder), "--quiet"])
    else:  # killed before it wrote anything: the same `lab train --name` starts it (no dead end)
        codes[name] = main(["train", config, "--runs-dir", runs, "--name", name, "--quiet"])
codes["reference"] = main(["train", config, "--runs-dir", runs, "--name", "reference", "--quiet"])
print(json.dumps(codes))
"""


def write_config(path: Path) -> Path:
    lines = ['name = "kill"']
    for section in ("task", "model", "train"):
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in CONFIG[section].items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def lab(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lab.cli", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV, cwd=ROOT, **kwargs)


def last_step(folder: Path) -> int:
    try:
        rows = storage.read_jsonl(folder / "metrics.jsonl")
    except Exception:  # being rewritten, or a torn line mid-read: look again
        return -1
    return rows[-1]["step"] if rows else -1


def kill_when(procs: dict[str, tuple[subprocess.Popen, tuple]], runs: Path, timeout: float = 600) -> None:
    """Kill each process at its moment: ("time", s) s seconds after it started, or ("step", n, s) s seconds
    after its metrics first reach step n (or, for a resume, pass it). Asserts that every one was killed."""
    started = time.monotonic()
    pending = dict(procs)
    while pending and time.monotonic() - started < timeout:
        for name, (proc, moment) in list(pending.items()):
            due = (moment[0] == "time" and time.monotonic() - started >= moment[1]) or (
                moment[0] == "step" and last_step(runs / name) >= moment[1])
            if due:
                if moment[0] == "step":
                    time.sleep(moment[2])
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                del pending[name]
            elif proc.poll() is not None:
                raise AssertionError(f"{name} ended (code {proc.returncode}) before its kill moment {moment}")
        time.sleep(0.005)
    assert not pending, f"never reached: {pending}"
    for name, (proc, moment) in procs.items():
        assert proc.returncode == -signal.SIGKILL, (name, moment, proc.returncode)


def kill_and_resume(tmp_path: Path, moments: list[tuple], second_kills: list[tuple] = ()) -> None:
    config = write_config(tmp_path / "kill.toml")
    runs = tmp_path / "runs"
    names = [f"k{i}" for i in range(len(moments))]
    procs = {name: (lab("train", config, "--runs-dir", runs, "--name", name, "--quiet"), moment)
             for name, moment in zip(names, moments)}
    kill_when(procs, runs)
    # every killed run that wrote its summary now reads "interrupted (resumable)", never "running"
    for row in json.loads(subprocess.run([sys.executable, "-m", "lab.cli", "runs", "--runs-dir", str(runs), "--json"],
                                         capture_output=True, text=True, env=ENV, cwd=ROOT, check=True).stdout):
        assert row["status"] in ("interrupted (resumable)", "finished"), row
    # a second kill, during the resume of some of them
    resumable = [n for n in names if (runs / n / "config.json").is_file()]
    again = {name: (lab("train", "--resume", runs / name, "--quiet"), ("step", min(last_step(runs / name) + step, STEPS - 10), delay))
             for name, (_, step, delay) in zip(resumable, second_kills)}
    kill_when(again, runs)

    helper = subprocess.run([sys.executable, "-c", HELPER, str(config), str(runs), *names], capture_output=True,
                            text=True, env=ENV, cwd=ROOT, timeout=900)
    assert helper.returncode == 0, helper.stderr
    codes = json.loads(helper.stdout.strip().splitlines()[-1])
    assert set(codes.values()) == {0}, (codes, helper.stderr)
    expected = rows_without_time(runs / "reference")
    assert [r["step"] for r in expected] == list(range(0, STEPS + 1, 10))
    for name, moment in zip(names, moments):
        assert rows_without_time(runs / name) == expected, (name, moment)  # none lost, none repeated, same bits
        assert json.loads((runs / name / "summary.json").read_text())["status"] == "finished"
        assert not list((runs / name).rglob("*.tmp")), name  # half-written files of the killed writer are gone


def rows_without_time(folder: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in storage.read_metrics(folder / "metrics.jsonl")]


def moments(seed: int, n_time: int, n_step: int) -> list[tuple]:
    rng = random.Random(seed)
    return ([("time", rng.uniform(0.2, 2.0)) for _ in range(n_time)]
            + [("step", rng.randrange(0, STEPS - 40), rng.uniform(0.0, 0.05)) for _ in range(n_step)])


def test_kill_9_at_random_moments_resumes_bit_for_bit(tmp_path):
    """3 kills: one just after the first row (before or while the step-0 checkpoint is written), two mid-run."""
    rng = random.Random(12)
    kill_and_resume(tmp_path, [("step", 0, rng.uniform(0.0, 0.01))] + moments(12, 0, 2))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_many_moments_and_a_second_kill_during_resume(tmp_path, seed):
    """4 kills per seed (12 in all): one timed from the start (import, folder creation, first files), three at
    random steps; two of them killed again while resuming."""
    kill_and_resume(tmp_path, moments(seed, 1, 3), second_kills=[("step", 20, 0.0), ("step", 60, 0.02)])
