"""The next-token tasks: reverse (Hilton's mask check), repeated_tokens (induction) and text (a language model
of Shakespeare's plays or of any UTF-8 file): data layout, determinism, text round trips, the baselines
against a hand count, bad config lines, and the mask check itself on a tiny trained model."""

import math
import subprocess
import sys

import pytest
import torch
from pydantic import ValidationError

from lab.config import ExperimentConfig
from lab.errors import ConfigError
from lab.models.architectures import build_model
from lab.tasks import IGNORE_INDEX, make_task
from lab.training.losses import task_loss


def reverse(**fields):
    return make_task({"name": "reverse", "seq_len": 5, "n_symbols": 7, "n_train": 300, "n_test": 100, **fields})


def repeated(**fields):
    return make_task({"name": "repeated_tokens", "n_symbols": 20, "n_ctx": 32, "min_segment": 3, "max_segment": 8,
                      "n_train": 200, "n_test": 50, **fields})


# --- reverse ---


def test_reverse_layout_is_the_sequence_then_its_mirror():
    task = reverse()
    assert (task.read_position, task.causal, task.n_ctx, task.d_vocab_out) == (None, True, 10, 8)
    for name in ("train", "test"):
        split = task.split(name)
        assert split.tokens.shape == split.labels.shape == (len(split), 10)
        sequence = torch.cat([split.tokens, split.labels[:, -1:]], dim=1)  # (batch, 2L + 1)
        assert torch.equal(split.tokens[:, 1:], split.labels[:, :-1])  # labels are the next tokens
        assert (sequence[:, 5] == task.separator_id).all() and (sequence[:, :5] < 7).all()
        assert torch.equal(sequence[:, 6:], sequence[:, :5].flip(1))
    # the best a causal model can do: 4 of 10 targets at chance (1/7, ln 7), the other 6 certain
    assert task.baselines() == pytest.approx({"optimal_test_loss": 4 * math.log(7) / 10, "optimal_test_acc": (6 + 4 / 7) / 10})
    halves = task.target_halves()
    assert halves == {"first": [0, 1, 2, 3], "separator": [4], "second": [5, 6, 7, 8, 9]}
    test = task.split("test")
    assert (test.labels[:, halves["separator"]] == task.separator_id).all()
    # train and test hold distinct sequences
    assert not {tuple(row) for row in task.split("train").tokens.tolist()} & {tuple(row) for row in test.tokens.tolist()}


def test_reverse_label_text_and_patching_pair():
    task = reverse()
    assert task.encode("3 1 4 | 4") == [3, 1, 4, 7, 4]
    assert task.decode([3, 1, 4, 7, 4]) == "3 1 4 | 4"
    assert task.label(task.encode("3 1 4 0 6")) == task.separator_id  # after L tokens: the separator
    assert task.label(task.encode("3 1 4 0 6 | 6 0")) == 4  # then the mirror image
    test = task.split("test")
    for sequence in torch.cat([test.tokens, test.labels[:, -1:]], dim=1)[:20]:  # (2L + 1) tokens each
        for n in range(5, 11):
            assert task.label(sequence[:n]) == int(sequence[n])
    with pytest.raises(ValueError, match="random"):
        task.label([1, 2])
    clean, corrupted = task.patching_pair()
    assert len(task.encode(clean)) == len(task.encode(corrupted)) == 10
    assert task.label(task.encode(clean)) != task.label(task.encode(corrupted))
    for bad, message in [("3 x 4", "'x' is not in"), ("", "0 tokens"), (" ".join(["1"] * 11), "11 tokens"), ("1 " * 5000, "longer")]:
        with pytest.raises(ValueError, match=message):
            task.encode(bad)


def test_sequence_tasks_are_deterministic_from_data_seed():
    for make in (reverse, repeated):
        a, b, other = make().split("train"), make().split("train"), make(data_seed=1).split("train")
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.labels, b.labels)
        assert not torch.equal(a.tokens, other.tokens)
    assert torch.equal(repeated().repeated_mask("test"), repeated().repeated_mask("test"))


# --- repeated tokens ---


def test_repeated_tokens_mask_marks_the_second_copy_after_its_first_token():
    task = repeated()
    assert task.vocab[:3] == ["<bos>", "1", "2"] and task.d_vocab == 21 and task.n_ctx == 32
    for name in ("train", "test"):
        split, mask = task.split(name), task.repeated_mask(name)
        assert mask.shape == split.labels.shape == (len(split), 32) and mask.dtype == torch.bool
        assert (split.tokens[:, 0] == task.bos_token_id).all() and (split.labels != task.bos_token_id).all()
        for tokens, labels, read in zip(split.tokens, split.labels, mask):
            where = read.nonzero().flatten().tolist()
            assert 2 <= len(where) <= 7 and where == list(range(where[0], where[-1] + 1))  # one run of m - 1 targets
            first = where[0]  # label `first` is the second copy's 2nd token; its 1st token is tokens[first]
            # the first copy lies somewhere before: the same m tokens, ending before the second copy starts
            copy = tokens[first : first + 1].tolist() + labels[where].tolist()
            starts = [a for a in range(1, first - len(copy) + 1) if tokens[a : a + len(copy)].tolist() == copy]
            assert starts, (tokens, labels, where)
    # about half the time no copy exists by chance at a short length: the mask is not trivially all positions
    assert 0.05 < task.repeated_mask("train").float().mean() < 0.4


def test_repeated_tokens_label_and_patching_pair_are_the_induction_answer():
    task = repeated()
    assert task.label(task.encode("<bos> 5 9 3 7 5 9")) == 3
    with pytest.raises(ValueError, match="occurs once"):
        task.label(task.encode("<bos> 5 9 3"))
    clean, corrupted = task.patching_pair()
    assert (task.label(task.encode(clean)), task.label(task.encode(corrupted))) == (4, 6)
    assert len(task.encode(clean)) == len(task.encode(corrupted))


def test_induction_diagnostic_is_transformer_lens_induction_loss():
    """The diagnostic split's mean loss is TransformerLens's `evals.induction_loss` (its construction: a random
    half written twice, <bos> at 0, `lm_cross_entropy_loss(..., per_token=True)[:, p + 1:]`) on the same tokens."""
    from transformer_lens import utilities as utils  # evals.py imports it so

    task = repeated()
    split = task.induction_diagnostic(n_batch=8, subseq_len=12)
    assert split.tokens.shape == (8, 23)
    full = torch.cat([split.tokens, split.labels[:, -1:]], dim=1)  # (batch, 2p)
    assert (full[:, 0] == task.bos_token_id).all() and torch.equal(full[:, 13:24], full[:, 1:12])
    config = ExperimentConfig.model_validate({"task": task.config.model_dump(), "model": {
        "n_layers": 2, "d_model": 32, "n_heads": 2, "d_head": 16, "attn_only": True}}).resolve()
    model = build_model(config.model)
    with torch.no_grad():
        ours = task_loss(model.forward_at(split.tokens, None), split.labels)
        theirs = utils.lm_cross_entropy_loss(model(full), full, per_token=True)[:, 12 + 1:].mean()
    assert torch.allclose(ours, theirs, atol=1e-6), (ours, theirs)
    assert (split.labels[:, :13] == IGNORE_INDEX).all() and (split.labels[:, 13:] != IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="subseq_len = 40"):
        task.induction_diagnostic(subseq_len=40)


# --- text ---

TINY = "a b a c\na b\na c b a\n"  # train: the first two lines (test_frac 0.3 cuts at the 2nd line break); test: the last


def tiny_text(tmp_path, **fields):
    path = tmp_path / "tiny.txt"
    path.write_text(TINY, encoding="utf-8")
    return make_task({"name": "text", "path": str(path), "vocab_size": 5, "n_ctx": 2, "test_frac": 0.3, **fields})


def test_text_windows_and_baselines_against_a_hand_count(tmp_path):
    task = tiny_text(tmp_path)
    assert task.vocab == ["a", "b", "\n", "c", "<unk>"]  # by training count, ties by first appearance
    test = task.split("test")  # stream a c b a \n -> windows [a c b], [b a \n] (overlapping by one)
    assert test.tokens.tolist() == [[0, 3], [1, 0]] and test.labels.tolist() == [[3, 1], [0, 2]]
    assert task.split("train").tokens.tolist() == [[0, 1], [0, 3], [2, 0]]  # a b a c \n a b \n: 3 windows of 3
    # Unigram, add-one over V = 5: (count + 1) / (8 + 5); targets c, b, a, \n
    unigram = [2 / 13, 3 / 13, 4 / 13, 3 / 13]
    # Bigram, absolute discount 0.75 interpolated with that unigram. Training pairs: ab x2, ba, ac, c\n, \na, b\n;
    # c(a) = 3 with 2 distinct successors, c(b) = 2 with 2, c(c) = 1 with 1.
    bigram = [(1 - 0.75) / 3 + 0.75 * 2 / 3 * 2 / 13,  # a -> c
              0 + 0.75 * 1 / 1 * 3 / 13,  # c -> b (never seen)
              (1 - 0.75) / 2 + 0.75 * 2 / 2 * 4 / 13,  # b -> a
              0 + 0.75 * 2 / 3 * 3 / 13]  # a -> \n (never seen)
    expected_unigram = -sum(map(math.log, unigram)) / 4
    expected_bigram = -sum(map(math.log, bigram)) / 4
    assert task.baselines() == pytest.approx({"unigram_loss": expected_unigram, "unigram_perplexity": math.exp(expected_unigram),
                                              "bigram_loss": expected_bigram, "bigram_perplexity": math.exp(expected_bigram)})


def test_text_encode_decode_and_unknown_words(tmp_path):
    task = tiny_text(tmp_path, n_ctx=3)
    assert task.encode("a c zebra") == [0, 3, 4]
    assert task.decode([0, 3, 4, 2, 1]) == "a c <unk>\nb"
    assert task.token_labels([0, 2]) == ["a", "↵"]
    with pytest.raises(ValueError, match="4 tokens"):
        task.encode("a b c.")  # longer than n_ctx
    with pytest.raises(ValueError, match="no computed answer"):
        task.label([0, 1])
    chars = tiny_text(tmp_path, level="char", vocab_size=4, n_ctx=3)
    assert chars.vocab == [" ", "a", "b", "<unk>"]  # space 4 times, a 3, b 2 (before the line break's 2)
    assert chars.decode(chars.encode("a c")) == "a \ufffd" and chars.encode("a \ufffd") == chars.encode("a c")


def test_text_bad_paths_are_one_config_line(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café au lait\n".encode("latin-1"))
    (tmp_path / "short.txt").write_text("to be\n", encoding="utf-8")
    for path, message in [(tmp_path / "missing.txt", "no such file"), (tmp_path / "latin1.txt", "not UTF-8"),
                          (tmp_path, "is a folder"), (tmp_path / "short.txt", "n_ctx = 64")]:
        with pytest.raises(ConfigError, match=message) as error:
            make_task({"name": "text", "path": str(path)})
        assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="'hamlett' is not a play; valid: .*hamlet"):
        make_task({"name": "text", "held_out_plays": ["hamlett"]})
    with pytest.raises(ValidationError, match="level"):
        make_task({"name": "text", "level": "sentence"})


def test_shakespeare_default_corpus_whole_plays_without_markup():
    task = make_task({"name": "text"})
    assert task.held_out_plays == ("a-midsummer-night-s-dream", "henry-iv-part-2", "macbeth", "the-merry-wives-of-windsor")
    assert 0.08 < len(task.test_tokens) / (len(task.train_tokens) + len(task.test_tokens)) < 0.15
    vocabulary = set(task.vocab)
    assert {"HAMLET", "'tis", "\n", ",", "<unk>"} <= vocabulary  # speaker names kept; an elision is one word
    assert not {token for token in vocabulary if set(token) & set("#_*[]\\")}  # headings, directions, escapes gone
    assert "Enter" not in task.vocab[:200] and "SCENE" not in vocabulary  # stage directions and scene headings dropped
    line = "To be, or not to be: that is the question:\nWhether 'tis nobler in the mind to suffer\n"
    assert task.decode(task.encode(line)) == line  # every word of it is in the vocabulary
    window = task.split("test").tokens[7]
    assert task.encode(task.decode(window)) == window.tolist()
    baselines = task.baselines()
    assert 4.0 < baselines["bigram_loss"] < baselines["unigram_loss"] < 6.0
    assert baselines["bigram_perplexity"] == pytest.approx(math.exp(baselines["bigram_loss"]))


# --- bad config, as a user meets it ---


def test_bad_sequence_configs_are_one_line():
    for fields, message in [({"name": "reverse", "n_symbols": 1}, "n_symbols"),
                            ({"name": "reverse", "n_symbols": 2, "seq_len": 3}, "8 distinct sequences"),
                            ({"name": "repeated_tokens", "min_segment": 9, "max_segment": 5}, "min_segment = 9"),
                            ({"name": "repeated_tokens", "n_ctx": 20, "max_segment": 11}, "max_segment <= 10")]:
        with pytest.raises(ValidationError, match=message):
            make_task(fields)
    result = subprocess.run([sys.executable, "-m", "lab.cli", "train", "reverse", "--set", "task.n_symbols=2", "--set", "task.seq_len=3"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "distinct sequences" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


# --- the mask check ---


def half_accuracies(causal: bool) -> dict[str, float]:
    """A tiny 1-layer attention-only model trained on reverse (L = 6 of 8 symbols), with or without the causal
    mask: test accuracy of each part of the sequence (`target_halves`)."""
    config = ExperimentConfig.model_validate({
        "task": {"name": "reverse", "seq_len": 6, "n_symbols": 8, "n_train": 2000, "n_test": 500},
        "model": {"n_layers": 1, "d_model": 32, "n_heads": 2, "d_head": 16, "attn_only": True, "seed": 0}}).resolve()
    task = make_task(config.task)
    train, test = task.split("train"), task.split("test")
    torch.manual_seed(0)
    model = build_model(config.model.model_copy(update={"causal": causal}))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    batches = torch.Generator().manual_seed(0)
    for _ in range(150):
        index = torch.randint(0, len(train), (128,), generator=batches)
        loss = task_loss(model.forward_at(train.tokens[index], None), train.labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        right = (model.forward_at(test.tokens, None).argmax(-1) == test.labels).float().mean(0)  # (pos,)
    return {part: float(right[positions].mean()) for part, positions in task.target_halves().items()}


def mask_check_passes(accuracy: dict[str, float]) -> bool:
    """Hilton's criterion: the second half predicted, the first half not (chance 1/8, 2,500 targets: sd 0.007)."""
    return accuracy["second"] >= 0.97 and accuracy["separator"] >= 0.97 and abs(accuracy["first"] - 1 / 8) < 0.04


def test_reverse_mask_check_passes_with_the_causal_mask_and_fails_without():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and several fight on a loaded machine
    try:
        causal, bidirectional = half_accuracies(True), half_accuracies(False)
    finally:
        torch.set_num_threads(threads)
    assert mask_check_passes(causal), causal
    assert not mask_check_passes(bidirectional), bidirectional
    assert bidirectional["first"] > 0.9  # without the mask the model reads the next token instead of predicting it
