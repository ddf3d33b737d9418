"""Sweeps (issue 8): the Done-when command on a tiny model, continuing, Ctrl-C, bad input, phases, Ray.

The 12-member sweep is the issue's `lab sweep modadd_quick --grid train.weight_decay=0.3,1,3 --grid
task.train_frac=0.3,0.5 --seeds 2`, scaled to p = 11, d_model 32 and a few dozen steps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab.runs import storage
from lab.cli import main
from lab.sweeps.sweep import PHASES, SWEEP_FILE, SweepSpec, load_sweep, phase_of, prepare_sweep, sweep_record

TINY_SET = ["task.p=11", "model.d_model=32", "model.n_heads=2", "model.d_head=16", "model.d_mlp=64",
            "train.eval_every=10", "train.checkpoint_every=20", "train.log_checkpoints=0", "train.device=cpu"]
DONE_WHEN = ["--grid", "train.weight_decay=0.3,1,3", "--grid", "task.train_frac=0.3,0.5", "--seeds", "2"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on this shared 2-core machine a second thread waiting at OpenMP barriers made these
    tiny steps 10-40x slower under load. The comparisons below are between runs with the same setting."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sweep_args(runs_dir, *extra, steps=40, name=None):
    args = ["sweep", "modadd_quick", *extra, "--runs-dir", str(runs_dir), "--quiet", f"--set=train.steps={steps}"]
    args += [f"--set={s}" for s in TINY_SET]
    return args + (["--name", name] if name else [])


def metrics_without_time(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in storage.read_jsonl(run_dir / "metrics.jsonl")]


def file_mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


class EnsembleSpy:
    """Records the member count of every `lab.sweeps.ensemble.train_ensemble` call (the real function still trains)."""

    def __init__(self, monkeypatch):
        import lab.sweeps.ensemble

        self.calls: list[int] = []
        real = lab.sweeps.ensemble.train_ensemble

        def spy(members, *args, **kwargs):
            self.calls.append(len(members))
            return real(members, *args, **kwargs)

        monkeypatch.setattr(lab.sweeps.ensemble, "train_ensemble", spy)


@pytest.fixture(scope="module")
def done_when(tmp_path_factory):
    """The 12-member sweep, trained once for the tests of this module (and the ensemble calls it made)."""
    runs = tmp_path_factory.mktemp("runs")
    mp = pytest.MonkeyPatch()
    spy = EnsembleSpy(mp)
    try:
        assert main(sweep_args(runs, *DONE_WHEN)) == 0
    finally:
        mp.undo()
    return runs, spy.calls


# --- the Done-when sweep -------------------------------------------------------------------------------


def test_done_when_sweep_trains_12_members_vectorised(done_when):
    runs, calls = done_when
    assert calls == [12]  # one stacked ensemble of all 12 members
    sweep = load_sweep("modadd_quick-sweep", runs_dir=runs)
    frame = sweep.members
    assert len(frame) == 12
    assert list(sweep.axes) == ["train.weight_decay", "task.train_frac"]
    for column in ("train.weight_decay", "task.train_frac", "seed", "run", "status", "memorize_step", "grok_step",
                   "final_train_acc", "final_test_acc", "phase"):
        assert column in frame.columns
    assert sorted(set(frame["train.weight_decay"])) == [0.3, 1.0, 3.0]
    assert sorted(set(frame["task.train_frac"])) == [0.3, 0.5]
    assert sorted(set(frame["seed"])) == [0, 1]
    assert set(frame["status"]) == {"finished"}
    assert set(frame["phase"]) <= set(PHASES)
    # each member is an ordinary run: its config holds its point, its summary its outcome
    for _, row in frame.iterrows():
        run = sweep.run(row["member"])
        assert run.config.train.weight_decay == row["train.weight_decay"] and run.config.model.seed == row["seed"]
        assert run.summary["step"] == 40 and run.summary["final"]["test_acc"] == row["final_test_acc"]
    assert frame["member"].tolist()[0] == "weight_decay0.3-train_frac0.3-seed0"
    record = json.loads((runs / "modadd_quick-sweep" / SWEEP_FILE).read_text())
    assert record["status"] == "finished" and record["seeds"] == 2 and len(record["members"]) == 12
    assert record["axes"] == {"train.weight_decay": [0.3, 1.0, 3.0], "task.train_frac": [0.3, 0.5]}


def test_members_are_listed_and_loadable_as_runs(done_when, capsys):
    import lab

    runs, _ = done_when
    rows = [row for row in lab.list_runs(runs) if row["sweep"] == "modadd_quick-sweep"]
    assert len(rows) == 12
    name = "modadd_quick-sweep/weight_decay1.0-train_frac0.5-seed1"
    assert name in {row["name"] for row in rows}
    run = lab.load_run(name, runs_dir=runs)
    assert run.config.task.train_frac == 0.5 and run.metrics["step"].iloc[-1] == 40
    assert main(["sweeps", "--runs-dir", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "modadd_quick-sweep" in out and "12 finished" in out and "weight_decay(3) x train_frac(2) x seeds(2)" in out
    assert main(["sweeps", "--runs-dir", str(runs), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed[0]["members"] == 12 and sum(listed[0]["phases"].values()) == 12


def test_rerun_does_no_new_work(done_when, monkeypatch, capsys):
    runs, _ = done_when
    before = file_mtimes(runs)
    spy = EnsembleSpy(monkeypatch)
    assert main(sweep_args(runs, *DONE_WHEN)) == 0
    assert spy.calls == []
    assert file_mtimes(runs) == before
    assert "trained 0, skipped 12" in capsys.readouterr().out


def test_outcome_by_and_table(done_when):
    runs, _ = done_when
    sweep = load_sweep(runs / "modadd_quick-sweep")
    by_frac = sweep.outcome_by("task.train_frac", "final_test_acc")
    assert by_frac["task.train_frac"].tolist() == [0.3, 0.5] and by_frac["n"].tolist() == [6, 6]
    members = sweep.members
    expected = members[members["task.train_frac"] == 0.5]["final_test_acc"].median()
    assert by_frac["median"].iloc[1] == pytest.approx(expected)
    by_both = sweep.outcome_by("train.weight_decay", "grok_step", by="task.train_frac")
    assert len(by_both) == 6 and (by_both["n"] == 2).all()
    # a member that never grokked is censored at its 40 steps: where neither did, the median is no number but "> 40"
    never = by_both["n_censored"] == 2
    assert (by_both["median"][never].isna() & (by_both["median_above"][never] == 40)).all()
    assert (by_both["median"][by_both["n_censored"] == 0].notna()).all()
    grid = sweep.table("train.weight_decay", "task.train_frac", "phase")
    assert grid.shape == (2, 3) and set(grid.to_numpy().ravel()) <= set(PHASES)
    with pytest.raises(ValueError, match="no axis 'train.lr'"):
        sweep.outcome_by("train.lr")
    with pytest.raises(ValueError, match="no outcome 'speed'"):
        sweep.outcome_by("task.train_frac", "speed")


# --- phases ----------------------------------------------------------------------------------------


def test_phase_of_follows_liu_table_1():
    assert phase_of(100, 500) == "comprehension"  # test crosses < 1000 steps after train
    assert phase_of(100, 1100) == "grokking"  # exactly 1000 later: grokking
    assert phase_of(100, None) == "memorization"
    assert phase_of(None, None) == "confusion"
    assert phase_of(None, 300) == "confusion"  # test without train: no row in Table 1; documented as confusion
    assert phase_of(100, 1100, gap=2000) == "comprehension"


def write_fake_sweep(root: Path, curves: dict[str, tuple[list, list, str]]) -> Path:
    """A sweep folder with hand-written metrics: member -> (train accs, test accs, status), one row per 500 steps."""
    sweep_dir = root / "fake"
    members = []
    for i, (name, (train, test, status)) in enumerate(curves.items()):
        rows = [{"step": 500 * k, "train_acc": a, "test_acc": b, "train_loss": 1.0, "test_loss": 1.0}
                for k, (a, b) in enumerate(zip(train, test))]
        storage.write_jsonl(sweep_dir / name / "metrics.jsonl", rows)
        storage.atomic_write_json(sweep_dir / name / "summary.json", {"status": status, "step": rows[-1]["step"],
                                                                      "steps": 2500, "final": rows[-1]})
        members.append({"name": name, "point": {"train.lr": float(i), "seed": 0}})
    storage.atomic_write_json(sweep_dir / SWEEP_FILE, {"name": "fake", "axes": {"train.lr": [float(i) for i in range(len(curves))]},
                                                       "seeds": None, "members": members})
    return sweep_dir


def test_phases_from_metrics_with_adjustable_thresholds(tmp_path):
    sweep = load_sweep(write_fake_sweep(tmp_path, {
        "comp": ([0.5, 0.95, 1.0, 1.0], [0.1, 0.92, 1.0, 1.0], "finished"),
        "grok": ([0.95, 1.0, 1.0, 1.0], [0.1, 0.2, 0.5, 0.93], "finished"),
        "mem": ([0.95, 1.0, 1.0, 1.0], [0.1, 0.2, 0.3, 0.85], "finished"),
        "conf": ([0.2, 0.3, 0.4, 0.5], [0.1, 0.1, 0.1, 0.1], "finished"),
        "busy": ([0.95, 1.0], [0.1, 0.2], "running"),
    }))
    frame = sweep.members.set_index("member")
    assert frame["phase"].to_dict() == {"comp": "comprehension", "grok": "grokking", "mem": "memorization",
                                        "conf": "confusion", "busy": "unfinished"}
    assert frame.loc["grok", "t_train"] == 0 and frame.loc["grok", "t_test"] == 1500
    # thresholds are parameters: at 80% "mem" groks at 1500; with a 2000-step gap "grok" is comprehension
    assert sweep.phases(test_acc=0.8).set_index("member").loc["mem", "phase"] == "grokking"
    assert sweep.phases(gap=2000).set_index("member").loc["grok", "phase"] == "comprehension"
    assert sweep.phases(budget=1000).set_index("member").loc["grok", "phase"] == "memorization"


# --- the [sweep] table and bad input -------------------------------------------------------------------


def write_experiment(tmp_path: Path, sweep_table: str) -> Path:
    text = (Path(__file__).resolve().parent.parent / "experiments" / "modadd_quick.toml").read_text()
    path = tmp_path / "exp.toml"
    path.write_text(text + "\n" + sweep_table)
    return path


def test_sweep_table_gives_axes_and_grid_overrides_them(tmp_path):
    from lab.config import load_experiment

    path = write_experiment(tmp_path, '[sweep]\nseeds = 3\n"train.weight_decay" = [0.3, 1.0]\n"task.train_frac" = [0.3, 0.5]\n')
    assert load_experiment(path).train.weight_decay == 2.0  # `lab train` trains the base point, ignoring [sweep]
    spec = SweepSpec.build(path, grid=["task.train_frac=0.4"], seeds=None, overrides=TINY_SET)
    assert spec.axes == {"train.weight_decay": [0.3, 1.0], "task.train_frac": [0.4]} and spec.seeds == 3
    members = spec.members()
    assert len(members) == 6 and members[-1].name == "weight_decay1.0-train_frac0.4-seed2"
    assert members[-1].point == {"train.weight_decay": 1.0, "task.train_frac": 0.4, "seed": 2}
    assert SweepSpec.build(path, seeds=1).seeds == 1
    odd = SweepSpec.build(path, grid=["task.operator=add,x2+y2", "train.betas=[0.9,0.98],[0.8,0.99]"], seeds=1)
    assert [m.name for m in odd.members()][:2] == ["weight_decay0.3-train_frac0.3-operatoradd-betas0.9_0.98-seed0",
                                                   "weight_decay0.3-train_frac0.3-operatoradd-betas0.8_0.99-seed0"]
    assert any("operatorx2plusy2" in m.name for m in odd.members())


@pytest.mark.parametrize("extra, message", [
    (["--grid", "train.weight_decy=0.3,1"], "unknown key 'train.weight_decy'; did you mean 'train.weight_decay'?"),
    (["--grid", "trian.lr=1e-3"], "unknown key 'trian.lr'"),
    (["--grid", "train.weight_decay=0.3,-1"], "train.weight_decay = -1: Input should be greater than or equal to 0"),
    (["--grid", "task.train_frac=0.3,1.5"], "task.train_frac"),
    (["--grid", "train.weight_decay=1,1.0"], "would share the folder name 'weight_decay1.0'"),
    (["--grid", "train.weight_decay"], "is not of the form section.key=v1,v2"),
    (["--seeds", "0"], "--seeds = 0: must be a positive integer"),
    (["--grid", "model.seed=0,1", "--seeds", "2"], "not both"),
    (["--name", "../escape"], "not allowed"),
])
def test_bad_input_fails_before_training_with_one_line(tmp_path, capsys, extra, message):
    runs = tmp_path / "runs"
    assert main(sweep_args(runs, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lab: error: ") and message in err and "\n" not in err, err
    assert not runs.exists() or not any(runs.iterdir())  # nothing trained, nothing written


def test_bad_sweep_table_key_is_one_line(tmp_path, capsys):
    path = write_experiment(tmp_path, '[sweep]\n"train.wd" = [0.3, 1.0]\n')
    assert main(["sweep", str(path), "--runs-dir", str(tmp_path / "runs"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "[sweep] unknown key 'train.wd'" in err and "\n" not in err


def test_rerun_with_other_axes_or_config_is_refused(tmp_path, capsys):
    runs = tmp_path / "runs"
    spec = SweepSpec.build("modadd_quick", grid=["train.weight_decay=0.3,1"], seeds=1, overrides=[*TINY_SET, "train.steps=40"])
    sweep_dir, members, record = prepare_sweep(spec, runs)
    sweep_dir.mkdir(parents=True)
    storage.atomic_write_json(sweep_dir / SWEEP_FILE, record)  # as if started earlier
    assert main(sweep_args(runs, "--grid", "train.weight_decay=0.3,1,3", "--seeds", "1")) == 2
    assert "already exists with axes train.weight_decay=0.3,1.0 seeds=1, this command gives" in capsys.readouterr().err
    assert main(sweep_args(runs, "--grid", "train.weight_decay=0.3,1", "--seeds", "1", steps=50)) == 2
    assert "was made with train.steps = 40, this command gives 50" in capsys.readouterr().err
    (runs / "plain").mkdir()
    (runs / "plain" / "x").write_text("")
    assert main(sweep_args(runs, "--seeds", "1", name="plain")) == 2
    assert "is not a sweep" in capsys.readouterr().err
    assert list(sweep_dir.iterdir()) == [sweep_dir / SWEEP_FILE]


# --- Ctrl-C and continuing -----------------------------------------------------------------------------

INTERRUPT_GRID = ["--grid", "train.weight_decay=0.3,1", "--seeds", "2"]
INTERRUPT_STEPS = 600


def test_interrupted_sweep_resumes_to_the_uninterrupted_metrics(tmp_path):
    interrupted, reference = tmp_path / "interrupted", tmp_path / "reference"
    command = [sys.executable, "-m", "lab.cli", *sweep_args(interrupted, *INTERRUPT_GRID, steps=INTERRUPT_STEPS)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    sweep_dir = interrupted / "modadd_quick-sweep"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:  # Ctrl-C once every member is past step 20
        metrics = list(sweep_dir.glob("*/metrics.jsonl"))
        if len(metrics) == 4 and all(any(r["step"] >= 20 for r in storage.read_jsonl(p)) for p in metrics):
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "interrupted" in out and "Traceback" not in err
    summaries = [storage.read_json(p) for p in sweep_dir.glob("*/summary.json")]
    assert {s["status"] for s in summaries} == {"interrupted"}
    assert all(20 <= s["step"] < INTERRUPT_STEPS for s in summaries)
    assert storage.read_json(sweep_dir / SWEEP_FILE)["status"] == "interrupted"

    assert main(sweep_args(interrupted, *INTERRUPT_GRID, steps=INTERRUPT_STEPS)) == 0  # the same command continues
    assert main(sweep_args(reference, *INTERRUPT_GRID, steps=INTERRUPT_STEPS)) == 0
    resumed, whole = load_sweep(sweep_dir), load_sweep(reference / "modadd_quick-sweep")
    assert set(resumed.members["status"]) == {"finished"}
    for member in whole.member_names:
        assert metrics_without_time(resumed.path / member) == metrics_without_time(whole.path / member), member
        a, b = resumed.run(member).state_dict(), whole.run(member).state_dict()
        assert all((a[k] == b[k]).all() for k in a)


# --- Ray ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def local_ray():
    """One real local Ray instance for the whole test session (no mocks), bound to 127.0.0.1."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[ray]' to run the Ray sweep tests")
    from lab.sweeps.ray_backend import start_local_ray, stop_watchdog

    start_local_ray(ray, num_cpus=2, object_store_memory=100 * 1024 * 1024)
    yield ray
    ray.shutdown()
    stop_watchdog()


def test_ray_backend_trains_and_continues_a_sweep_like_local(local_ray, tmp_path, capsys):
    from lab.sweeps.ensemble import train_ensemble

    grid = ["--grid", "train.weight_decay=0.3,1,3", "--seeds", "2"]
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    assert main(sweep_args(local, *grid, steps=60)) == 0
    # start the Ray sweep as an interrupted one: every member stopped at step 20, with its resume state
    spec = SweepSpec.build("modadd_quick", grid=["train.weight_decay=0.3,1,3"], seeds=2, overrides=[*TINY_SET, "train.steps=60"])
    sweep_dir, members, record = prepare_sweep(spec, on_ray)
    sweep_dir.mkdir(parents=True)
    storage.atomic_write_json(sweep_dir / SWEEP_FILE, sweep_record(spec, members, status="interrupted"))
    steps_seen = []
    summaries = train_ensemble([(m.config, sweep_dir / m.name) for m in members], progress=False,
                               stop=lambda: steps_seen.append(1) or len(steps_seen) > 21)
    assert {s["status"] for s in summaries} == {"interrupted"}
    capsys.readouterr()

    assert main(sweep_args(on_ray, *grid, "--backend", "ray", steps=60)) == 0
    assert "ray: 6 members in 2 tasks" in capsys.readouterr().err
    a, b = load_sweep(local / "modadd_quick-sweep"), load_sweep(sweep_dir)
    assert set(b.members["status"]) == {"finished"}
    for member in a.member_names:
        assert metrics_without_time(b.path / member) == metrics_without_time(a.path / member), member
        assert set(a.run(member).checkpoint_steps) <= set(b.run(member).checkpoint_steps)  # plus the Ctrl-C one
    before = file_mtimes(sweep_dir)
    assert main(sweep_args(on_ray, *grid, "--backend", "ray", steps=60)) == 0  # nothing left: no Ray task at all
    assert file_mtimes(sweep_dir) == before


def test_ray_backend_without_ray_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when it is not installed
    assert main(sweep_args(tmp_path / "runs", "--seeds", "1", "--backend", "ray")) == 2
    err = capsys.readouterr().err.strip()
    assert err == "lab: error: --backend ray needs Ray: pip install -e '.[ray]'"
    assert not (tmp_path / "runs").exists()


def test_chunking_spreads_groups_over_cpus():
    from lab.sweeps.ray_backend import chunk_sizes

    assert chunk_sizes(12, 2) == [6, 6]
    assert chunk_sizes(64, 2) == [16, 16, 16, 16]
    assert chunk_sizes(3, 8) == [3]
    assert chunk_sizes(40, 100) == [4] * 10
    assert sum(chunk_sizes(37, 3)) == 37


def test_a_second_writer_of_the_same_sweep_is_refused(tmp_path, capsys):
    runs = tmp_path / "runs"
    spec = SweepSpec.build("modadd_quick", seeds=1, overrides=[*TINY_SET, "train.steps=20"])
    sweep_dir = runs / spec.name
    with storage.run_lock(sweep_dir):  # as if another `lab sweep` of this sweep were running in this process' place
        import threading

        codes = []
        thread = threading.Thread(target=lambda: codes.append(main(sweep_args(runs, "--seeds", "1", steps=20))))
        thread.start()
        thread.join()
    assert codes == [2] and "is being" in capsys.readouterr().err
    assert main(sweep_args(runs, "--seeds", "1", steps=20)) == 0  # once it is free, the sweep runs


def test_a_member_written_before_a_config_field_existed_still_counts_as_its_config():
    """A rerun compares a member's saved config.json with its point as validated configs: a field the lab
    gained since (here model.init_scale, at its default) must not make a finished member train again."""
    import json

    from conftest import tiny

    from lab.config import is_config_of

    config = tiny().resolve()
    saved = json.loads(config.model_dump_json())
    del saved["model"]["init_scale"]
    assert is_config_of(saved, config)
    saved["train"]["lr"] = 0.5
    assert not is_config_of(saved, config)
    assert not is_config_of({"task": "damaged"}, config)
