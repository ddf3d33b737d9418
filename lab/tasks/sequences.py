"""Two next-token tasks on random sequences: "reverse" (Hilton's check of the attention mask) and
"repeated_tokens" (the induction-head diagnostic of Olsson et al. 2022).

Both are language models: a target at every position (`read_position = None`), the next token of the
sequence, under causal attention. A sequence `s` is stored as `tokens = s[:-1]`, `labels = s[1:]`, so the
label at position i is the token the model must predict after reading positions 0..i. Texts are token
names separated by spaces, e.g. "3 1 4 | 4 1" (reverse) or "<bos> 7 2 9 7" (repeated tokens).

reverse (Jacob Hilton's deep learning curriculum, chapter 1): `s = x1..xL | xL..x1`, with x drawn
uniformly from `n_symbols` symbols. The targets x2..xL are random (no model beats chance, 1/n_symbols,
on them), the separator's position is fixed, and every target of the second half is a copy of a token
already read: "the model should be able to predict the second sequence, but not the first". A model
whose attention can look ahead (no causal mask) also "predicts" the first half, by reading the answer:
the mask check. `target_halves()` names which label positions are which.

repeated_tokens (Olsson et al. 2022): `<bos>` then uniformly random tokens in which one random segment
(of `min_segment`..`max_segment` tokens) is written again later. Only an induction mechanism (find the
earlier copy of the current token, predict what followed it) predicts the second copy; everything else is
random. `repeated_mask(split)` marks those targets. `induction_diagnostic()` builds TransformerLens's
`evals.induction_loss` batch (a random half repeated once, `<bos>` at position 0) in this vocabulary.
"""

from __future__ import annotations

import math
import random
from typing import Literal

import torch
from pydantic import Field, model_validator

from lab.tasks.base import IGNORE_INDEX, Split, SplitName, Task, TaskConfig, register_task

MAX_SEQUENCES = 1_000_000  # per split: a typo such as n_train = 1e9 is one line, not a MemoryError


class SymbolTask(Task):
    """A next-token task whose tokens are short names written with spaces between them (a shared base)."""

    causal = True
    read_position = None

    def _finish_vocab(self) -> None:
        self.label_names = list(self.vocab)
        self._ids = {name: i for i, name in enumerate(self.vocab)}

    def encode(self, text: str) -> list[int]:
        """"3 1 4 | 4" -> the ids of those token names, at most n_ctx of them."""
        if not isinstance(text, str):
            raise TypeError(f"expected a text of token names separated by spaces, got {type(text).__name__} {text!r:.40}")
        if len(text) > 16 * self.n_ctx:  # checked first: a huge text is refused without being read
            raise ValueError(f"text of {len(text)} characters is longer than {self.n_ctx} tokens can be")
        names = text.split()
        if not 1 <= len(names) <= self.n_ctx:
            raise ValueError(f"{len(names)} tokens in {text!r:.60}; this task reads 1 to {self.n_ctx} tokens")
        for name in names:
            if name not in self._ids:
                shown = self.vocab if len(self.vocab) <= 12 else self.vocab[:11] + ["...", self.vocab[-1]]
                raise ValueError(f"token {name!r} is not in this task's vocabulary ({' '.join(shown)})")
        return [self._ids[name] for name in names]

    def decode(self, tokens) -> str:
        return " ".join(self.vocab[int(t)] for t in tokens)

    def _split_of_sequences(self, sequences: torch.Tensor) -> Split:
        return Split(tokens=sequences[:, :-1].contiguous(), labels=sequences[:, 1:].contiguous())  # (batch, n_ctx) each


def _unique_sequences(draw, n: int, exclude: set[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """n sequences from `draw()`, none twice and none in `exclude` (the config validators make sure the space is
    large enough)."""
    seen = set(exclude)
    sequences = []
    while len(sequences) < n:
        sequence = draw()
        if sequence not in seen:
            seen.add(sequence)
            sequences.append(sequence)
    return sequences


# --- reverse ----------------------------------------------------------------------------------


class ReverseConfig(TaskConfig):
    name: Literal["reverse"] = "reverse"
    seq_len: int = Field(8, ge=2, le=512, description="L: tokens before the separator (then the same L reversed)")
    n_symbols: int = Field(16, ge=2, le=10_000, description="the alphabet the tokens are drawn from")
    n_train: int = Field(10_000, ge=1, le=MAX_SEQUENCES)
    n_test: int = Field(1_000, ge=1, le=MAX_SEQUENCES)

    @model_validator(mode="after")
    def _enough_distinct_sequences(self) -> "ReverseConfig":
        # Train and test hold distinct sequences; drawing them by rejection needs room to spare.
        if self.n_symbols ** min(self.seq_len, 64) < 2 * (self.n_train + self.n_test):
            raise ValueError(f"n_symbols = {self.n_symbols} and seq_len = {self.seq_len} give {self.n_symbols ** self.seq_len} "
                             f"distinct sequences, too few for n_train + n_test = {self.n_train + self.n_test} distinct ones "
                             "(need twice that); raise n_symbols or seq_len, or lower n_train / n_test")
        return self


@register_task
class ReverseTask(SymbolTask):
    """`x1..xL | xL..x1`: the second half predictable, the first half not (see the module docstring)."""

    name = "reverse"
    Config = ReverseConfig
    SEPARATOR = "|"

    def __init__(self, config: ReverseConfig):
        super().__init__(config)
        self.seq_len = config.seq_len
        self.vocab = [str(n) for n in range(config.n_symbols)] + [self.SEPARATOR]
        self.separator_id = config.n_symbols
        self.n_ctx = 2 * config.seq_len  # the full sequence has 2L + 1 tokens; the last one is only a target
        self._finish_vocab()

    def target_halves(self) -> dict[str, list[int]]:
        """Label positions by what they predict: "first" (x2..xL, random: chance is 1/n_symbols), "separator"
        (the `|` after xL) and "second" (xL..x1, each a copy of a token already read)."""
        L = self.seq_len
        return {"first": list(range(L - 1)), "separator": [L - 1], "second": list(range(L, 2 * L))}

    def baselines(self) -> dict[str, float]:
        """The best a model that cannot see ahead can do: chance on the L - 1 random targets (accuracy 1/n_symbols,
        loss ln n_symbols), certainty on the separator and the L reversed ones, averaged over the 2L targets as
        test_loss and test_acc are. A model above these reads the answer (a broken mask) or memorised test data."""
        L, n = self.seq_len, self.config.n_symbols
        return {"optimal_test_loss": (L - 1) * math.log(n) / (2 * L), "optimal_test_acc": (L + 1 + (L - 1) / n) / (2 * L)}

    def label(self, tokens) -> int:
        """The next token after a prefix of `x1..xL | xL..x1`, where it is determined: the separator after L
        tokens, then the mirror image of the first half. A prefix inside the first half has no answer (the
        next token is random): ValueError."""
        tokens = [int(t) for t in tokens]
        n, L = len(tokens), self.seq_len
        if n < L:
            raise ValueError(f"after {n} of the first {L} tokens the next one is random: only the separator (after {L}) "
                             "and the reversed half have an answer")
        if n == L:
            return self.separator_id
        if n > 2 * L:
            raise ValueError(f"{n} tokens is past the end of a sequence of 2 x {L} + 1")
        return tokens[2 * L - n]

    def patching_pair(self) -> tuple[str, str]:
        """Activation patching's default: the same sequence read up to its last answer, with its first token
        changed (the answer is that first token), e.g. "0 1 2 3 | 3 2 1" (answer 0) against "1 1 2 3 | 3 2 1"."""
        L, n = self.seq_len, len(self.vocab) - 1
        first = [k % n for k in range(L)]
        clean = first + [self.separator_id] + first[::-1][:-1]  # (2L) tokens; the answer is first[0]
        corrupted = [(first[0] + 1) % n] + clean[1:]
        return self.decode(clean), self.decode(corrupted)

    def _make_splits(self) -> tuple[Split, Split]:
        cfg = self.config
        rng = random.Random(cfg.data_seed)

        def draw() -> tuple[int, ...]:
            return tuple(rng.randrange(cfg.n_symbols) for _ in range(cfg.seq_len))

        train = _unique_sequences(draw, cfg.n_train, exclude=set())
        test = _unique_sequences(draw, cfg.n_test, exclude=set(train))
        return self._split_of_sequences(self._sequences(train)), self._split_of_sequences(self._sequences(test))

    def _sequences(self, firsts: list[tuple[int, ...]]) -> torch.Tensor:
        first = torch.tensor(firsts, dtype=torch.long)  # (batch, L)
        separator = torch.full((len(firsts), 1), self.separator_id, dtype=torch.long)
        return torch.cat([first, separator, first.flip(1)], dim=1)  # (batch, 2L + 1)


# --- repeated tokens (induction) --------------------------------------------------------------


class RepeatedTokensConfig(TaskConfig):
    name: Literal["repeated_tokens"] = "repeated_tokens"
    n_symbols: int = Field(64, ge=2, le=100_000, description="random tokens (the vocabulary is these and <bos>)")
    n_ctx: int = Field(64, ge=4, le=4096, description="positions the model reads (sequences are n_ctx + 1 tokens)")
    min_segment: int = Field(4, ge=2, description="shortest repeated segment")
    max_segment: int = Field(16, ge=2, description="longest repeated segment (two copies must fit after <bos>)")
    n_train: int = Field(20_000, ge=1, le=MAX_SEQUENCES)
    n_test: int = Field(1_000, ge=1, le=MAX_SEQUENCES)

    @model_validator(mode="after")
    def _segments_fit(self) -> "RepeatedTokensConfig":
        if self.min_segment > self.max_segment:
            raise ValueError(f"min_segment = {self.min_segment} is more than max_segment = {self.max_segment}")
        if 2 * self.max_segment > self.n_ctx:  # n_ctx + 1 tokens, one of them <bos>: two copies need 2 x max_segment
            raise ValueError(f"two copies of max_segment = {self.max_segment} tokens do not fit in n_ctx = {self.n_ctx} "
                             f"after <bos>; use max_segment <= {self.n_ctx // 2}")
        return self


@register_task
class RepeatedTokensTask(SymbolTask):
    """`<bos>` and random tokens, one segment of which appears twice (see the module docstring)."""

    name = "repeated_tokens"
    Config = RepeatedTokensConfig
    BOS = "<bos>"
    bos_token_id = 0

    def __init__(self, config: RepeatedTokensConfig):
        super().__init__(config)
        self.vocab = [self.BOS] + [str(n) for n in range(1, config.n_symbols + 1)]  # token id n is named "n"
        self.n_ctx = config.n_ctx
        self._finish_vocab()

    def repeated_mask(self, name: SplitName) -> torch.Tensor:
        """(batch, n_ctx) bool: the targets an induction mechanism predicts, those inside the second copy of the
        repeated segment after its first token (its first token follows a random one, so nothing predicts it).
        "Loss on the repeated segment" is `per_token_loss[task.repeated_mask("test")].mean()`."""
        self.split(name)  # builds the splits (and their masks) once
        return self._masks[0] if name == "train" else self._masks[1]

    def label(self, tokens) -> int:
        """The induction answer: the token that followed the latest earlier occurrence of the last token (right
        inside a repeated segment; the rest of a sequence is random). ValueError if the last token is new."""
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ValueError("no tokens: the induction answer needs at least two")
        last = tokens[-1]
        for i in range(len(tokens) - 2, -1, -1):
            if tokens[i] == last:
                return tokens[i + 1]
        raise ValueError(f"token {self.vocab[last]!r} occurs once: the next token is random, and only a repeated token has "
                         "an induction answer")

    def patching_pair(self) -> tuple[str, str]:
        """Activation patching's default: "<bos> 1 2 3 4 5 1 2 3" (induction answer 4) against the same with the
        first copy's 4 changed to 6 (answer 6)."""
        n = self.config.n_symbols
        names = [self.vocab[1 + k % n] for k in range(6)]
        clean = [self.BOS, *names[:5], *names[:3]]
        corrupted = [self.BOS, *names[:3], names[5], names[4], *names[:3]]
        return " ".join(clean), " ".join(corrupted)

    def induction_diagnostic(self, n_batch: int = 64, subseq_len: int | None = None, seed: int | None = None) -> Split:
        """TransformerLens's `evals.induction_loss` batch in this vocabulary: `subseq_len` random tokens written
        twice, position 0 overwritten by `<bos>`, and the loss read where TransformerLens reads it (labels
        IGNORE_INDEX before the second copy's third token, `correct_log_probs[:, subseq_len + 1:]`), so the
        mean cross-entropy over this split's targets is TransformerLens's induction loss. `subseq_len`
        defaults to the longest that fits (n_ctx + 1) // 2; the tokens come from `seed` (default data_seed + 1)."""
        p = (self.n_ctx + 1) // 2 if subseq_len is None else subseq_len
        if not 2 <= p <= (self.n_ctx + 1) // 2:
            raise ValueError(f"subseq_len = {p}: two copies must fit in n_ctx + 1 = {self.n_ctx + 1} tokens; valid 2..{(self.n_ctx + 1) // 2}")
        generator = torch.Generator().manual_seed(self.config.data_seed + 1 if seed is None else seed)
        first = torch.randint(1, self.config.n_symbols + 1, (n_batch, p), generator=generator)
        sequences = torch.cat([first, first], dim=1)  # (batch, 2p): "b p -> b (2 p)"
        sequences[:, 0] = self.bos_token_id
        split = self._split_of_sequences(sequences)  # labels (batch, 2p - 1): label k is token k + 1
        split.labels[:, : p + 1] = IGNORE_INDEX
        return split

    def _make_splits(self) -> tuple[Split, Split]:
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.data_seed)
        (train, train_mask), (test, test_mask) = (self._repeated(n, generator) for n in (cfg.n_train, cfg.n_test))
        self._masks = (train_mask, test_mask)
        return train, test

    def _repeated(self, n: int, generator: torch.Generator) -> tuple[Split, torch.Tensor]:
        cfg = self.config
        length = cfg.n_ctx + 1
        sequences = torch.randint(1, cfg.n_symbols + 1, (n, length), generator=generator)  # (batch, n_ctx + 1)
        sequences[:, 0] = self.bos_token_id
        # Per sequence: segment length m, the first copy at a >= 1, the second at b >= a + m with b + m <= length.
        m = torch.randint(cfg.min_segment, cfg.max_segment + 1, (n,), generator=generator)
        room = length - 1 - 2 * m  # free tokens outside the two copies
        gaps = torch.rand(n, 3, generator=generator)
        gaps = (gaps / gaps.sum(1, keepdim=True) * room[:, None]).floor().long()  # before, between, after: a random split of the room
        a = 1 + gaps[:, 0]
        b = a + m + gaps[:, 1]
        positions = torch.arange(length)
        offset = positions[None, :] - b[:, None]  # (batch, length): index inside the second copy
        in_second = (offset >= 0) & (offset < m[:, None])
        source = (a[:, None] + offset).clamp(0, length - 1)
        sequences = torch.where(in_second, sequences.gather(1, source), sequences)
        split = self._split_of_sequences(sequences)
        # label j is token j + 1: predictable when j + 1 lies in the second copy after its first token
        predictable = in_second[:, 1:] & (offset[:, 1:] >= 1)  # (batch, n_ctx)
        return split, predictable
