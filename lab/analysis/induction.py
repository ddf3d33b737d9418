"""Watching induction heads form (Olsson et al. 2022, "In-context learning and induction heads"), at every
checkpoint of a next-token run (a task with `read_position` None), cached per checkpoint in the run folder.

    history = lab.induction_history(run)     # .measures, .heads, .by_position; .loss_drop_step, .formation_step
    lab.plot_induction(run)                  # the Induction page's figure: these against the training loss

At each checkpoint:

- **Loss by token position** on the task's test split (its first MAX_TEST_SEQUENCES sequences): the mean
  next-token loss of the prediction made at each position, over the sequences whose label there is not
  IGNORE_INDEX. For a task with a `repeated_mask(split) -> (batch, pos) bool` (repeated tokens), also the
  loss on the repeated segment (`repeated_loss`: positions the mask marks) and elsewhere (`other_loss`).
- **The in-context-learning score** (Olsson et al.: the loss at token 500 minus the average loss at token 50
  of 512-token contexts), scaled to the run's context: with n positions, the loss of the prediction made at
  0-based position `round(n*500/512) - 1` minus that at `round(n*50/512) - 1` (for n = 512: after 500 and
  after 50 tokens of context; `icl_positions(n)`), each averaged over the test sequences. Negative: later
  tokens are predicted better, i.e. the model uses its context.
- **Per-head scores** by TransformerLens's `head_detector` definitions (`detect_head`, error_measure "mul",
  no exclusions: the share of a head's attention that falls on the detection pattern, summed over query
  and key positions, divided by the head's total attention, averaged over sequences), for the
  previous-token, duplicate-token and induction patterns, built with TransformerLens's own
  `get_*_detection_pattern` and scored with its `compute_head_attention_similarity_score`.
- **Induction loss** on the same diagnostic batch: TransformerLens's `evals.induction_loss` (the mean
  next-token loss of the predictions made at the second repeat's second token and after: per-token losses
  `[:, half + 1:]`).

The diagnostic batch (`diagnostic_batch`) is TransformerLens's: DIAGNOSTIC_SEQUENCES sequences of `half`
uniformly random tokens (every token id but the task's padding and BOS) repeated twice, with the task's BOS
token (if it has one, as repeated_tokens' `<bos>`) over position 0 as `induction_loss` prepends it; drawn from a
generator seeded with DIAGNOSTIC_SEED, so every checkpoint (and every run of one task) reads the same batch.
`half = (n_ctx - 1) // 2`, because `detect_head` accepts only sequences shorter than n_ctx.

Two steps summarise the history (both None when the event never happens; see `loss_drop_step` and
`formation_step`): where the repeated-segment loss (the diagnostic induction loss for tasks without a
repeated segment) first falls below half of its running maximum, and where the best head's induction score
first reaches half of what a perfect induction head scores on the diagnostic batch.

Entries live in the run folder's per-checkpoint analysis cache (`RUN/analysis/heads/step_*.json`, shared
with the Heads and Circuits pages: keyed on the checkpoint file's size and modification time, written
atomically) under the versioned key CACHE_KEY; `lab analyze RUN` fills it for every checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from lab.analysis.ablation import _run_of, cached, is_cached
from lab.tasks.base import IGNORE_INDEX

if TYPE_CHECKING:
    import pandas as pd

CACHE_KEY = "induction/v1"  # bump the version when an entry's content or the diagnostic batch changes
HEAD_KINDS = ("previous_token", "duplicate_token", "induction")  # TransformerLens's "<kind>_head" patterns
DIAGNOSTIC_SEQUENCES = 16
DIAGNOSTIC_SEED = 0
MAX_TEST_SEQUENCES = 1024  # loss by position reads the test split's first sequences: enough for a smooth curve
ICL_TOKENS = (50, 500, 512)  # Olsson et al.: loss at token 500 minus loss at token 50, in 512-token contexts
DROP_FRACTION = 0.5  # the loss drop: below this fraction of the running maximum
FORMED_FRACTION = 0.5  # a head has formed: this fraction of a perfect induction head's score


def is_next_token(task) -> bool:
    """True for a task with a target at every position (a language model): the runs these measures are for."""
    return getattr(task, "read_position", 0) is None


def require_next_token(run_or_task, what: str) -> None:
    """Raise a one-line ValueError unless the run (or task) predicts the next token at every position."""
    task = getattr(run_or_task, "task", run_or_task)
    if not is_next_token(task):
        name = getattr(run_or_task, "name", None)
        raise ValueError(f"{what} is for next-token runs (a target at every position: tasks such as "
                         f"'repeated_tokens', 'text', 'reverse'); {name + ' is' if name else 'this is'} task "
                         f"{task.name!r}, a classifier read at position {task.read_position}")


# --- the diagnostic batch and the head scores ---------------------------------------------------------


def diagnostic_batch(d_vocab: int, n_ctx: int, *, bos_token_id: int | None = None, exclude=(),
                     n_sequences: int = DIAGNOSTIC_SEQUENCES, seed: int = DIAGNOSTIC_SEED) -> torch.Tensor:
    """(n_sequences, 2 * half) int64, as TransformerLens's `induction_loss` builds its batch: `half = (n_ctx - 1)
    // 2` uniformly random token ids (any but `exclude` and the BOS token) written twice, then position 0
    overwritten by `bos_token_id` when the task has one (TransformerLens's `prepend_bos`)."""
    half = (n_ctx - 1) // 2
    allowed = torch.tensor([t for t in range(d_vocab) if t not in set(exclude) and t != bos_token_id], dtype=torch.long)
    if half < 3 or len(allowed) < 2:
        raise ValueError(f"the induction diagnostic needs a context of at least 7 positions and 2 ordinary tokens; "
                         f"this model has n_ctx {n_ctx} and {len(allowed)} ordinary tokens")
    generator = torch.Generator().manual_seed(seed)
    first = allowed[torch.randint(len(allowed), (n_sequences, half), generator=generator)]  # (batch, half)
    tokens = torch.cat([first, first], dim=1)  # (batch, 2 * half): "b p -> b (2 p)"
    if bos_token_id is not None:
        tokens[:, 0] = bos_token_id
    return tokens


def task_diagnostic_batch(task, n_ctx: int | None = None) -> torch.Tensor:
    """The diagnostic batch of a task's vocabulary and context: its padding left out, its BOS token (a task's
    `bos_token_id`, e.g. repeated_tokens' `<bos>`) at position 0, as the model saw in training."""
    return diagnostic_batch(task.d_vocab, n_ctx or task.n_ctx, bos_token_id=getattr(task, "bos_token_id", None),
                            exclude=[t for t in (task.pad_token_id,) if t is not None])


def _default_batch(model, task) -> torch.Tensor:
    cfg = model.cfg
    if task is not None:
        return task_diagnostic_batch(task, cfg.n_ctx)
    return diagnostic_batch(cfg.d_vocab, cfg.n_ctx, exclude=[t for t in (cfg.pad_token_id,) if t is not None])


def detection_patterns(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """kind -> (batch, query, key) 0/1 patterns of one batch, by TransformerLens's `get_<kind>_head_detection_pattern`."""
    from transformer_lens import head_detector

    builders = {"previous_token": head_detector.get_previous_token_head_detection_pattern,
                "duplicate_token": head_detector.get_duplicate_token_head_detection_pattern,
                "induction": head_detector.get_induction_head_detection_pattern}
    return {kind: torch.stack([build(sequence[None].cpu()) for sequence in tokens]) for kind, build in builders.items()}


def scores_from_patterns(pattern: torch.Tensor, detection: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kind -> (layer, head) scores: for each sequence TransformerLens's `compute_head_attention_similarity_score`
    (mul, no exclusions) of each head's (query, key) pattern, then the mean over sequences, as `detect_head`
    averages over a list of prompts. `pattern`: (batch, layer, head, query, key)."""
    from transformer_lens.head_detector import compute_head_attention_similarity_score

    batch, n_layers, n_heads = pattern.shape[:3]
    pattern = pattern.detach().float().cpu()
    scores = {}
    for kind, patterns in detection.items():
        per_sequence = torch.tensor([[[compute_head_attention_similarity_score(
            pattern[b, layer, head], detection_pattern=patterns[b], exclude_bos=False,
            exclude_current_token=False, error_measure="mul") for head in range(n_heads)]
            for layer in range(n_layers)] for b in range(batch)], dtype=torch.float64)  # (batch, layer, head)
        scores[kind] = per_sequence.mean(0)
    return scores


def perfect_induction_score(tokens: torch.Tensor) -> float:
    """What a perfect induction head scores on `tokens`: all of its attention on the induction pattern wherever
    the pattern has a key (rows without one attend elsewhere), i.e. the mean share of query rows that have one."""
    induction = detection_patterns(tokens)["induction"]  # (batch, query, key)
    return float((induction.sum(-1) > 0).double().mean())


def _patterns_and_logits(model, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (batch, pos, vocab) and attention patterns (batch, layer, head, query, key) of one forward pass.
    The hooks go on a private copy: a model shared with another thread must not see them."""
    import copy

    from lab.analysis.attention import _patterns

    return _patterns(copy.deepcopy(model), tokens)


def next_token_losses(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(batch, pos - 1) loss of the prediction made at each position of the next token of `tokens` (as
    TransformerLens's `lm_cross_entropy_loss(per_token=True)`)."""
    logits = logits[:, :-1].double()  # (batch, pos - 1, vocab)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1).to(logits.device),
                           reduction="none").reshape(tokens.shape[0], -1)


@torch.no_grad()
def head_detector_scores(model, tokens: torch.Tensor | None = None, task=None) -> "pd.DataFrame":
    """One row per head: layer, head, component ("L0H1"), previous_token, duplicate_token, induction: the
    TransformerLens `detect_head` scores (see the module docstring) of a lab transformer on `tokens`
    (batch, pos), by default the diagnostic batch of the model's vocabulary and context (`task_diagnostic_batch`
    with `task`: its BOS token at position 0, its padding never drawn; without, the config's padding never drawn)."""
    import pandas as pd

    from lab.models.architectures import require_attention

    require_attention(model, "head_detector_scores")
    cfg = model.cfg
    if tokens is None:
        tokens = _default_batch(model, task)
    _, pattern = _patterns_and_logits(model, tokens)
    scores = scores_from_patterns(pattern, detection_patterns(tokens))
    return pd.DataFrame([{"layer": layer, "head": head, "component": f"L{layer}H{head}",
                          **{kind: float(scores[kind][layer, head]) for kind in HEAD_KINDS}}
                         for layer in range(cfg.n_layers) for head in range(cfg.n_heads)])


@torch.no_grad()
def induction_loss(model, tokens: torch.Tensor | None = None, task=None) -> float:
    """TransformerLens's `evals.induction_loss` of a lab model on `tokens` (a batch of `half` tokens repeated
    twice; default the diagnostic batch): the mean of the per-token next-token losses `[:, half + 1:]`, i.e. of
    the predictions made at the second repeat's second token and after."""
    if tokens is None:
        tokens = _default_batch(model, task)
    half = tokens.shape[1] // 2
    logits = model.forward_at(tokens.to(_model_device(model)), None)
    return float(next_token_losses(logits, tokens)[:, half + 1:].mean())


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


# --- one checkpoint ---------------------------------------------------------------------------------


def icl_positions(n_pos: int) -> tuple[int, int]:
    """(early, late) 0-based positions whose predictions the in-context-learning score compares: Olsson et al.'s
    tokens 50 and 500 of 512 scaled to `n_pos` positions, `round(n_pos * k / 512) - 1` (for 512: 49 and 499)."""
    early_token, late_token, context = ICL_TOKENS
    early = max(0, round(n_pos * early_token / context) - 1)
    late = min(n_pos - 1, round(n_pos * late_token / context) - 1)
    if late <= early:
        raise ValueError(f"the in-context-learning score needs at least 2 positions; this task has {n_pos}")
    return early, late


def _nan_to_none(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


@torch.no_grad()
def test_losses(model, task) -> dict:
    """Loss by position on the task's test split (its first MAX_TEST_SEQUENCES sequences), the mean loss, the
    repeated-segment and other losses (tasks with `repeated_mask`), and the in-context-learning score."""
    from lab.training.batching import batches

    split = task.split("test")
    tokens, labels = split.tokens[:MAX_TEST_SEQUENCES], split.labels[:MAX_TEST_SEQUENCES]
    n_heads = getattr(model.cfg, "n_heads", 1)
    losses = torch.zeros(labels.shape, dtype=torch.float64)  # (batch, pos); 0 where no loss is read
    for start, chunk in batches(tokens, n_heads):
        logits = model.forward_at(chunk.to(_model_device(model)), None).double().cpu()  # (chunk, pos, vocab)
        chunk_labels = labels[start : start + len(chunk)]
        losses[start : start + len(chunk)] = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), chunk_labels.reshape(-1), ignore_index=IGNORE_INDEX,
            reduction="none").reshape(chunk_labels.shape)
    read = labels != IGNORE_INDEX  # (batch, pos)
    by_position = losses.sum(0) / read.sum(0)  # (pos,): NaN where no sequence reads a loss
    entry = {"by_position": [_nan_to_none(v) for v in by_position.tolist()],
             "test_loss": _nan_to_none(float(losses.sum() / read.sum())),
             "repeated_loss": None, "other_loss": None}
    if hasattr(task, "repeated_mask"):
        repeated = task.repeated_mask("test")[:MAX_TEST_SEQUENCES] & read
        other = read & ~repeated
        entry["repeated_loss"] = _nan_to_none(float(losses[repeated].sum() / repeated.sum()))
        entry["other_loss"] = _nan_to_none(float(losses[other].sum() / other.sum()))
    early, late = icl_positions(labels.shape[1])
    entry["icl_score"] = _nan_to_none(float(by_position[late] - by_position[early]))
    return entry


@torch.no_grad()
def measures_at(model, task) -> dict:
    """Every measure of one model (see the module docstring), as plain data: test_losses' entries, plus
    "induction_loss", "diagnostic_by_position" (the diagnostic batch's loss at each position) and "heads"
    (kind -> [[score per head] per layer]; empty for a model without attention)."""
    from lab.models.architectures import arch_of

    entry = test_losses(model, task)
    tokens = task_diagnostic_batch(task, model.cfg.n_ctx)
    half = tokens.shape[1] // 2
    if arch_of(model) == "transformer":
        logits, pattern = _patterns_and_logits(model, tokens)
        scores = scores_from_patterns(pattern, detection_patterns(tokens))
        entry["heads"] = {kind: scores[kind].tolist() for kind in HEAD_KINDS}
    else:  # an LSTM, say: losses only
        logits = model.forward_at(tokens.to(_model_device(model)), None)
        entry["heads"] = {}
    per_token = next_token_losses(logits, tokens)  # (batch, 2 * half - 1)
    entry["induction_loss"] = float(per_token[:, half + 1:].mean())
    entry["diagnostic_by_position"] = per_token.mean(0).tolist()
    return entry


# --- every checkpoint of a run --------------------------------------------------------------------------


def loss_drop_step(steps, losses) -> int | None:
    """The first step whose loss is below DROP_FRACTION (half) of the highest loss at any step up to it (the
    plateau before the drop), or None. Steps with no value (None, NaN) are skipped."""
    highest = -math.inf
    for step, loss in zip(steps, losses):
        if loss is None or not math.isfinite(loss):
            continue
        if loss < DROP_FRACTION * highest:
            return int(step)
        highest = max(highest, loss)
    return None


def formation_step(steps, top_scores, perfect: float) -> int | None:
    """The first step at which the best head's induction score reaches FORMED_FRACTION (half) of `perfect`
    (what a perfect induction head scores on the diagnostic batch), or None."""
    for step, score in zip(steps, top_scores):
        if score is not None and score >= FORMED_FRACTION * perfect:
            return int(step)
    return None


@dataclass(frozen=True)
class InductionHistory:
    """The induction measures of a run at every checkpoint.

    `measures`: one row per checkpoint: step, test_loss, repeated_loss, other_loss (NaN for tasks without a
    repeated segment), induction_loss (the diagnostic batch), icl_score, and the best head's score of each kind
    (top_previous_token, top_duplicate_token, top_induction; NaN without attention).
    `heads`: one row per (checkpoint, head, kind): step, layer, head, component, kind, score.
    `by_position`: one row per (checkpoint, source, position): step, source ("test" or "diagnostic"), position, loss.
    `loss_drop_step` (of `drop_series`: "repeated_loss" or "induction_loss") and `formation_step`: see
    the module docstring; `perfect_induction`: a perfect induction head's score on the diagnostic batch;
    `icl_positions`: the (early, late) positions of the in-context-learning score."""

    run_name: str
    measures: "pd.DataFrame"
    heads: "pd.DataFrame"
    by_position: "pd.DataFrame"
    loss_drop_step: int | None
    drop_series: str
    formation_step: int | None
    perfect_induction: float
    icl_positions: tuple[int, int]
    diagnostic: str = field(default="")

    def __repr__(self) -> str:
        return (f"InductionHistory({self.run_name!r}: {len(self.measures)} checkpoints; {self.drop_series} drop at "
                f"step {self.loss_drop_step}; induction head formed at step {self.formation_step})")

    def summary(self) -> str:
        """One line: the two steps, and the best induction score at the first and last checkpoints."""
        top, steps = self.measures["top_induction"], self.measures["step"]
        drop = self.drop_series.replace("_", " ")
        drop = (f"{drop} drops below half its plateau at step {self.loss_drop_step}" if self.loss_drop_step is not None
                else f"{drop} never drops below half its plateau")
        formed = (f"an induction head forms at step {self.formation_step}" if self.formation_step is not None
                  else "no induction head forms" if top.notna().any() else "no attention heads")
        scores = (f"; best induction score {top.iloc[0]:.3f} at step {steps.iloc[0]}, {top.iloc[-1]:.3f} at step "
                  f"{steps.iloc[-1]} (a perfect induction head: {self.perfect_induction:.3f})") if top.notna().any() else ""
        return f"{self.run_name}: {len(self.measures)} checkpoints; {drop}; {formed}{scores}"


def _entry(run, step: int) -> dict:
    def compute():
        return {CACHE_KEY: measures_at(run.model(step, cache=False), run.task)}

    return cached(run, step, CACHE_KEY, compute)


def induction_history(run, progress: bool = False) -> InductionHistory:
    """The induction measures at every checkpoint of a next-token run (a Run, or its folder or name), computed
    once per checkpoint and then read from the run folder (see the module docstring)."""
    import pandas as pd
    from tqdm.auto import tqdm

    from lab.errors import RunError

    run = _run_of(run, None)
    if run is None:
        raise TypeError("induction_history needs a Run or a run folder")
    require_next_token(run, "induction_history")
    steps = run.checkpoint_steps
    if not steps:
        raise RunError(f"{run.path / 'checkpoints'}: the run has no checkpoint yet")
    todo = not all(is_cached(run, step, CACHE_KEY) for step in steps)
    # no bar when everything comes from the cache: an empty bar says nothing
    entries = {step: _entry(run, step) for step in tqdm(steps, disable=not (progress and todo), unit="checkpoint",
                                                        desc=f"induction measures of {run.name}")}

    rows, heads, positions = [], [], []
    for step, entry in entries.items():
        row = {"step": step, **{key: entry.get(key) for key in
                                ("test_loss", "repeated_loss", "other_loss", "induction_loss", "icl_score")}}
        for kind in HEAD_KINDS:
            grid = entry["heads"].get(kind)
            row[f"top_{kind}"] = max(max(layer) for layer in grid) if grid else None
            for layer, scores in enumerate(grid or []):
                heads += [{"step": step, "layer": layer, "head": head, "component": f"L{layer}H{head}", "kind": kind,
                           "score": score} for head, score in enumerate(scores)]
        rows.append(row)
        for source, losses in (("test", entry["by_position"]), ("diagnostic", entry["diagnostic_by_position"])):
            positions += [{"step": step, "source": source, "position": pos, "loss": loss} for pos, loss in enumerate(losses)]
    measures = pd.DataFrame(rows)
    measures = measures.astype({column: float for column in measures.columns if column != "step"})  # None -> NaN
    tokens = task_diagnostic_batch(run.task, run.config.model.n_ctx)
    perfect = perfect_induction_score(tokens)
    drop_series = "repeated_loss" if measures["repeated_loss"].notna().any() else "induction_loss"
    n_pos = run.task.split("test").labels.shape[1]
    return InductionHistory(
        run_name=run.name, measures=measures,
        heads=pd.DataFrame(heads, columns=["step", "layer", "head", "component", "kind", "score"]),
        by_position=pd.DataFrame(positions, columns=["step", "source", "position", "loss"]),
        loss_drop_step=loss_drop_step(measures["step"], measures[drop_series]), drop_series=drop_series,
        formation_step=formation_step(measures["step"], measures["top_induction"], perfect),
        perfect_induction=perfect, icl_positions=icl_positions(n_pos),
        diagnostic=f"{tokens.shape[0]} sequences of {tokens.shape[1] // 2} random tokens repeated twice (seed {DIAGNOSTIC_SEED})",
    )
