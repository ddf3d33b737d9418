"""Shared by the test files: TINY, the smallest experiment that trains in well under a second on CPU.

p = 11 modular addition (60 training pairs), one layer of d_model 32; 30 steps, an evaluation and
a checkpoint every 10. Tests that need more steps or other settings start from `tiny(...)`.
"""

import copy

TINY = {
    "name": "tiny",
    "task": {"name": "modular", "p": 11, "train_frac": 0.5},
    "model": {"d_model": 32, "n_heads": 2, "d_head": 16, "d_mlp": 64},
    "train": {"steps": 30, "lr": 3e-3, "eval_every": 10, "checkpoint_every": 10, "log_checkpoints": 0, "device": "cpu"},
}


def tiny_data(**train) -> dict:
    """A fresh copy of TINY as a dict, with `train` fields overridden."""
    data = copy.deepcopy(TINY)
    data["train"].update(train)
    return data


def tiny(**train):
    """TINY as a validated ExperimentConfig, with `train` fields overridden."""
    from lab.config import validate_experiment

    return validate_experiment(tiny_data(**train))
