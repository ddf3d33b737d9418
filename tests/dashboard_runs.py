"""Small real runs for the dashboard tests, trained in-process (seconds, not minutes, on a shared CPU).

Imported by tests/test_dashboard.py and tests/test_browser.py, which turn `make_runs` into a
session-scoped fixture. Two runs: modular addition mod 23 (1 layer, 4 heads) and a_and_b with two
layers of two heads, so the attention grid has more than one row.
"""

from __future__ import annotations

from pathlib import Path

MODULAR = [
    "task.p=23", "train.steps=200", "train.eval_every=20", "train.checkpoint_every=100", "train.log_checkpoints=4",
    "model.d_model=32", "model.d_head=8", "model.n_heads=4", "model.d_mlp=64", "train.device=cpu",
]
A_AND_B = [
    "task.n_train=256", "task.n_test=64", "task.max_train_len=8", "task.max_test_len=24", "task.max_len=48",
    "train.steps=60", "train.eval_every=20", "train.checkpoint_every=30", "train.log_checkpoints=2",
    "train.batch_size=128", "model.n_layers=2", "train.device=cpu",
]


def train(runs_dir: Path, experiment: str, name: str, overrides: list[str]) -> Path:
    from lab.config import load_experiment
    from lab.runs.storage import new_run_dir
    from lab.training.trainer import Trainer

    config = load_experiment(experiment, overrides).resolve()
    run_dir = new_run_dir(runs_dir, name, exact=True)
    Trainer(config, run_dir, progress=False).run()
    return run_dir


def make_runs(runs_dir: Path) -> dict[str, Path]:
    runs_dir = Path(runs_dir)
    return {
        "mod": train(runs_dir, "modadd_quick", "mod23", MODULAR),
        "ab": train(runs_dir, "a_and_b", "ab", A_AND_B),
    }


_made: dict[str, tuple[Path, dict[str, Path]]] = {}


def shared_runs(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """The runs, trained once per test session however many test modules ask (one torch thread:
    several times faster for models this small on a busy machine)."""
    if "runs" not in _made:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            folder = tmp_path_factory.mktemp("dashboard_runs")
            _made["runs"] = folder, make_runs(folder)
        finally:
            torch.set_num_threads(threads)
    return _made["runs"]


# A text run (a word-level next-token model): four lines of Hamlet, repeated, as its UTF-8 file. For the text
# Attention page (tests/test_text_attention.py, tests/test_browser.py); trained once per test session.
HAMLET = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
          "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n")
TEXT = {
    "name": "text_hamlet",
    "task": {"name": "text", "n_ctx": 16, "vocab_size": 40, "test_frac": 0.2},
    "model": {"d_model": 32, "n_heads": 2, "d_head": 16, "d_mlp": 64, "n_layers": 2},
    "train": {"steps": 40, "lr": 1e-2, "batch_size": 32, "eval_every": 20, "checkpoint_every": 20,
              "log_checkpoints": 0, "device": "cpu"},
}


def shared_text_run(tmp_path_factory) -> Path:
    """The folder of the text run "hamlet", trained on first use (about 10 s on an idle CPU)."""
    if "text" not in _made:
        import torch

        from lab.config import validate_experiment
        from lab.training.trainer import Trainer

        folder = tmp_path_factory.mktemp("text_runs")
        corpus = folder / "hamlet.txt"
        corpus.write_text(HAMLET * 30, encoding="utf-8")
        data = {**TEXT, "task": {**TEXT["task"], "path": str(corpus)}}
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            Trainer(validate_experiment(data).resolve(), folder / "runs" / "hamlet", progress=False).run()
        finally:
            torch.set_num_threads(threads)
        _made["text"] = folder / "runs" / "hamlet", {}
    return _made["text"][0]
