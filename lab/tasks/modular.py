"""Modular arithmetic: `[a, b, =]` -> `a op b mod p`, the grokking task of Power et al. 2022 and
Nanda et al. 2023 (p = 113 addition).

Tokens 0..p-1 are the numbers and token p is `=`; the answer (one of p classes) is read at the
last position, under causal attention. `train_frac` of all valid (a, b) pairs, picked at random
from `data_seed`, form the training split; the rest are the test split. The permutation is drawn with
`torch.randperm` by default; `split_shuffle = "python"` draws it as Nanda et al.'s code does
(`random.seed(data_seed); random.shuffle(pairs)` over the row-major pairs, then the first
`int(train_frac * p²)` are the training split), so `nanda_2023` trains on exactly the paper's pairs.
"""

from __future__ import annotations

import re
from functools import cached_property
from typing import Callable, Literal

import torch
from pydantic import Field, field_validator, model_validator

from lab.tasks.base import Split, Task, TaskConfig, random_split, register_task


def _inverse(b: torch.Tensor, p: int) -> torch.Tensor:
    return torch.tensor([pow(int(x), -1, p) for x in b.tolist()], dtype=torch.long)


# name -> (symbol shown between a and b, function of (a, b, p), is b = 0 excluded)
OPERATORS: dict[str, tuple[str, Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor], bool]] = {
    "add": ("+", lambda a, b, p: (a + b) % p, False),
    "sub": ("-", lambda a, b, p: (a - b) % p, False),
    "mul": ("*", lambda a, b, p: (a * b) % p, False),
    "div": ("/", lambda a, b, p: (a * _inverse(b, p)) % p, True),
    "x2+y2": ("∘", lambda a, b, p: (a * a + b * b) % p, False),
    "x2+xy+y2": ("∘", lambda a, b, p: (a * a + a * b + b * b) % p, False),
    "x3+xy": ("∘", lambda a, b, p: (a * a * a + a * b) % p, False),
}


def is_prime(n: int) -> bool:
    return n >= 2 and all(n % k for k in range(2, int(n**0.5) + 1))


class ModularConfig(TaskConfig):
    name: Literal["modular"] = "modular"
    p: int = Field(113, ge=2, le=1000, description="the modulus")
    operator: str = Field("add", description=f"one of {', '.join(OPERATORS)}")
    train_frac: float = Field(0.3, gt=0.0, lt=1.0)
    split_shuffle: Literal["torch", "python"] = Field(
        "torch", description="how the split's permutation is drawn from data_seed: torch.randperm, or Python's "
                             "random.shuffle as in Nanda et al.'s code (their exact split with data_seed = 0)")

    @field_validator("operator")
    @classmethod
    def _known_operator(cls, operator: str) -> str:
        if operator not in OPERATORS:
            raise ValueError(f"unknown operator {operator!r}; valid operators: {', '.join(OPERATORS)}")
        return operator

    @model_validator(mode="after")
    def _division_needs_prime(self) -> "ModularConfig":
        if self.operator == "div" and not is_prime(self.p):
            primes = [n for n in range(self.p - 20, self.p + 20) if is_prime(n)]
            near = min(primes, key=lambda n: abs(n - self.p)) if primes else 113
            raise ValueError(f"p = {self.p} is not prime, and operator 'div' needs a prime p (e.g. {near}) so that every b != 0 has an inverse")
        return self


@register_task
class ModularTask(Task):
    name = "modular"
    Config = ModularConfig
    causal = True
    n_ctx = 3
    read_position = -1

    def __init__(self, config: ModularConfig):
        super().__init__(config)
        self.p = config.p
        self.operator = config.operator
        self.symbol, self._fn, self._skip_zero_b = OPERATORS[config.operator]
        self.vocab = [str(n) for n in range(self.p)] + ["="]
        self.label_names = [str(n) for n in range(self.p)]
        self.equals_token_id = self.p

    # --- text <-> tokens ---

    MAX_TEXT = 64  # characters: "a op b =" with numbers below 1000 fits with room for spaces; longer is refused unread

    @cached_property
    def _text(self) -> re.Pattern:
        # exactly `a op b =`: the operator is this task's symbol or name (e.g. "+" or "add"); nothing else.
        # With the length capped first, matching is linear (no nested repetition to backtrack over).
        ops = "|".join(re.escape(op) for op in sorted({self.symbol, self.operator}, key=len, reverse=True))
        return re.compile(rf"[ \t]*([0-9]{{1,6}})[ \t]*({ops})[ \t]*([0-9]{{1,6}})[ \t]*=[ \t]*")

    def encode(self, text: str) -> list[int]:
        """`"12 + 34 ="` (or `"12+34="`, `"12 add 34 ="`) -> `[12, 34, =]`: exactly `a op b =`, with a, b below p."""
        if not isinstance(text, str):
            raise TypeError(f"expected a text like '12 {self.symbol} 34 =', got {type(text).__name__} {text!r:.40}")
        if len(text) > self.MAX_TEXT:
            raise ValueError(f"text of {len(text)} characters is longer than the {self.MAX_TEXT} an expression "
                             f"'a {self.symbol} b =' may have")
        match = self._text.fullmatch(text)
        if not match:
            other = re.fullmatch(r"[ \t]*[0-9]{1,6}[ \t]*([^0-9 \t=]+)[ \t]*[0-9]{1,6}[ \t]*=[ \t]*", text)
            if other:
                raise ValueError(f"operator {other.group(1)!r} in {text!r} is not this task's operator {self.operator!r} ({self.symbol!r})")
            raise ValueError(f"cannot read {text!r}: write exactly 'a {self.symbol} b =' with two numbers below {self.p}, "
                             f"e.g. '12 {self.symbol} 34 ='")
        a, b = int(match.group(1)), int(match.group(3))
        for n in (a, b):
            if n >= self.p:
                raise ValueError(f"number {n} in {text!r} is out of range: this task's numbers are 0..{self.p - 1}")
        if self._skip_zero_b and b == 0:
            raise ValueError(f"b = 0 in {text!r}: division needs b != 0")
        return [a, b, self.equals_token_id]

    def decode(self, tokens) -> str:
        a, b = (int(t) for t in list(tokens)[:2])
        return f"{a} {self.symbol} {b} ="

    def patching_pair(self) -> tuple[str, str]:
        """Activation patching's default: `12 + 5 =` against `13 + 5 =` (numbers taken mod p; a moved on
        until the answers differ)."""
        a, b = 12 % self.p, 5 % self.p or 1
        other = next(n for n in range(a + 1, a + self.p) if self.answer(n % self.p, b) != self.answer(a, b)) % self.p
        return f"{a} {self.symbol} {b} =", f"{other} {self.symbol} {b} ="

    def answer(self, a: int, b: int) -> int:
        return int(self._fn(torch.tensor([a]), torch.tensor([b]), self.p)[0])

    def label(self, tokens) -> int:
        a, b = (int(t) for t in list(tokens)[:2])
        return self.answer(a, b)

    # --- data ---

    def all_pairs(self) -> Split:
        """Every valid (a, b), in row-major order (a slow, b fast): the full p-by-p grid for analysis."""
        a, b = torch.meshgrid(torch.arange(self.p), torch.arange(self.p), indexing="ij")
        a, b = a.flatten(), b.flatten()
        if self._skip_zero_b:
            a, b = a[b != 0], b[b != 0]
        tokens = torch.stack([a, b, torch.full_like(a, self.equals_token_id)], dim=1)  # (pair, 3)
        return Split(tokens=tokens, labels=self._fn(a, b, self.p))

    def _make_splits(self) -> tuple[Split, Split]:
        return random_split(self.all_pairs(), self.config.train_frac, self.config.data_seed, self.config.split_shuffle)
