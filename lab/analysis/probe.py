"""What every probe starts with: a model and its task from "a run or a model", and a prediction.

Every analysis call (`lab.attention`, `lab.ablate_heads`, `lab.key_frequencies`, ...) accepts a
`Run`, a run folder path or name, or a bare `Transformer` with `task=` given, and resolves it
here into a `Target`: the model at one checkpoint, in eval mode, with the task that reads it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lab.models.prediction import Prediction, encode_tokens, predict_with
from lab.runs.run import Run, load_run


@dataclass(frozen=True)
class Target:
    """A model ready to probe: `model` (eval mode), `task`, `step` (None for a bare model), `loss_kind`."""

    model: object
    task: object
    step: int | None
    loss_kind: str = "softmax"
    run: object = None


def resolve_target(run_or_model, step: int | None = None, task=None) -> Target:
    """A Run, a run path/name, or a Transformer (+ `task=`) -> Target. Bad combinations raise ValueError."""
    from lab.models.architectures import is_model

    if isinstance(run_or_model, (str, os.PathLike)):
        run_or_model = load_run(run_or_model)
    if isinstance(run_or_model, Run):
        run = run_or_model
        if task is not None and task is not run.task:
            raise ValueError("task= is only for a bare model; a run brings its own task")
        step = run.resolve_step(step)
        return Target(run.model(step), run.task, step, run.config.train.loss, run)
    if is_model(run_or_model):  # any architecture of lab/models/architectures.py
        if task is None:
            raise ValueError("a bare model has no task: pass task=... (e.g. lab.make_task(config.task)), or pass the Run")
        if step is not None:
            raise ValueError(f"step={step} needs a Run (a bare model has no checkpoints); pass the Run instead")
        if task.d_vocab != run_or_model.cfg.d_vocab or task.d_vocab_out != run_or_model.cfg.d_vocab_out:
            raise ValueError(
                f"task {task.name!r} (vocab {task.d_vocab}, outputs {task.d_vocab_out}) does not fit this model "
                f"(vocab {run_or_model.cfg.d_vocab}, outputs {run_or_model.cfg.d_vocab_out})"
            )
        return Target(run_or_model.eval(), task, None)
    raise TypeError(f"expected a Run, a run folder, or a lab model, got {type(run_or_model).__name__}")


def encode_input(target_or_task, text_or_tokens, model=None) -> torch.Tensor:
    """A text or token ids -> (1, pos) int64 for a Target (its task and model) or a task; see `lab.models.prediction`."""
    if isinstance(target_or_task, Target):
        return encode_tokens(target_or_task.task, text_or_tokens, model if model is not None else target_or_task.model)
    return encode_tokens(target_or_task, text_or_tokens, model)


def predict(run_or_model, text_or_tokens, step: int | None = None, task=None) -> Prediction:
    """`lab.predict(run, "12 + 34 =")`: the answer the model gives, and how sure it is."""
    target = resolve_target(run_or_model, step, task)
    return predict_with(target.model, target.task, text_or_tokens)
