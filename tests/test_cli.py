"""The CLI as a user meets it: a subprocess, its exit code, and one clear line on bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny


def lab(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "lab.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=300)


def test_help_imports_nothing_heavy():
    """`lab --help` answers at once because it imports none of the numerical stack (measured as imports, not
    seconds, so that a loaded machine cannot fail it)."""
    heavy = ["torch", "numpy", "pandas", "pydantic", "safetensors", "transformer_lens", "streamlit", "plotly"]
    code = ("import runpy, sys; sys.argv = ['lab', '--help']\n"
            "try: runpy.run_module('lab.cli', run_name='__main__')\n"
            "except SystemExit: pass\n"
            f"print('imported:', [m for m in {heavy!r} if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "usage: lab" in done.stdout and "train" in done.stdout and "dashboard" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "imported: []"
    result = lab("--help")
    assert result.returncode == 0 and "train" in result.stdout and "dashboard" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "no_such_experiment"], "no experiment 'no_such_experiment': not a file, and not one of experiments/ ("),
        (["train", "modadd_quick", "--set", "train.lr=fast"], "error: --set 'train.lr=fast': train.lr = 'fast': Input should be a valid number"),
        (["train", "modadd_quick", "--set", "train.lrr=0.1"], "error: --set 'train.lrr=0.1': unknown key 'train.lrr'; did you mean 'lr'?"),
        (["train", "modadd_quick", "--set", "task.operator=pow"], "unknown operator 'pow'; valid operators: add, sub, mul, div"),
        (["train", "modadd_quick", "--set", "task.name=sorting"], "unknown task 'sorting'; valid tasks: a_and_b, modular"),
        (["train", "modadd_quick", "--set", "task.operator=div", "--set", "task.p=60"], "p = 60 is not prime"),
        (["train", "modadd_quick", "--set", "train.steps=-5"], "train.steps = -5: Input should be greater than or equal to 0"),
        (["train", "modadd_quick", "--set", "nonsense"], "--set 'nonsense' is not of the form section.key=value"),
        (["train", "modadd_quick", "--name", "../escape"], "run name '../escape' is not allowed"),
        (["train", "modadd_quick", "--name", "/etc"], "run name '/etc' is not allowed"),
        (["train"], "lab train needs an EXPERIMENT"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(tmp_path, args, message):
    result = lab(*args, "--runs-dir", str(tmp_path))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lab: error: "), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())  # no half-made run folder left behind


def test_bad_toml_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[task\nname = 1")
    result = lab("train", str(bad), "--runs-dir", str(tmp_path / "runs"))
    assert result.returncode == 2 and "bad.toml: not valid TOML" in result.stderr


def test_a_bad_value_names_where_it_came_from(tmp_path):
    """The file when the bad value is in the file (even with other --set keys given), the --set when it came from one."""
    bad = tmp_path / "bad_lr.toml"
    bad.write_text('[task]\nname = "modular"\np = 7\n[train]\nlr = -1.0\n')
    from_file = lab("train", str(bad), "--set", "train.steps=5", "--runs-dir", str(tmp_path / "runs"))
    assert from_file.returncode == 2 and f"error: {bad}: train.lr = -1.0" in from_file.stderr, from_file.stderr
    from_set = lab("train", str(bad), "--set", "train.lr=0.1", "--set", "task.p=abc", "--runs-dir", str(tmp_path / "runs"))
    assert from_set.returncode == 2 and "error: --set 'task.p=abc': task.p = 'abc'" in from_set.stderr, from_set.stderr


def test_train_runs_and_sweep_end_to_end(tmp_path):
    runs = tmp_path / "runs"
    small = ["--set", "task.p=7", "--set", "model.d_model=16", "--set", "model.d_mlp=32", "--set", "train.steps=30",
             "--set", "train.eval_every=10"]
    first = lab("train", "modadd_quick", *small, "--quiet", env={"LAB_RUNS_DIR": str(runs)})
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith(f"finished: {runs / 'modadd_quick'} at step 30/30")
    second = lab("train", "modadd_quick", *small, "--quiet", "--runs-dir", str(runs))
    assert second.returncode == 0 and (runs / "modadd_quick-2" / "summary.json").exists()  # never overwrites
    taken = lab("train", "modadd_quick", *small, "--name", "modadd_quick", "--runs-dir", str(runs))
    assert taken.returncode == 2 and "already exists; continue it with --resume" in taken.stderr

    sweep = lab("sweep", "modadd_quick", *small, "--grid", "train.weight_decay=0.1,1.0", "--quiet", "--runs-dir", str(runs))
    assert sweep.returncode == 0, sweep.stderr
    sweep_dir = runs / "modadd_quick-sweep"  # one folder: sweep.json + one ordinary run folder per member
    assert (sweep_dir / "sweep.json").is_file()
    swept = sorted(f"modadd_quick-sweep/{p.name}" for p in sweep_dir.iterdir() if p.is_dir())
    assert swept == ["modadd_quick-sweep/weight_decay0.1", "modadd_quick-sweep/weight_decay1.0"]
    config = json.loads((runs / swept[0] / "config.json").read_text())
    assert config["train"]["weight_decay"] == 0.1 and config["task"]["p"] == 7

    listing = lab("runs", "--runs-dir", str(runs))
    assert listing.returncode == 0
    header, *rows = listing.stdout.strip().splitlines()
    assert header.split() == ["name", "task", "arch", "params", "status", "step", "memorize_step", "grok_step", "test_acc", "test_loss"]
    assert len(rows) == 4 and all("finished" in row and "30/30" in row for row in rows)
    as_json = json.loads(lab("runs", "--json", "--runs-dir", str(runs)).stdout)
    assert {row["name"] for row in as_json} == {"modadd_quick", "modadd_quick-2", *swept}
    for row, line in ((row, next(line for line in rows if line.split()[0] == row["name"])) for row in as_json):
        final = json.loads((Path(row["path"]) / "summary.json").read_text())["final"]
        assert row["test_loss"] == final["test_loss"] and line.split()[-1] == f"{final['test_loss']:.4f}"


def test_runs_with_no_runs_says_how_to_start(tmp_path):
    result = lab("runs", "--runs-dir", str(tmp_path / "none"))
    assert result.returncode == 0 and "lab train modadd_quick" in result.stdout


def test_runs_lists_a_damaged_run_without_failing(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "summary.json").write_text("{not json")
    result = lab("runs", "--runs-dir", str(tmp_path))
    assert result.returncode == 0 and "broken" in result.stdout and "damaged" in result.stdout


def test_analyze_shows_a_progress_bar_only_when_there_is_something_to_compute(tmp_path, capsys):
    from lab.cli import main
    from lab.training.trainer import Trainer

    Trainer(tiny(), tmp_path / "tiny", progress=False).run()  # checkpoints at steps 0, 10, 20, 30
    assert main(["analyze", str(tmp_path / "tiny")]) == 0
    first = capsys.readouterr()
    assert "tiny: 4 checkpoints" in first.out and "4/4" in first.err and "checkpoint" in first.err
    assert main(["analyze", str(tmp_path / "tiny")]) == 0  # all cached now
    second = capsys.readouterr()
    assert "tiny: 4 checkpoints" in second.out and second.err == ""


def test_an_outcome_never_reached_reads_as_censored_not_as_none(tmp_path):
    """A run that never memorised or grokked says so with its step count: no `grokked at None`, no `-`."""
    runs = tmp_path / "runs"
    never = ["--set", "task.p=7", "--set", "model.d_model=16", "--set", "model.d_mlp=32", "--set", "train.steps=10",
             "--set", "train.eval_every=5", "--set", "train.lr=1e-9"]
    trained = lab("train", "modadd_quick", *never, "--quiet", "--runs-dir", str(runs))
    assert trained.returncode == 0, trained.stderr
    line = trained.stdout.splitlines()[0]
    assert "memorized: not within 10 steps, grokked: not within 10 steps" in line and "None" not in line
    header, row = lab("runs", "--runs-dir", str(runs)).stdout.strip().splitlines()
    cells = dict(zip(header.split(), row.split()))
    assert (cells["memorize_step"], cells["grok_step"]) == (">10", ">10")
