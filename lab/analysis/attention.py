"""Attention patterns: every head over one encoded text (with a next-token run's likeliest next tokens at
every position), and the `=`-to-`a` attention over the modular grid."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from lab.models.architectures import require_attention
from lab.models.prediction import prediction_from_logits
from lab.analysis.ablation import private_target  # run_with_cache hooks stay on a private copy of the model
from lab.analysis.probe import Target, encode_input


TOP_K = 5  # next tokens listed per position for a next-token run
UNKNOWN = "<unk>"  # the token a task's vocabulary reads unknown words as (the text task's)


@dataclass(frozen=True)
class AttentionResult:
    """`pattern` (layer, head, query, key) on CPU, 0 where a query may not look (as TransformerLens's
    `hook_pattern`); `mask` (query, key) bool, True there (a causal model's later keys), None for a
    bidirectional model; `tokens`: one display label per position; `token_ids`; the model's
    `prediction` (label name) and its `probability` at the read position (a next-token run: the next
    word after the last); the checkpoint `step`. Next-token runs also give `top_next`: at every position
    the TOP_K likeliest next tokens as (display label, probability), likeliest first;
    `typed_next_probability`: at every position but the last, the probability the model gave the token
    that follows it in the text; and `unknown`: the words of the text that the vocabulary lacks, each
    read as `<unk>`."""

    pattern: torch.Tensor
    tokens: list[str]
    token_ids: list[int]
    prediction: str
    probability: float
    step: int | None
    mask: torch.Tensor | None = None
    top_next: list[list[tuple[str, float]]] = field(default_factory=list)
    typed_next_probability: list[float] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)

    def __repr__(self) -> str:  # readable in a REPL and a notebook: the pattern's shape, not its numbers
        layers, heads = self.pattern.shape[:2]
        return (f"AttentionResult({' '.join(self.tokens)!r} -> {self.prediction!r} ({self.probability:.3f}); "
                f"pattern (layer, head, query, key) = ({layers}, {heads}, {len(self.tokens)}, {len(self.tokens)}); step {self.step})")

    @property
    def unknown_note(self) -> str:
        """One line naming the typed words the vocabulary lacks ("" when there are none)."""
        if not self.unknown:
            return ""
        words = ", ".join(repr(w) for w in dict.fromkeys(self.unknown))
        return f"Not in this run's vocabulary, so read as <unk>: {words}"

    def top_next_table(self):
        """`top_next` as a pandas DataFrame, one row per position: the token there, the token typed next and
        the probability the model gave it, then the TOP_K likeliest next tokens and their probabilities."""
        import pandas as pd

        rows = []
        for pos, top in enumerate(self.top_next):
            typed = self.tokens[pos + 1] if pos + 1 < len(self.tokens) else None
            row = {"position": pos, "token": self.tokens[pos], "typed next": typed,
                   "p(typed next)": self.typed_next_probability[pos] if typed is not None else None}
            for rank, (label, p) in enumerate(top, start=1):
                row[f"#{rank}"] = label
                row[f"p #{rank}"] = p
            rows.append(row)
        return pd.DataFrame(rows)


def _patterns(model, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (batch, pos, vocab) and patterns stacked as (batch, layer, head, query, key)."""
    logits, cache = model.run_with_cache(tokens.to(model.device), names_filter=lambda name: name.endswith("hook_pattern"))
    pattern = torch.stack([cache["pattern", layer] for layer in range(model.cfg.n_layers)], dim=1)
    return logits, pattern


@torch.no_grad()
def attention(model_or_run, text: str, step: int | None = None, task=None) -> AttentionResult:
    """The attention of every head over `text` (e.g. `"a cab"` for a_and_b, `"12 + 34 ="` for modular,
    `"To be, or not to be"` for a text run), with the causal mask, and for a next-token run the model's
    TOP_K next tokens at every position and the typed words it does not know.

    Pass a Run (its task is used) or a bare model with `task=`. Bad text raises ValueError with the
    task's message (character not in the alphabet, text too long, number out of range).
    """
    target = private_target(model_or_run, step, task)
    require_attention(target.model, "lab.attention")
    tokens = encode_input(target, text)
    logits, pattern = _patterns(target.model, tokens)
    logits = logits[0].cpu()  # (pos, d_vocab_out)
    task = target.task
    next_token_run = task.read_position is None
    prediction = prediction_from_logits(task, logits[-1 if next_token_run else task.read_position])
    ids = tokens[0].tolist()
    n_pos = len(ids)
    top_next, typed_next = [], []
    if next_token_run:
        probs = logits.double().softmax(-1)  # (pos, d_vocab_out), float64 as Prediction's
        values, indices = probs.topk(min(TOP_K, probs.shape[-1]), dim=-1)  # (pos, k)
        # outputs are input tokens here, so they get the tokens' display labels (a line break reads "↵")
        top_next = [list(zip(task.token_labels(row_i), row_p)) for row_i, row_p in zip(indices.tolist(), values.tolist())]
        typed_next = probs[torch.arange(n_pos - 1), tokens[0, 1:]].tolist()
        prediction = dataclasses.replace(prediction, label=top_next[-1][0][0])
    return AttentionResult(
        pattern=pattern[0].float().cpu(),
        tokens=task.token_labels(ids),
        token_ids=ids,
        prediction=prediction.label,
        probability=prediction.probability,
        step=target.step,
        mask=torch.ones(n_pos, n_pos, dtype=torch.bool).triu(1) if target.model.cfg.causal else None,  # (query, key)
        top_next=top_next,
        typed_next_probability=typed_next,
        unknown=unknown_words(task, text) if next_token_run else [],
    )


def unknown_words(task, text: str) -> list[str]:
    """The words of `text` that `task` reads as `<unk>`, in order, repeats kept; [] for a task without `<unk>`.

    Only the task's own `encode` decides: each whitespace-separated chunk ("Rosencrantz!") is encoded alone,
    and in one holding `<unk>` the known tokens on either side are cut off by their lengths (the text task's
    tokens spell the chunk exactly, word and punctuation), leaving the unknown word ("Rosencrantz")."""
    if UNKNOWN not in task.vocab:
        return []
    unk = task.vocab.index(UNKNOWN)
    found = []
    for chunk in text.split():
        ids = task.encode(chunk)
        if unk not in ids:
            continue
        first, last = ids.index(unk), len(ids) - 1 - ids[::-1].index(unk)
        start = sum(len(task.vocab[i]) for i in ids[:first])
        end = len(chunk) - sum(len(task.vocab[i]) for i in ids[last + 1:])
        found.append(chunk[start:end])
    return found


def _modular_target(run_or_model, step, task) -> Target:
    target = private_target(run_or_model, step, task)
    if target.task.name != "modular":
        raise ValueError(f"this analysis is for modular runs; this one is task {target.task.name!r}")
    return target


@torch.no_grad()
def modular_attention_grid(run_or_model, step: int | None = None, task=None) -> torch.Tensor:
    """(layer, head, p, p): attention from the `=` position to the `a` position for every (a, b);
    rows a, columns b. Pairs the task excludes (b = 0 for division) are NaN."""
    target = _modular_target(run_or_model, step, task)
    require_attention(target.model, "the attention grid")
    p = target.task.p
    pairs = target.task.all_pairs()
    _, pattern = _patterns(target.model, pairs.tokens)  # (pair, layer, head, query, key)
    values = pattern[:, :, :, -1, 0].float().cpu()  # (pair, layer, head)
    grid = torch.full((p * p, *values.shape[1:]), float("nan"))
    grid[pairs.tokens[:, 0] * p + pairs.tokens[:, 1]] = values
    return grid.reshape(p, p, *values.shape[1:]).permute(2, 3, 0, 1).contiguous()
