"""What every probe starts with: a model and its task from "a run or a model", and a prediction.

Every analysis call (`lab.attention`, `lab.ablate_heads`, `lab.key_frequencies`, ...) accepts a
`Run`, a run folder path or name, or a bare `Transformer` with `task=` given, and resolves it
here into a `Target`: the model at one checkpoint, in eval mode, with the task that reads it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


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
    from lab.model import Transformer
    from lab.run import Run, load_run

    if isinstance(run_or_model, (str, os.PathLike)):
        run_or_model = load_run(run_or_model)
    if isinstance(run_or_model, Run):
        run = run_or_model
        if task is not None and task is not run.task:
            raise ValueError("task= is only for a bare model; a run brings its own task")
        step = run.resolve_step(step)
        return Target(run.model(step), run.task, step, run.config.train.loss, run)
    if isinstance(run_or_model, Transformer):
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
    raise TypeError(f"expected a Run, a run folder, or a lab Transformer, got {type(run_or_model).__name__}")


def encode_input(target_or_task, text_or_tokens, model=None) -> torch.Tensor:
    """A text (encoded by the task) or a sequence of token ids -> (1, pos) int64, checked against vocab and length."""
    task = target_or_task.task if isinstance(target_or_task, Target) else target_or_task
    model = model if model is not None else getattr(target_or_task, "model", None)
    if isinstance(text_or_tokens, str):
        ids = task.encode(text_or_tokens)  # raises ValueError with the task's one-line message
    else:
        ids = [int(t) for t in (text_or_tokens.flatten().tolist() if isinstance(text_or_tokens, torch.Tensor) else text_or_tokens)]
        if not ids:
            raise ValueError("no tokens given")
        bad = [t for t in ids if not 0 <= t < task.d_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range: this task's token ids are 0..{task.d_vocab - 1}")
    if model is not None and model.W_pos is not None and len(ids) > model.cfg.n_ctx:
        raise ValueError(f"input of {len(ids)} tokens is longer than this model's n_ctx of {model.cfg.n_ctx}")
    return torch.tensor([ids], dtype=torch.long)


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one input: `label` (its name), `label_id`, `probability`, and all `probabilities`."""

    label: str
    label_id: int
    probability: float
    probabilities: torch.Tensor  # (d_vocab_out,)


def prediction_from_logits(task, logits: torch.Tensor) -> Prediction:
    """logits (d_vocab_out,) at the read position -> Prediction."""
    probs = logits.double().softmax(-1).float()
    label_id = int(probs.argmax())
    return Prediction(task.label_names[label_id], label_id, float(probs[label_id]), probs)


@torch.no_grad()
def predict(run_or_model, text_or_tokens, step: int | None = None, task=None) -> Prediction:
    """`lab.predict(run, "12 + 34 =")`: the answer the model gives, and how sure it is."""
    target = resolve_target(run_or_model, step, task)
    tokens = encode_input(target, text_or_tokens).to(target.model.device)
    logits = target.model(tokens)[0, target.task.read_position].cpu()
    return prediction_from_logits(target.task, logits)


def batches(tokens: torch.Tensor, n_heads: int, budget: int = 1 << 24):
    """Split (batch, pos) into chunks whose attention patterns hold at most `budget` floats."""
    n_pos = tokens.shape[1]
    size = max(1, budget // max(1, n_heads * n_pos * n_pos))
    for start in range(0, tokens.shape[0], size):
        yield start, tokens[start : start + size]
