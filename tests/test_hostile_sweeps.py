"""The hostile catalogue for sweeps (issue 20): a sweep is a database too.

Categories (see `test_catalogue_size`):
  one writer        `lab train --resume` of a member a `--backend ray` sweep is training is refused
  true status       a member (and a sweep) whose writer is gone is "interrupted (resumable)" in `lab sweeps`,
                    `load_sweep`, `lab runs` and the Sweeps page
  sweep.json        DAMAGES: each damaged sweep.json is named in one line, hides neither the other sweeps nor its
                    own members (`lab runs`), and the rerun of the sweep's command rebuilds it
  Ray               an unreachable --address is one line within 30 s; the private instance listens on 127.0.0.1
                    only; no Ray process outlives a killed driver (slow)
  limits            seeds, steps, grid size, TOML nesting, open files, FIFOs and devices, symlink loops, Sweep.run(True)
  temp files        a killed writer's temp files go when the next writer opens the member

One tiny finished sweep (2 members, p = 11) is trained once per module and copied by each case; one local Ray
instance (started as `lab sweep --backend ray` starts it) serves every Ray case of the module.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lab  # before torch: lab switches on MKL's reproducible mode
import pytest

from lab import cli
from test_hostile_inputs import one_thread  # noqa: F401  (an autouse fixture: one torch thread)
from lab.errors import ConfigError, RunError
from lab.runs import storage
from lab.runs.run import INTERRUPTED, list_runs, load_run
from lab.sweeps.ray_backend import descendants
from lab.sweeps.sweep import SWEEP_FILE, SweepSpec, load_sweep, prepare_sweep, read_sweep_record, sweep_record

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
TINY_SET = ["task.p=11", "model.d_model=32", "model.n_heads=2", "model.d_head=16", "model.d_mlp=64",
            "train.eval_every=10", "train.checkpoint_every=20", "train.log_checkpoints=0", "train.device=cpu"]
SEEDS2 = ["--seeds", "2"]


def sweep_argv(runs_dir, *extra, steps=40, name="s"):
    return ["sweep", "modadd_quick", *extra, "--runs-dir", str(runs_dir), "--quiet", f"--set=train.steps={steps}",
            *[f"--set={s}" for s in TINY_SET], "--name", name]


def lab_main(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def lab_process(*argv, timeout=300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lab.cli", *map(str, argv)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished sweep of 2 members (40 steps) in RUNS/s, and a healthy second sweep RUNS/other."""
    runs = tmp_path_factory.mktemp("hostile_sweeps") / "runs"
    assert cli.main(sweep_argv(runs, *SEEDS2)) == 0
    assert cli.main(sweep_argv(runs, "--seeds", "1", name="other")) == 0
    return runs


@pytest.fixture
def runs(tmp_path, finished) -> Path:
    copy = tmp_path / "runs"
    shutil.copytree(finished, copy)
    return copy


def member_files(sweep_dir: Path) -> dict[str, bytes]:
    """Every file of every member (locks excluded): what a rerun must not change."""
    return {str(p.relative_to(sweep_dir)): p.read_bytes() for p in sorted(sweep_dir.rglob("*"))
            if p.is_file() and p.parent != sweep_dir and p.name != storage.LOCK_FILE}


# --- true status after a crash ------------------------------------------------------------------------


def as_if_killed(sweep_dir: Path) -> None:
    """What kill -9 of `lab sweep` leaves: sweep.json and every member's summary saying "running", no writer."""
    record = json.loads((sweep_dir / SWEEP_FILE).read_text())
    storage.atomic_write_json(sweep_dir / SWEEP_FILE, {**record, "status": "running"})
    for member in record["members"]:
        summary = json.loads((sweep_dir / member["name"] / "summary.json").read_text())
        storage.atomic_write_json(sweep_dir / member["name"] / "summary.json", {**summary, "status": "running"})


def test_a_killed_sweep_is_interrupted_everywhere_not_running(runs, capsys):
    sweep_dir = runs / "s"
    as_if_killed(sweep_dir)
    sweep = load_sweep(sweep_dir)
    assert set(sweep.members["status"]) == {INTERRUPTED}
    assert sweep.status == INTERRUPTED
    assert set(sweep.members["phase"]) == {"unfinished"}
    row = next(r for r in lab.list_sweeps(runs) if r["name"] == "s")
    assert row["statuses"] == {INTERRUPTED: 2} and row["status"] == INTERRUPTED
    code, out, _ = lab_main(capsys, "sweeps", "--runs-dir", runs)
    assert code == 0 and f"2 {INTERRUPTED}" in out and "running" not in out
    assert {r["status"] for r in list_runs(runs) if r["sweep"] == "s"} == {INTERRUPTED}
    # while a writer holds a member (a Ray driver whose task trains it), the same member is "running"
    with storage.run_lock(sweep_dir / sweep.member_names[0]):
        assert list(load_sweep(sweep_dir).members["status"]) == ["running", INTERRUPTED]


def sweeps_page(runs: Path, monkeypatch, name: str):
    """The Sweeps page on `runs`, with sweep `name` selected."""
    from test_dashboard import TIMEOUT, APP
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("LAB_RUNS_DIR", str(runs))
    st.cache_data.clear()
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run().switch_page("views/sweeps.py").run()
    return at.selectbox(key="sweeps_name").set_value(name).run()


def test_the_sweeps_page_shows_a_killed_sweep_as_interrupted(runs, monkeypatch):
    from test_dashboard import errors, no_exception

    as_if_killed(runs / "s")
    at = sweeps_page(runs, monkeypatch, "s")
    no_exception(at)
    assert not errors(at)
    caption = " ".join(c.value for c in at.caption)
    assert f"2 {INTERRUPTED}" in caption and "running" not in caption


def test_the_sweeps_page_names_a_damaged_sweep_and_still_shows_the_others(runs, monkeypatch):
    from test_dashboard import errors, no_exception

    DAMAGES["axes_a_list"][0](runs / "s")
    at = sweeps_page(runs, monkeypatch, "s")
    no_exception(at)
    assert sorted(at.selectbox(key="sweeps_name").options) == ["other", "s"]
    assert len(errors(at)) == 1 and "sweep.json: damaged sweep file (axes" in errors(at)[0]
    at.selectbox(key="sweeps_name").set_value("other").run()
    no_exception(at)
    assert not errors(at)


# --- sweep.json validated at the boundary -------------------------------------------------------------


def _edit(change):
    def damage(sweep_dir: Path) -> None:
        record = json.loads((sweep_dir / SWEEP_FILE).read_text())
        change(record)
        (sweep_dir / SWEEP_FILE).write_text(json.dumps(record))
    return damage


def _replace(make):
    def damage(sweep_dir: Path) -> None:
        (sweep_dir / SWEEP_FILE).unlink()
        make(sweep_dir / SWEEP_FILE)
    return damage


def _absolute_member(record: dict) -> None:
    record["members"][0]["name"] = str(Path(record["name"]).resolve().parent / "other" / "seed0")


# name -> (damage, what the one line says; None: not damaged, just stale, and load_sweep still reads it)
DAMAGES = {
    "axes_a_list":          (_edit(lambda r: r.update(axes=["model.seed"])),             "axes"),
    "axis_values_a_number": (_edit(lambda r: r.update(axes={"train.lr": 3})),            "axes.train.lr"),
    "members_strings":      (_edit(lambda r: r.update(members=["seed0", "seed1"])),      "members.0"),
    "point_a_list":         (_edit(lambda r: r["members"][0].update(point=[0])),         "members.0.point"),
    "name_an_int":          (_edit(lambda r: r.update(name=7)),                          "name"),
    "updated_at_text":      (_edit(lambda r: r.update(updated_at="yesterday")),          "updated_at"),
    "member_absolute_path": (_edit(_absolute_member),                                    "members.0.name"),
    "member_dotdot":        (_edit(lambda r: r["members"][0].update(name="../other/seed0")), "members.0.name"),
    "point_without_seed":   (_edit(lambda r: r["members"][0]["point"].pop("seed")),     "no value for 'seed'"),
    "not_json":             (lambda d: (d / SWEEP_FILE).write_text("{\"name\": "),       "damaged JSON"),
    "a_folder":             (_replace(lambda p: p.mkdir()),                               "is a folder"),
    "deleted":              (lambda d: (d / SWEEP_FILE).unlink(),                        "no such file"),
    "symlink_loop":         (_replace(lambda p: p.symlink_to(p.name)),                   "symlink loop"),
    "a_fifo":               (_replace(lambda p: os.mkfifo(p)),                            "FIFO"),
    "dev_zero":             (_replace(lambda p: p.symlink_to("/dev/zero")),               "is a device"),
    "members_cut_short":    (_edit(lambda r: r.update(members=r["members"][:1])),        None),
}


@pytest.mark.parametrize("case", DAMAGES)
def test_a_damaged_sweep_json_is_one_line_hides_nothing_and_the_rerun_rebuilds_it(runs, capsys, case):
    damage, message = DAMAGES[case]
    sweep_dir = runs / "s"
    before = member_files(sweep_dir)
    damage(sweep_dir)

    # `lab sweeps`: the damaged sweep is one row and one line naming its sweep.json; the healthy one is listed
    code, out, err = lab_main(capsys, "sweeps", "--runs-dir", runs)
    assert code == 0 and "other" in out.split("\n", 1)[1]
    if message is not None:
        assert "damaged" in out
        assert SWEEP_FILE in one_line(err) and message in err
        # load_sweep: one RunError line naming the file and how to rebuild it
        with pytest.raises(RunError, match="rerun the sweep's command to rebuild it") as caught:
            load_sweep(sweep_dir)
        assert "\n" not in str(caught.value) and message in str(caught.value)
    # its finished members stay listed as runs
    rows = [r for r in list_runs(runs) if r["sweep"] == "s"]
    assert sorted((r["name"], r["status"]) for r in rows) == [("s/seed0", "finished"), ("s/seed1", "finished")]

    # the sweep's own command rebuilds sweep.json from the member folders, training nothing
    code, out, err = lab_main(capsys, *sweep_argv(runs, *SEEDS2))
    assert code == 0, err
    assert "trained 0, skipped 2" in out
    record = read_sweep_record(sweep_dir / SWEEP_FILE)
    assert [m["name"] for m in record["members"]] == ["seed0", "seed1"] and record["status"] == "finished"
    assert member_files(sweep_dir) == before
    assert set(load_sweep(sweep_dir).members["status"]) == {"finished"}


def test_a_damaged_sweep_json_is_not_rebuilt_by_another_command(runs, capsys):
    """The rebuild takes only folders this command would make: other axes are refused in one line, nothing written."""
    (runs / "s" / SWEEP_FILE).write_text("[]")
    code, _, err = lab_main(capsys, *sweep_argv(runs, "--seeds", "1", "--grid", "train.lr=0.001,0.003"))
    assert code == 2 and "not a sweep of this command" in one_line(err) and "'seed0'" in err
    assert (runs / "s" / SWEEP_FILE).read_text() == "[]"


def test_a_member_folder_leading_out_of_the_sweep_is_never_read(runs):
    """A member folder that is a symlink to another sweep's run: refused by Sweep.run, no row data from it, not in `lab runs`."""
    sweep_dir = runs / "s"
    shutil.rmtree(sweep_dir / "seed1")
    (sweep_dir / "seed1").symlink_to(runs / "other" / "seed0")
    sweep = load_sweep(sweep_dir)
    with pytest.raises(RunError, match="leads out of the sweep folder"):
        sweep.run("seed1")
    assert list(sweep.members["status"]) == ["finished", "damaged"]
    assert [r["name"] for r in list_runs(runs) if r["sweep"] == "s"] == ["s/seed0"]


def test_sweep_run_refuses_a_bool(finished):
    sweep = load_sweep(finished / "s")
    with pytest.raises(RunError, match="member=True"):
        sweep.run(True)
    assert sweep.run(1).name == "seed1"


# --- limits before work -------------------------------------------------------------------------------


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "1000000000"], "1,000,000,000 members"),
    (["--grid", "train.lr=" + ",".join(f"{i + 1}e-4" for i in range(1000)),
      "--grid", "train.weight_decay=" + ",".join(str(i) for i in range(1000))], "1,000,000 members"),
    (["--seeds", "1", "--set", "train.steps=1e12"], "more than the 1,000,000,000 steps a run may have"),
    (["--seeds", "1", "--grid", "train.betas=" + "[" * 50000 + "]" * 50000], "nested more than 32 levels"),
], ids=["seeds_1e9", "grid_1000x1000", "steps_1e12", "grid_nested_50k"])
def test_oversized_sweeps_are_refused_before_work(tmp_path, capsys, argv, message):
    code, _, err = lab_main(capsys, "sweep", "modadd_quick", *argv, "--runs-dir", tmp_path / "runs")
    assert code == 2 and message in one_line(err)
    assert not (tmp_path / "runs").exists()


def test_a_toml_nested_50k_deep_is_one_line(tmp_path, capsys):
    """Brackets 50k deep (a RecursionError, 3,000 lines of traceback) and dotted keys 50k deep (tomllib takes a
    minute over them): one line each, at once."""
    nested = write_toml(tmp_path / "deep.toml", "x = " + "[" * 50000 + "]" * 50000 + "\n")
    dotted = write_toml(tmp_path / "dotted.toml", "a." * 50000 + "b = 1\n")
    for path in (nested, dotted):
        started = time.monotonic()
        code, _, err = lab_main(capsys, "train", path, "--runs-dir", tmp_path / "runs")
        assert code == 2 and f"{path}: nested more than 32 levels deep" in one_line(err)
        assert time.monotonic() - started < 10


def test_steps_evaluations_and_checkpoints_are_bounded_in_the_config():
    from conftest import tiny_data
    from lab.config import validate_experiment

    for train, message in [({"steps": 10**12}, "steps a run may have"),
                           ({"steps": 10**8, "eval_every": 1}, "evaluations, more than the 1,000,000"),
                           ({"steps": 10**8, "eval_every": 1000, "checkpoint_every": 10}, "checkpoints, more than the 100,000")]:
        with pytest.raises(ConfigError, match=message):
            validate_experiment(tiny_data(**train))
    validate_experiment(tiny_data(steps=10**6 - 1, eval_every=1))  # a million evaluations is allowed


@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_lab_runs_refuses_a_special_summary_without_reading_it(runs, kind):
    summary = runs / "s" / "seed0" / "summary.json"
    summary.unlink()
    os.mkfifo(summary) if kind == "fifo" else summary.symlink_to("/dev/zero")
    result = lab_process("runs", "--runs-dir", runs, timeout=60)
    assert result.returncode == 0 and "Traceback" not in result.stderr
    row = next(r for r in list_runs(runs) if r["name"] == "s/seed0")
    assert row["status"] == "damaged" and ("FIFO" if kind == "fifo" else "device") in row["error"]
    with pytest.raises(RunError, match="expected a regular file"):
        load_run(runs / "s" / "seed0").summary


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_a_name_that_is_a_symlink_loop_is_one_line(tmp_path, capsys, command):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "loop").symlink_to("loop")
    argv = sweep_argv(runs, "--seeds", "1", name="loop") if command == "sweep" else \
        ["train", "modadd_quick", "--runs-dir", runs, "--name", "loop", "--quiet"]
    code, _, err = lab_main(capsys, *argv)
    assert code == 2 and "loop" in one_line(err)


def test_a_big_group_takes_its_members_locks_a_piece_at_a_time(tmp_path):
    """150 same-shape members under `ulimit -n 128`: trained in pieces (each holding only its own members' locks),
    not one group holding 150 open locks ("too many open files"); every member finishes, no folder is left over."""
    runs = tmp_path / "runs"
    script = ("import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128)); "
              "from lab.cli import main; sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", script, *sweep_argv(runs, "--seeds", "150", steps=0, name="big")],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "150 members (150 finished)" in result.stdout
    sweep = load_sweep(runs / "big")
    assert set(sweep.members["status"]) == {"finished"}
    assert sorted(p.name for p in (runs / "big").iterdir() if p.is_dir()) == sorted(sweep.member_names)


def test_training_groups_are_cut_to_the_members_in_flight(monkeypatch):
    import lab.sweeps.sweep as sweep_module

    spec = SweepSpec.build("modadd_quick", seeds=10, overrides=TINY_SET)
    monkeypatch.setattr(storage, "max_writer_locks", lambda: 4)
    assert [len(g) for g in sweep_module.training_groups(spec.members())] == [4, 4, 2]


# --- temp files of killed writes ----------------------------------------------------------------------


def test_a_killed_writers_temp_files_go_when_the_sweep_next_opens_the_member(tmp_path, capsys):
    runs = tmp_path / "runs"
    spec = SweepSpec.build("modadd_quick", seeds=1, overrides=[*TINY_SET, "train.steps=40"], name="s")
    sweep_dir, members, _ = prepare_sweep(spec, runs)
    from lab.sweeps.ensemble import train_ensemble

    calls = []
    train_ensemble([(members[0].config, sweep_dir / "seed0")], progress=False, stop=lambda: calls.append(1) or len(calls) > 21)
    storage.atomic_write_json(sweep_dir / SWEEP_FILE, sweep_record(spec, members, status="interrupted"))
    temps = [sweep_dir / "seed0" / ".summary.json.x1.tmp", sweep_dir / "seed0" / "checkpoints" / ".step_0000040.safetensors.x2.tmp",
             sweep_dir / f".{SWEEP_FILE}.x3.tmp"]
    for temp in temps:
        temp.write_bytes(b"half a file")
    code, _, err = lab_main(capsys, *sweep_argv(runs, "--seeds", "1"))
    assert code == 0, err
    assert not any(t.exists() for t in temps)
    assert load_run(sweep_dir / "seed0").status == "finished"


def test_acquiring_the_writer_lock_removes_temp_files_and_nothing_else(tmp_path):
    run = tmp_path / "r"
    (run / "checkpoints").mkdir(parents=True)
    keep = [run / "summary.json", run / "checkpoints" / "step_0000010.safetensors", run / ".lock-note"]
    drop = [run / ".metrics.jsonl.abc.tmp", run / "checkpoints" / ".step_0000020.safetensors.def.tmp"]
    for path in keep + drop:
        path.write_text("x")
    with storage.run_lock(run):
        pass
    assert all(p.exists() for p in keep) and not any(p.exists() for p in drop)


# --- Ray ------------------------------------------------------------------------------------------------


def listening(pids: set[int]) -> list[str]:
    """`ss -ltnp` lines of the listening TCP sockets these processes hold."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if any(f"pid={pid}," in line for pid in pids)]


def test_an_address_that_never_answers_as_ray_times_out_in_one_line(tmp_path):
    """A port that accepts connections but is no Ray cluster: Ray would wait minutes; we stop at the time limit."""
    from lab.sweeps.ray_backend import connect_to_cluster
    import socket

    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("a Ray instance is already connected in this process")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    address = f"127.0.0.1:{server.getsockname()[1]}"
    started = time.monotonic()
    try:
        with pytest.raises(ConfigError, match=f"--address {address}"):
            connect_to_cluster(ray, address, timeout_s=5)
    finally:
        server.close()
    assert time.monotonic() - started < 20


@pytest.fixture(scope="module")
def local_ray():
    """One private Ray instance for this module, started the way `lab sweep --backend ray` starts one."""
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[ray]'")
    from lab.sweeps.ray_backend import start_local_ray, stop_watchdog

    if ray.is_initialized():
        ray.shutdown()
    start_local_ray(ray, num_cpus=2, object_store_memory=100 * 1024 * 1024)
    yield ray
    ray.shutdown()
    stop_watchdog()


def test_the_private_ray_instance_listens_on_loopback_only(local_ray):
    if shutil.which("ss") is None:
        pytest.skip("needs ss (iproute2)")
    local_ray.get(local_ray.remote(lambda: 1).remote())  # a worker is started too
    lines = listening(descendants(os.getpid()) | {os.getpid()})
    assert len(lines) >= 3, lines  # gcs_server, raylet, this driver, the worker
    for line in lines:
        local = line.split()[3]
        assert local.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:")), line


def test_an_unreachable_address_is_one_line_within_30_s(tmp_path):
    started = time.monotonic()
    result = lab_process(*sweep_argv(tmp_path / "runs", "--seeds", "1", "--backend", "ray", "--address", "127.0.0.1:1"),
                         timeout=120)
    assert time.monotonic() - started < 30
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()  # the sweep's plan, then the one error line
    assert lines[-1].startswith("lab: error: --address 127.0.0.1:1: no Ray cluster answers there (connection refused)")
    assert len(lines) == 2
    assert not (tmp_path / "runs" / "s").exists()  # refused before anything was written


def interrupted_sweep(runs: Path, steps: int, seeds: int = 2) -> Path:
    """A sweep whose members stopped at step 20 with their resume state (as after Ctrl-C)."""
    from lab.sweeps.ensemble import train_ensemble

    spec = SweepSpec.build("modadd_quick", seeds=seeds, overrides=[*TINY_SET, f"train.steps={steps}"], name="s")
    sweep_dir, members, _ = prepare_sweep(spec, runs)
    calls = []
    train_ensemble([(m.config, sweep_dir / m.name) for m in members], progress=False,
                   stop=lambda: calls.append(1) or len(calls) > 21)
    storage.atomic_write_json(sweep_dir / SWEEP_FILE, sweep_record(spec, members, status="interrupted"))
    return sweep_dir


def test_train_resume_of_a_member_the_ray_driver_trains_is_refused(local_ray, tmp_path):
    """The corruption of issue 20: `lab train --resume SWEEP/member` while a --backend ray sweep trains that member.
    The driver holds the member's lock while its task is out, so the second writer is refused in one line; the
    member's metrics stay one increasing series and it finishes."""
    runs = tmp_path / "runs"
    steps = 1500
    sweep_dir = interrupted_sweep(runs, steps)
    address = local_ray.get_runtime_context().gcs_address  # this module's instance, with Ray's token authentication
    driver = subprocess.Popen([sys.executable, "-m", "lab.cli", *sweep_argv(runs, *SEEDS2, "--backend", "ray",
                                                                             "--address", address, steps=steps)],
                              cwd=ROOT, env={**ENV, "RAY_AUTH_MODE": "token"}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while storage.writer_pid(sweep_dir / "seed0") != driver.pid:
            if driver.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Ray sweep never held the member: {driver.communicate()[1][-3000:]}")
            time.sleep(0.02)
        second = lab_process("train", "--resume", sweep_dir / "seed0", "--quiet", timeout=120)
        out, err = driver.communicate(timeout=300)
    finally:
        driver.kill()
    assert second.returncode == 2
    assert f"is being written by PID {driver.pid}" in one_line(second.stderr)
    assert driver.returncode == 0, err
    steps_seen = [row["step"] for row in load_run(sweep_dir / "seed0").metrics_rows]
    assert steps_seen == sorted(set(steps_seen)) and steps_seen[-1] == steps
    assert set(load_sweep(sweep_dir).members["status"]) == {"finished"}


def test_a_member_held_by_another_writer_is_refused_by_the_ray_driver(local_ray, tmp_path, capsys):
    runs = tmp_path / "runs"
    sweep_dir = interrupted_sweep(runs, 200, seeds=1)
    before = member_files(sweep_dir)
    import threading

    held, release, codes = threading.Event(), threading.Event(), []

    def other_writer():  # `lab train --resume` in another thread: a second writer, as another process would be
        with storage.run_lock(sweep_dir / "seed0"):
            held.set()
            release.wait(60)

    thread = threading.Thread(target=other_writer)
    thread.start()
    held.wait(10)
    try:
        codes.append(cli.main(sweep_argv(runs, "--seeds", "1", "--backend", "ray", steps=200)))
    finally:
        release.set()
        thread.join()
    err = capsys.readouterr().err
    assert codes == [2] and "sweep member" in err and "is being written by" in err
    assert member_files(sweep_dir) == before  # untouched


@pytest.mark.slow
def test_no_ray_process_outlives_a_killed_driver(tmp_path):
    """kill -9 of `lab sweep --backend ray` (its own private instance) while a task is out: every process the driver
    started is gone within 15 s; the members' temp files and status are sane for the rerun."""
    runs = tmp_path / "runs"
    driver = subprocess.Popen([sys.executable, "-m", "lab.cli", *sweep_argv(runs, *SEEDS2, "--backend", "ray", steps=3000)],
                              cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while storage.writer_pid(runs / "s" / "seed0") != driver.pid:
            assert driver.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        started = descendants(driver.pid)
        assert started, "the driver started no Ray process"
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
        deadline = time.monotonic() + 15
        alive = started
        while alive and time.monotonic() < deadline:
            time.sleep(0.5)
            alive = {pid for pid in started if Path(f"/proc/{pid}").exists()
                     and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"}
        assert not alive, [Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")[:100] for pid in alive]
    finally:
        driver.kill()
    assert load_sweep(runs / "s").status == INTERRUPTED


# --- the catalogue --------------------------------------------------------------------------------------


def test_catalogue_size():
    """How many hostile sweep cases there are, by category (issue 20 reported 33 that failed)."""
    sizes = {"one writer": 2, "true status": 2, "sweep.json": len(DAMAGES) + 3, "Ray": 4,
             "limits": 4 + 1 + 1 + 2 + 2 + 1 + 1 + 1, "temp files": 2}
    print(sizes, sum(sizes.values()))
    assert sum(sizes.values()) == 42
