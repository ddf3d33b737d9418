"""Small runs trained once per test session, for the probe and analysis tests.

Each is trained by the real `Trainer` into a session folder `runs/` (so a test can `lab.load_run`
it by path or by name), once per pytest process however many test modules ask for it:

- `modadd_quick`: a + b mod 23 at 70% training data, 500 full-batch steps; it memorises in ~50
  steps and generalises by ~300 (test accuracy about 0.95+), with Fourier features to find.
- `a_and_b`: the a_and_b task on short strings, 200 steps of a 2-head, d_model 16 model.
- `tiny_modular`: a + b mod 7, 12 steps; for tests that only need some checkpoints.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

RUN_SETTINGS = {
    "modadd_quick": ("modadd_quick", [
        "task.p=23", "task.train_frac=0.7", "model.d_model=48", "model.d_head=12", "model.d_mlp=128",
        "train.steps=500", "train.stop_after_grok=1000", "train.lr=1e-2", "train.weight_decay=1.0", "train.eval_every=50", "train.checkpoint_every=100", "train.log_checkpoints=4",
    ]),
    "a_and_b": ("a_and_b", [
        "task.max_train_len=8", "task.max_test_len=24", "task.max_len=64", "task.n_train=1024", "task.n_test=256",
        "train.steps=200", "train.batch_size=128", "train.eval_every=100", "train.checkpoint_every=100",
        "train.log_checkpoints=2",
    ]),
    "tiny_modular": ("modadd_quick", [
        "task.p=7", "task.train_frac=0.5", "model.d_model=16", "model.d_head=4", "model.d_mlp=32",
        "train.steps=12", "train.eval_every=4", "train.checkpoint_every=4", "train.log_checkpoints=0",
    ]),
}

_trained: dict[str, Path] = {}
_root: list[Path] = []


def runs_root(tmp_path_factory) -> Path:
    """The session's runs folder (created on first use)."""
    if not _root:
        _root.append(tmp_path_factory.mktemp("probe_runs") / "runs")
        _root[0].mkdir()
    return _root[0]


def trained_run(name: str, tmp_path_factory) -> Path:
    """The run folder of RUN_SETTINGS[name], trained on first use."""
    if name not in _trained:
        from lab.config import load_experiment
        from lab.training.trainer import Trainer

        experiment, overrides = RUN_SETTINGS[name]
        run_dir = runs_root(tmp_path_factory) / name
        run_dir.mkdir()
        Trainer(load_experiment(experiment, overrides), run_dir, progress=False).run()
        _trained[name] = run_dir
    return _trained[name]


def make_unreadable(path: Path):
    """Overwrite a checkpoint with zeros of its size, keeping its modification time: a cache keyed on (size,
    mtime) still matches while loading the file fails, so an answer given anyway came from the cache.
    Returns a function that writes the original bytes back (a rewrite: the file gets a new time)."""
    import os

    stat, original = path.stat(), path.read_bytes()
    path.write_bytes(bytes(len(original)))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return lambda: path.write_bytes(original)


def copy_run(name: str, tmp_path_factory, dest: Path) -> Path:
    """A private copy of a session run, for tests that change its files."""
    return Path(shutil.copytree(trained_run(name, tmp_path_factory), dest))


@pytest.fixture(scope="session")
def grokked_run(tmp_path_factory):
    import lab

    return lab.load_run(trained_run("modadd_quick", tmp_path_factory))


@pytest.fixture(scope="session")
def a_and_b_run(tmp_path_factory):
    import lab

    return lab.load_run(trained_run("a_and_b", tmp_path_factory))


@pytest.fixture(scope="session")
def tiny_modular_run(tmp_path_factory):
    import lab

    return lab.load_run(trained_run("tiny_modular", tmp_path_factory))
