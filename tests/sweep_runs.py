"""A small real sweep for the Sweeps page's tests (tests/test_sweep_view.py, tests/test_browser.py),
trained once per test session in-process with `lab.sweeps.sweep.run_sweep`: p = 11 modular addition,
model.init_scale (1, 2) x train.weight_decay (0.1, 1) x 2 seeds = 8 members of 80 steps, one
vectorised group. One member is then made to look unfinished (status "running"), as a sweep that is
still training would.
"""

from __future__ import annotations

import json
from pathlib import Path

SWEEP_NAME = "grid"
EXPERIMENT = """
name = "tinysweep"
description = "p = 11 addition, for the Sweeps page's tests"

[task]
name = "modular"
p = 11
train_frac = 0.5

[model]
d_model = 16
n_heads = 2
d_head = 8
d_mlp = 32

[train]
steps = 80
lr = 1e-2
eval_every = 10
checkpoint_every = 80
log_checkpoints = 0
device = "cpu"

[sweep]
seeds = 2
"model.init_scale" = [1.0, 2.0]
"train.weight_decay" = [0.1, 1.0]
"""
UNFINISHED = "init_scale2.0-weight_decay1.0-seed1"


def make_sweep(runs_dir: Path) -> Path:
    from lab.sweeps.sweep import SweepSpec, run_sweep

    runs_dir = Path(runs_dir)
    experiment = runs_dir.parent / "tinysweep.toml"
    experiment.write_text(EXPERIMENT)
    spec = SweepSpec.build(experiment, name=SWEEP_NAME)
    result = run_sweep(spec, runs_dir=runs_dir, progress=False, log=lambda message: None)
    folder = Path(result["sweep_dir"])
    summary_path = folder / UNFINISHED / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary.update(status="running", step=40)
    summary_path.write_text(json.dumps(summary))
    return folder


_made: dict[str, Path] = {}


def shared_sweep(tmp_path_factory) -> Path:
    """The sweep folder (RUNS/grid), trained once per test session, with one torch thread."""
    if "sweep" not in _made:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            root = tmp_path_factory.mktemp("sweep_view")
            (root / "runs").mkdir()
            _made["sweep"] = make_sweep(root / "runs")
        finally:
            torch.set_num_threads(threads)
    return _made["sweep"]
