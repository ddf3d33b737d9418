""""a and b" detection: does a string contain at least one `a` and at least one `b`?

After rstebbing's transformer workshop: a classification token `<cls>` is prepended, padding is
masked, attention is bidirectional, and the answer (2 classes) is read at the `<cls>` position.
With no positional embedding identical characters get identical embeddings, which is what lets a
model trained on short strings classify strings of any length; the test split therefore holds
strings longer than any training string.

Training strings have balanced classes: half contain both letters, and the other half are the
hard negatives, in equal shares: `a` without `b`, `b` without `a`, and neither.
"""

from __future__ import annotations

import random
import string
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator

from lab.tasks.base import Split, Task, TaskConfig, register_task

PAD, CLS = "<pad>", "<cls>"


class AAndBConfig(TaskConfig):
    name: Literal["a_and_b"] = "a_and_b"
    alphabet: str = Field(string.ascii_lowercase + " ", description="characters a string may hold; must contain 'a' and 'b'")
    min_len: int = Field(1, ge=1)
    max_train_len: int = Field(16, ge=2, description="the longest training string")
    max_test_len: int = Field(256, ge=2, description="test strings reach this length; half are longer than max_train_len")
    max_len: int = Field(1024, ge=2, description="the longest string `encode` accepts")
    n_train: int = Field(8192, ge=8)
    n_test: int = Field(2048, ge=8)

    @field_validator("alphabet")
    @classmethod
    def _alphabet_ok(cls, alphabet: str) -> str:
        if "a" not in alphabet or "b" not in alphabet:
            raise ValueError(f"alphabet {alphabet!r} must contain both 'a' and 'b'")
        if len(set(alphabet)) != len(alphabet):
            raise ValueError(f"alphabet {alphabet!r} repeats a character")
        if len(alphabet) < 3:
            raise ValueError(f"alphabet {alphabet!r} needs a third character, for strings with neither letter")
        return alphabet

    @model_validator(mode="after")
    def _lengths_ordered(self) -> "AAndBConfig":
        if not self.min_len < self.max_train_len < self.max_test_len <= self.max_len:
            raise ValueError(
                f"need min_len < max_train_len < max_test_len <= max_len, got "
                f"{self.min_len}, {self.max_train_len}, {self.max_test_len}, {self.max_len}"
            )
        return self


@register_task
class AAndBTask(Task):
    name = "a_and_b"
    Config = AAndBConfig
    causal = False
    read_position = 0
    pad_token_id = 0
    cls_token_id = 1

    def __init__(self, config: AAndBConfig):
        super().__init__(config)
        self.alphabet = config.alphabet
        self.vocab = [PAD, CLS, *config.alphabet]
        self.label_names = ["no", "yes"]
        self.n_ctx = config.max_len + 1
        self._ids = {char: i for i, char in enumerate(self.vocab) if i >= 2}

    def encode(self, text: str) -> list[int]:
        """A string of the alphabet's characters (at most max_len of them) -> `[<cls>, ids...]`."""
        if not isinstance(text, str):
            raise TypeError(f"expected a text (str) of characters from {self.alphabet!r}, got {type(text).__name__} {text!r:.40}")
        if len(text) > self.config.max_len:  # checked first: a huge text is refused without being read
            raise ValueError(f"text of {len(text)} characters is longer than this task's max_len of {self.config.max_len}")
        for char in text:
            if char not in self._ids:
                raise ValueError(f"character {char!r} is not in this task's alphabet {self.alphabet!r}")
        return [self.cls_token_id] + [self._ids[char] for char in text]

    def decode(self, tokens) -> str:
        return "".join(self.vocab[int(t)] for t in tokens if int(t) >= 2)

    def patching_pair(self) -> tuple[str, str]:
        """Activation patching's default: "a cab" (yes) against "a cac" (no: its only `b` replaced)."""
        return "a cab", "a cac"

    def token_labels(self, tokens) -> list[str]:
        return ["␣" if label == " " else label for label in super().token_labels(tokens)]

    def label(self, tokens) -> int:
        text = self.decode(tokens)
        return int("a" in text and "b" in text)

    # --- data ---

    def _string(self, rng: random.Random, length: int, kind: str) -> str:
        """A random string of one of four kinds: 'both', 'a_only', 'b_only', 'neither'."""
        banned = {"both": "", "a_only": "b", "b_only": "a", "neither": "ab"}[kind]
        pool = [c for c in self.alphabet if c not in banned]
        if rng.random() < 0.5:  # fillers from a few characters: "xxxx...xab" must be no surprise
            pool = rng.sample(pool, rng.randint(1, len(pool)))
        chars = [rng.choice(pool) for _ in range(length)]
        # Plant the letters the kind needs: in half the strings 1 to 3 of each whatever the length (a
        # single `a` in a long string is the hard case: attention must not dilute it away), in the
        # other half up to half the string (so that "aaaa...a" is no surprise either).
        for letter in {"both": "ab", "a_only": "a", "b_only": "b", "neither": ""}[kind]:
            most = min(3, length) if rng.random() < 0.5 else max(1, length // 2)
            for _ in range(rng.randint(1, most)):
                chars[rng.randrange(length)] = letter
        if kind == "both" and not ("a" in chars and "b" in chars):  # one letter overwrote the other
            i, j = rng.sample(range(length), 2)
            chars[i], chars[j] = "a", "b"
        return "".join(chars)

    def _strings(self, rng: random.Random, n: int, lengths: list[tuple[int, int]], exclude: set[str]) -> list[str]:
        kinds = ["both", "both", "both", "a_only", "b_only", "neither"]
        strings: list[str] = []
        seen = set(exclude)
        attempts = 0
        while len(strings) < n:
            attempts += 1
            kind = kinds[len(strings) % len(kinds)]
            low, high = lengths[len(strings) % len(lengths)]
            length = rng.randint(max(low, 2 if kind == "both" else 1), high)
            text = self._string(rng, length, kind)
            # Short strings repeat: keep each string once, and none of the training strings in test,
            # unless the space of short strings is exhausted (then repeats are allowed).
            if text in seen and attempts < 50 * n:
                continue
            seen.add(text)
            strings.append(text)
        return strings

    def _to_split(self, strings: list[str]) -> Split:
        tokens = self.encode_batch(strings)  # (batch, 1 + longest)
        labels = torch.tensor([int("a" in s and "b" in s) for s in strings], dtype=torch.long)
        return Split(tokens, labels)

    def _make_splits(self) -> tuple[Split, Split]:
        cfg = self.config
        rng = random.Random(cfg.data_seed)
        train = self._strings(rng, cfg.n_train, [(cfg.min_len, cfg.max_train_len)], exclude=set())
        longer = (cfg.max_train_len + 1, cfg.max_test_len)
        test = self._strings(rng, cfg.n_test, [(cfg.min_len, cfg.max_train_len), longer], exclude=set(train))
        return self._to_split(train), self._to_split(test)
