"""Training keeps the memory it frees (lab/training/allocator.py): glibc's thresholds are set once, by the
Trainer and by stacked ensembles. (Page faults per step fell 4-10x in measurements, but their count varies
too much between processes to be a test: once 598 against 479.)"""

import sys

import pytest

import lab.sweeps.ensemble
import lab.training.trainer
from conftest import tiny


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_keep_freed_memory_is_in_force_and_idempotent():
    from lab.training.allocator import keep_freed_memory

    assert keep_freed_memory() is True and keep_freed_memory() is True


def test_trainer_and_ensemble_keep_freed_memory(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(lab.training.trainer, "keep_freed_memory", lambda: calls.append("trainer"))
    monkeypatch.setattr(lab.sweeps.ensemble, "keep_freed_memory", lambda: calls.append("ensemble"))
    lab.training.trainer.Trainer(tiny(), tmp_path / "run", progress=False)
    lab.sweeps.ensemble.StackedEnsemble([tiny()])
    assert calls == ["trainer", "ensemble"]
