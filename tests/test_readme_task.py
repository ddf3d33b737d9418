"""The README's "Adding a task" example runs as written and trains."""

import re
from pathlib import Path

import pytest

from lab.config import validate_experiment
from lab.tasks import TASKS
from lab.training.trainer import Trainer

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture
def parity_task():
    section = README.read_text().split("## Adding a task", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md (Adding a task)", "exec"), namespace)
    yield namespace["ParityTask"]
    TASKS.pop("parity", None)  # keep the registry as other tests expect it


def test_readme_task_example_registers_and_trains(parity_task, tmp_path):
    config = validate_experiment({
        "name": "parity",
        "task": {"name": "parity", "n_bits": 6},
        "model": {"d_model": 16, "n_heads": 2, "d_head": 8, "d_mlp": 32},
        "train": {"steps": 40, "eval_every": 20, "lr": 3e-3},
    })
    assert isinstance(config.task, parity_task.Config)
    trainer = Trainer(config, tmp_path / "run", progress=False)
    assert len(trainer.task.split("train")) == 32 and len(trainer.task.split("test")) == 32
    assert trainer.task.label(trainer.task.encode("110100")) == 1
    summary = trainer.run()
    assert summary["status"] == "finished" and summary["task"] == "parity"
