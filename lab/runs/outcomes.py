"""When a run memorised and when it grokked, read from its metrics rows: the one definition.

A run has *memorised* at the first evaluated step whose train accuracy reaches MEMORIZE_ACC, and
has *grokked* at the first evaluated step whose test accuracy reaches GROK_ACC. The trainer's
summary, `stop_after_grok`, the bench and sweeps all ask here, so they agree on the step.
"""

from __future__ import annotations

from typing import Iterable

MEMORIZE_ACC = 0.99
GROK_ACC = 0.99


def first_step_reaching(rows: Iterable[dict], key: str, threshold: float) -> int | None:
    """The step of the first row (in order) with `row[key] >= threshold`, or None."""
    return next((row["step"] for row in rows if row[key] >= threshold), None)


def memorize_step(rows: Iterable[dict]) -> int | None:
    """First evaluated step with train accuracy >= MEMORIZE_ACC, or None."""
    return first_step_reaching(rows, "train_acc", MEMORIZE_ACC)


def grok_step(rows: Iterable[dict]) -> int | None:
    """First evaluated step with test accuracy >= GROK_ACC, or None."""
    return first_step_reaching(rows, "test_acc", GROK_ACC)


def reached_text(event: str, step: int | None, ran: int | None) -> str:
    """How an outcome reads: "grokked at 350", or "grokked: not within 600 steps" when the run has not
    reached it in the steps it ran (censored: a lower bound, never a step and never "None")."""
    if step is not None:
        return f"{event} at {step}"
    return f"{event}: not within {ran} steps" if ran is not None else f"{event}: not yet"
