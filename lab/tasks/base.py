"""What every task provides, and the registry that finds a task by name.

A task owns its vocabulary, `encode`/`decode`, a deterministic train/test split, the position the
loss reads, and whether attention is causal. To add one, subclass `Task`, give it a `Config`
(a `TaskConfig` subclass whose `name` is a `Literal` of the task's name), and decorate it with
`@register_task`; the README walks through an example.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, Literal

import torch
from pydantic import Field

from lab.errors import ConfigError
from lab.schema import StrictModel

SplitName = Literal["train", "test"]

IGNORE_INDEX = -100  # a label that reads no loss (PyTorch's cross_entropy default): positions of a sequence with no target


class TaskConfig(StrictModel):
    """Base of every task's config (the `[task]` table); each task subclasses it with its own fields."""

    name: str
    data_seed: int = Field(0, description="seed of the train/test split and of generated data")


@dataclass(frozen=True)
class Split:
    """One split of a task's data: inputs, and labels read at `Task.read_position` (a classifier: one
    label per input) or at every position (`read_position` None, a language model: the next token at
    each position, IGNORE_INDEX where no loss is read)."""

    tokens: torch.Tensor  # (batch, pos) int64, padded with the task's pad token where lengths differ
    labels: torch.Tensor  # (batch,) or (batch, pos) int64, indices into the model's output vocabulary

    def __len__(self) -> int:
        return self.tokens.shape[0]


class Task(ABC):
    name: ClassVar[str]
    Config: ClassVar[type[TaskConfig]]

    vocab: list[str]  # token id -> the string it stands for
    label_names: list[str]  # output index -> what the answer means
    n_ctx: int  # the longest input the task produces or accepts
    causal: bool  # attention direction the task's model uses
    pad_token_id: int | None = None
    read_position: int | None  # the position whose logits the loss reads (0 or -1); None: every position (next-token tasks)

    def __init__(self, config: TaskConfig):
        self.config = config

    @property
    def d_vocab(self) -> int:
        return len(self.vocab)

    @property
    def d_vocab_out(self) -> int:
        return len(self.label_names)

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Text a person types -> the token ids the model reads. Raises `ValueError` on bad text."""

    @abstractmethod
    def decode(self, tokens) -> str:
        """Token ids -> readable text (padding dropped)."""

    def token_labels(self, tokens) -> list[str]:
        """One display label per token, for plot axes."""
        return [self.vocab[int(t)] for t in tokens]

    @abstractmethod
    def label(self, tokens) -> int:
        """The correct answer for one input, computed from its tokens."""

    @abstractmethod
    def _make_splits(self) -> tuple[Split, Split]:
        """Build (train, test) deterministically from the config."""

    @cached_property
    def _splits(self) -> tuple[Split, Split]:
        return self._make_splits()

    def split(self, name: SplitName) -> Split:
        if name not in ("train", "test"):
            raise ValueError(f"unknown split {name!r}; valid: 'train', 'test'")
        return self._splits[0] if name == "train" else self._splits[1]

    def baselines(self) -> dict[str, float]:
        """Reference numbers the run's summary.json carries under "baselines" (e.g. a text task's unigram
        and bigram held-out loss, counted on the training split): what a model must beat to have learnt more
        than counting. Empty by default."""
        return {}

    def patching_pair(self) -> tuple[str, str]:
        """A default (clean, corrupted) pair of texts for activation patching: same number of tokens, different
        answers. Tasks override it with a pair that tells a story; this default is the first test input and the
        next test input of the same length with another answer."""
        split = self.split("test")
        first = split.tokens[0]
        for tokens, label in zip(split.tokens[1:], split.labels[1:]):
            if int(label) != int(split.labels[0]) and len(self.encode(self.decode(tokens))) == len(self.encode(self.decode(first))):
                return self.decode(first), self.decode(tokens)
        raise ValueError(f"task {self.name!r}: no two test inputs of one length with different answers to patch between")

    def encode_batch(self, texts: list[str]) -> torch.Tensor:
        """Encode several texts into one padded (batch, pos) tensor."""
        encoded = [self.encode(text) for text in texts]
        length = max(len(tokens) for tokens in encoded)
        pad = self.pad_token_id if self.pad_token_id is not None else 0
        if any(len(tokens) != length for tokens in encoded) and self.pad_token_id is None:
            raise ValueError(f"task {self.name!r} has no padding, and these texts encode to different lengths")
        return torch.tensor([tokens + [pad] * (length - len(tokens)) for tokens in encoded], dtype=torch.long)


TASKS: dict[str, type[Task]] = {}


def random_split(examples: Split, train_frac: float, data_seed: int, shuffle: str = "torch") -> tuple[Split, Split]:
    """The train/test split of a task that enumerates every example (modular, S5): one permutation of
    all examples from `data_seed`, cut at `train_frac`. shuffle "torch": `torch.randperm` seeded with
    `data_seed`; "python": `random.seed(data_seed); random.shuffle(...)` of the examples in order, as
    Nanda et al.'s `gen_train_test` draws its split."""
    if shuffle == "python":
        import random

        order = list(range(len(examples)))
        random.Random(data_seed).shuffle(order)  # the same permutation as random.seed(seed); random.shuffle(list)
        order = torch.tensor(order, dtype=torch.long)
    else:
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(data_seed))
    n_train = int(train_frac * len(examples))
    train, test = order[:n_train], order[n_train:]
    return Split(examples.tokens[train], examples.labels[train]), Split(examples.tokens[test], examples.labels[test])


def register_task(cls: type[Task]) -> type[Task]:
    TASKS[cls.name] = cls
    return cls


def task_class(name: str) -> type[Task]:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def make_task(config: TaskConfig | dict) -> Task:
    if isinstance(config, dict):
        config = task_class(config.get("name", "")).Config.model_validate(config)
    return task_class(config.name)(config)
