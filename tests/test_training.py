"""Training: loss falls, determinism, run-folder contents, and exact resume after Ctrl-C or kill -9."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny, tiny_data

import lab.runs.outcomes
from lab.runs.storage import ResumeState, checkpoint_steps, load_resume_state, load_tensors, read_jsonl, save_tensors
from lab.training.trainer import Trainer, checkpoint_schedule

LONGER = {"steps": 120, "checkpoint_every": 50, "log_checkpoints": 4}


def without_time(rows):
    return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in rows]


def test_loss_falls_and_run_folder_is_complete(tmp_path):
    summary = Trainer(tiny(**LONGER), tmp_path / "run", progress=False).run()
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(0, 121, 10))
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] / 2
    assert set(rows[0]) >= {"step", "train_loss", "train_acc", "test_loss", "test_acc", "weight_norm", "elapsed_s"}
    assert summary["status"] == "finished" and summary["step"] == 120
    assert summary["memorize_step"] == next(r["step"] for r in rows if r["train_acc"] >= 0.99)
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk == summary
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["d_vocab"] == 12 and config["model"]["causal"] is True  # resolved
    assert checkpoint_steps(tmp_path / "run") == sorted(checkpoint_schedule(120, 50, 4))
    tensors, meta = load_tensors(tmp_path / "run" / "checkpoints" / "step_0000120.safetensors")
    assert meta["step"] == "120" and "blocks.0.attn.W_Q" in tensors
    assert not list((tmp_path / "run").rglob("*.tmp"))


def test_checkpoint_schedule_is_log_spaced_plus_periodic():
    schedule = checkpoint_schedule(10000, 2500, 8)
    assert {0, 2500, 5000, 7500, 10000} <= schedule
    early = sorted(s for s in schedule if 0 < s < 2500)
    assert len(early) >= 5 and early[0] <= 5  # dense early, where memorisation happens


def test_training_is_deterministic_to_the_bit(tmp_path):
    config = tiny(**{**LONGER, "steps": 40, "batch_size": 16})
    Trainer(config, tmp_path / "a", progress=False).run()
    Trainer(config, tmp_path / "b", progress=False).run()
    assert without_time(read_jsonl(tmp_path / "a" / "metrics.jsonl")) == without_time(read_jsonl(tmp_path / "b" / "metrics.jsonl"))


def lab_cmd(*args, **kwargs):
    return [sys.executable, "-m", "lab.cli", *args]


def write_config(path: Path, data: dict) -> Path:
    import tomllib  # noqa: F401  (the CLI reads TOML; write it by hand)

    lines = [f'name = "{data["name"]}"']
    for section in ("task", "model", "train"):
        lines.append(f"[{section}]")
        for key, value in data[section].items():
            if isinstance(value, dict):
                continue
            lines.append(f"{key} = {json.dumps(value)}")
        for key, value in data[section].items():
            if isinstance(value, dict):
                lines.append(f"[{section}.{key}]")
                lines += [f"{k} = {json.dumps(v)}" for k, v in value.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


# Mini-batches and a Grokfast filter, so that resume must restore the batch order and the filter state too.
RESUMABLE = {**tiny_data(steps=3000, batch_size=24, eval_every=20, checkpoint_every=150,
                         grad_filter={"kind": "ema", "alpha": 0.9, "lamb": 1.0}), "name": "resumable"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    config = write_config(root / "resumable.toml", RESUMABLE)
    subprocess.run(lab_cmd("train", str(config), "--runs-dir", str(root), "--name", "run", "--quiet"), check=True)
    return config, read_jsonl(root / "run" / "metrics.jsonl")


def wait_for_rows(path: Path, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = read_jsonl(path)
        if rows and rows[-1]["step"] >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"training never reached step {step}")


@pytest.mark.parametrize("how", ["kill -9", "ctrl-c"])
def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path, uninterrupted, how):
    config, expected = uninterrupted
    run = tmp_path / "run"
    proc = subprocess.Popen(lab_cmd("train", str(config), "--runs-dir", str(tmp_path), "--name", "run", "--quiet"),
                            stderr=subprocess.PIPE, text=True)
    wait_for_rows(run / "metrics.jsonl", 400)  # past two checkpoints, between evals
    proc.send_signal(signal.SIGKILL if how == "kill -9" else signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    status = json.loads((run / "summary.json").read_text())["status"]
    if how == "kill -9":
        assert proc.returncode == -signal.SIGKILL and status == "running"
    else:
        assert proc.returncode == 130, stderr
        assert status == "interrupted" and "lab train --resume" in stderr
    partial = read_jsonl(run / "metrics.jsonl")
    assert partial[-1]["step"] < 3000

    done = subprocess.run(lab_cmd("train", "--resume", str(run), "--quiet"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [r["step"] for r in expected]  # none lost, none repeated
    assert without_time(rows) == without_time(expected)  # the same numbers, to the bit
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"


def test_resume_of_a_folder_that_is_not_a_run(tmp_path):
    result = subprocess.run(lab_cmd("train", "--resume", str(tmp_path)), capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"lab: error: {tmp_path}: nothing to resume (no config.json); is this a run folder?"


def test_resume_state_is_readable_and_old_resume_files_still_resume(tmp_path):
    """resume.safetensors says what it holds (model/, optimizer/, grad_filter/), and a file in the layout
    before it (model., optim., filter.) resumes to the same numbers as an uninterrupted run."""
    config = tiny(steps=40, batch_size=16, checkpoint_every=20, grad_filter={"kind": "ema", "alpha": 0.9, "lamb": 1.0})
    Trainer(config, tmp_path / "straight", progress=False).run()
    first_half = config.model_copy(update={"train": config.train.model_copy(update={"steps": 20})})
    Trainer(first_half, tmp_path / "new", progress=False).run()

    state = load_resume_state(tmp_path / "new")
    assert isinstance(state, ResumeState) and state.step == 20 and state.elapsed_s >= 0
    assert set(state.optimizer) == set(state.model) and set(state.optimizer["W_E"]) == {"step", "exp_avg", "exp_avg_sq"}
    assert state.grad_filter and all(key.startswith("ema.") for key in state.grad_filter)
    tensors, meta = load_tensors(tmp_path / "new" / "resume.safetensors")
    assert meta["step"] == "20"
    assert {key.split("/")[0] for key in tensors} == {"model", "optimizer", "grad_filter"}
    assert "optimizer/W_E/exp_avg" in tensors and "model/blocks.0.attn.W_Q" in tensors

    shutil.copytree(tmp_path / "new", tmp_path / "old")
    old = {f"model.{name}": t for name, t in state.model.items()}
    old |= {f"optim.{name}.{field}": t for name, fields in state.optimizer.items() for field, t in fields.items()}
    old |= {f"filter.{key}": t for key, t in state.grad_filter.items()}
    save_tensors(tmp_path / "old" / "resume.safetensors", old, meta)
    again = load_resume_state(tmp_path / "old")
    assert (again.step, again.elapsed_s) == (state.step, state.elapsed_s)
    for part in ("model", "grad_filter"):
        assert getattr(again, part).keys() == getattr(state, part).keys()
        assert all(getattr(again, part)[k].equal(t) for k, t in getattr(state, part).items())
    assert all(again.optimizer[n][f].equal(t) for n, fields in state.optimizer.items() for f, t in fields.items())

    expected = without_time(read_jsonl(tmp_path / "straight" / "metrics.jsonl"))
    for folder in ("new", "old"):  # continue both to 40 steps
        saved = json.loads((tmp_path / folder / "config.json").read_text())
        saved["train"]["steps"] = 40
        (tmp_path / folder / "config.json").write_text(json.dumps(saved))
        Trainer.resume(tmp_path / folder, progress=False).run(resume=True)
        assert without_time(read_jsonl(tmp_path / folder / "metrics.jsonl")) == expected, folder


def test_a_run_stopped_after_grokking_ends_its_progress_bar_full_and_says_why(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lab.runs.outcomes, "GROK_ACC", 0.0)  # grokked at step 0: the run stops at the first eval >= 12
    summary = Trainer(tiny(steps=400, eval_every=5, stop_after_grok=12), tmp_path / "run", progress=True).run()
    assert summary["step"] == 15
    last_frame = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "100%" in last_frame and "15/15" in last_frame, last_frame
    assert "stopped: grokked at 0 + stop_after_grok 12" in last_frame


# --- extending a run, turning the early stop off -------------------------------------------------------


def test_a_finished_run_extends_with_resume_set_steps_to_the_run_trained_at_once(tmp_path):
    toml = tmp_path / "tiny.toml"
    data = tiny_data(batch_size=16)
    toml.write_text("\n".join(f"[{section}]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in data[section].items())
                              for section in ("task", "model", "train")))
    straight = subprocess.run(lab_cmd("train", str(toml), "--runs-dir", str(tmp_path), "--name", "straight", "--quiet",
                                       "--set", "train.steps=50"), capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    first = subprocess.run(lab_cmd("train", str(toml), "--runs-dir", str(tmp_path), "--name", "run", "--quiet"),
                           capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["step"] == 30

    extended = subprocess.run(lab_cmd("train", "--resume", str(tmp_path / "run"), "--set", "train.steps=50", "--quiet"),
                              capture_output=True, text=True)
    assert extended.returncode == 0, extended.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == summary["steps"] == 50
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["steps"] == 50
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(0, 51, 10))
    assert without_time(rows) == without_time(read_jsonl(tmp_path / "straight" / "metrics.jsonl"))  # to the bit

    for assignment, message in (("model.d_model=8", "only train.steps, train.stop_after_grok may change"),
                                ("train.steps=20", "has already trained 50 steps; give train.steps >= 50")):
        refused = subprocess.run(lab_cmd("train", "--resume", str(tmp_path / "run"), "--set", assignment),
                                 capture_output=True, text=True)
        assert refused.returncode == 2 and message in refused.stderr and "Traceback" not in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("off", [False, "off"])
def test_stop_after_grok_false_or_off_turns_an_experiments_early_stop_off(tmp_path, monkeypatch, off):
    from lab.config import load_experiment

    assert load_experiment("a_and_b").train.stop_after_grok == 25
    assert load_experiment("a_and_b", [f"train.stop_after_grok={json.dumps(off)}"]).train.stop_after_grok is None
    monkeypatch.setattr(lab.runs.outcomes, "GROK_ACC", 0.0)  # grokked at step 0
    stops = Trainer(tiny(steps=40, stop_after_grok=10), tmp_path / "stops", progress=False).run()
    runs_on = Trainer(tiny(steps=40, stop_after_grok=off), tmp_path / "runs_on", progress=False).run()
    assert (stops["step"], runs_on["step"]) == (10, 40)
