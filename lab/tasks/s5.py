"""The symmetric group S5: `[a, b, =]` -> a group operation on permutations of five elements, the
non-commutative tasks of Power et al. 2022 (Figure 1 centre is the S5 product).

Each of the 120 permutations of 0..4 is one token, in the order of `itertools.permutations(range(5))`
(lexicographic, as in openai/grok), written in array form: "20143" is the permutation i -> "20143"[i],
so 0 -> 2, 1 -> 0, 2 -> 1, 3 -> 4, 4 -> 3. Token 120 is `=`. Every ordered pair (a, b) is one
equation: 120 x 120 = 14,400. The answer (one of 120 classes) is read at the last position, under
causal attention, and `train_frac` of the pairs, picked at random from `data_seed`, form the
training split, exactly as in `lab.tasks.modular`.

Conventions (openai/grok's, with permutations as functions i -> a[i]):
  s5       "a * b =" -> c = b[a], i.e. c[i] = b[a[i]]: apply a, then b (the composition b ∘ a)
  s5_conj  "a ^ b =" -> c = a[b[a⁻¹]], i.e. c = a ∘ b ∘ a⁻¹: b conjugated by a (a·b·a⁻¹)

Text is read strictly: exactly "PPPPP * QQQQQ =" (s5) or "PPPPP ^ QQQQQ =" (s5_conj), single spaces,
each of PPPPP and QQQQQ the five digits 0-4 in some order; anything else is one `ValueError` line
saying what is expected.
"""

from __future__ import annotations

import itertools
import re
from typing import Literal

import torch
from pydantic import Field

from lab.tasks.base import Split, Task, TaskConfig, random_split, register_task

N = 5
# token id -> the permutation as a tuple (0..4 in array form), lexicographic as openai/grok's
PERMUTATIONS: list[tuple[int, ...]] = list(itertools.permutations(range(N)))
PERMUTATION_INDEX: dict[tuple[int, ...], int] = {perm: i for i, perm in enumerate(PERMUTATIONS)}


def permutation_name(perm) -> str:
    """(2, 0, 1, 4, 3) -> "20143"."""
    return "".join(str(int(i)) for i in perm)


def compose(a, b) -> tuple[int, ...]:
    """The s5 product: c[i] = b[a[i]] (apply a, then b)."""
    return tuple(b[a[i]] for i in range(N))


def inverse(a) -> tuple[int, ...]:
    out = [0] * N
    for i, ai in enumerate(a):
        out[ai] = i
    return tuple(out)


def conjugate(a, b) -> tuple[int, ...]:
    """a·b·a⁻¹ as functions: c[i] = a[b[a⁻¹[i]]] (openai/grok's `a[b[a.argsort()]]`)."""
    a_inv = inverse(a)
    return tuple(a[b[a_inv[i]]] for i in range(N))


class S5Config(TaskConfig):
    name: Literal["s5"] = "s5"
    train_frac: float = Field(0.5, gt=0.0, lt=1.0, description="share of the 14,400 pairs trained on")


class S5ConjConfig(TaskConfig):
    name: Literal["s5_conj"] = "s5_conj"
    train_frac: float = Field(0.5, gt=0.0, lt=1.0, description="share of the 14,400 pairs trained on")


@register_task
class S5Task(Task):
    """The S5 product "a * b =" -> b[a] (apply a, then b)."""

    name = "s5"
    Config = S5Config
    causal = True
    n_ctx = 3
    read_position = -1
    symbol = "*"
    meaning = "c = b[a] (apply a, then b)"

    def __init__(self, config: S5Config):
        super().__init__(config)
        self.vocab = [permutation_name(perm) for perm in PERMUTATIONS] + ["="]
        self.label_names = [permutation_name(perm) for perm in PERMUTATIONS]
        self.equals_token_id = len(PERMUTATIONS)
        # (a, b) -> c as one 120 x 120 table of token ids, built once
        self.table = torch.tensor([[PERMUTATION_INDEX[self.operate(a, b)] for b in PERMUTATIONS] for a in PERMUTATIONS],
                                  dtype=torch.long)

    @staticmethod
    def operate(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
        return compose(a, b)

    # --- text <-> tokens ---

    _PERM = r"([0-9]{5})"

    def encode(self, text: str) -> list[int]:
        """`"20143 * 01234 ="` -> `[token of 20143, token of 01234, =]`; exactly that form, nothing looser."""
        expected = f"write two permutations of 01234 as 'PPPPP {self.symbol} QQQQQ =', e.g. '20143 {self.symbol} 10234 ='"
        if not isinstance(text, str):
            raise ValueError(f"cannot read {text!r}: {expected}")
        match = re.fullmatch(f"{self._PERM} {re.escape(self.symbol)} {self._PERM} =", text)
        if not match:
            raise ValueError(f"cannot read {text!r}: {expected}")
        tokens = []
        for word in match.groups():
            perm = tuple(int(ch) for ch in word)
            if perm not in PERMUTATION_INDEX:
                raise ValueError(f"{word!r} in {text!r} is not a permutation of 01234 (each digit 0-4 exactly once)")
            tokens.append(PERMUTATION_INDEX[perm])
        return [*tokens, self.equals_token_id]

    def decode(self, tokens) -> str:
        a, b = (int(t) for t in list(tokens)[:2])
        return f"{self.vocab[a]} {self.symbol} {self.vocab[b]} ="

    def answer(self, a: int, b: int) -> int:
        """The answer's token id for the tokens a and b."""
        return int(self.table[a, b])

    def label(self, tokens) -> int:
        a, b = (int(t) for t in list(tokens)[:2])
        return self.answer(a, b)

    # --- data ---

    def all_pairs(self) -> Split:
        """All 14,400 pairs (a, b), in row-major order (a slow, b fast)."""
        n = len(PERMUTATIONS)
        a, b = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        a, b = a.flatten(), b.flatten()
        tokens = torch.stack([a, b, torch.full_like(a, self.equals_token_id)], dim=1)  # (pair, 3)
        return Split(tokens=tokens, labels=self.table[a, b])

    def _make_splits(self) -> tuple[Split, Split]:
        return random_split(self.all_pairs(), self.config.train_frac, self.config.data_seed)


@register_task
class S5ConjTask(S5Task):
    """Conjugation in S5: "a ^ b =" -> a·b·a⁻¹ (as functions: a[b[a⁻¹]])."""

    name = "s5_conj"
    Config = S5ConjConfig
    symbol = "^"
    meaning = "c = a·b·a⁻¹ (b conjugated by a)"

    @staticmethod
    def operate(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
        return conjugate(a, b)
