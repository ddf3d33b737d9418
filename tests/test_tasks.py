"""Task data: splits, labels, encode/decode, and the errors a user meets."""

import pytest
import torch

from lab.config import validate_experiment
from lab.errors import ConfigError
from lab.tasks import OPERATORS, make_task


def modular(**overrides):
    return make_task({"name": "modular", "p": 13, "train_frac": 0.4, **overrides})


def test_nanda_split_sizes():
    task = make_task({"name": "modular", "p": 113, "train_frac": 0.3})
    assert len(task.split("train")) == 3830  # Nanda et al.: 3,830 of 12,769 pairs
    assert len(task.split("test")) == 113 * 113 - 3830


def test_split_is_deterministic_and_disjoint():
    a, b = modular(), modular()
    assert torch.equal(a.split("train").tokens, b.split("train").tokens)
    other = modular(data_seed=1)
    assert not torch.equal(a.split("train").tokens, other.split("train").tokens)
    train = {tuple(t.tolist()) for t in a.split("train").tokens}
    test = {tuple(t.tolist()) for t in a.split("test").tokens}
    assert not train & test
    assert len(train) + len(test) == 13 * 13


@pytest.mark.parametrize("operator", list(OPERATORS))
def test_labels_right_for_every_operator(operator):
    p = 13
    task = modular(operator=operator)
    expected = {
        "add": lambda a, b: (a + b) % p,
        "sub": lambda a, b: (a - b) % p,
        "mul": lambda a, b: (a * b) % p,
        "div": lambda a, b: next(c for c in range(p) if (c * b) % p == a),  # a = c * b
        "x2+y2": lambda a, b: (a * a + b * b) % p,
        "x2+xy+y2": lambda a, b: (a * a + a * b + b * b) % p,
        "x3+xy": lambda a, b: (a**3 + a * b) % p,
    }[operator]
    for split in ("train", "test"):
        data = task.split(split)
        for (a, b, eq), label in zip(data.tokens.tolist(), data.labels.tolist()):
            assert eq == p
            assert label == expected(a, b), (operator, a, b)


def test_division_excludes_zero_and_needs_prime():
    task = modular(operator="div")
    assert len(task.all_pairs()) == 13 * 12
    assert (task.all_pairs().tokens[:, 1] != 0).all()
    with pytest.raises(ConfigError, match=r"p = 12 is not prime.*'div'.*e\.g\. 11|13"):
        validate_experiment({"task": {"name": "modular", "p": 12, "operator": "div"}})


def test_unknown_operator_and_task_are_named():
    with pytest.raises(ConfigError, match=r"unknown operator 'pow'; valid operators: add, sub"):
        validate_experiment({"task": {"name": "modular", "operator": "pow"}})
    with pytest.raises(ConfigError, match=r"unknown task 'sorting'; valid tasks: a_and_b, modular"):
        validate_experiment({"task": {"name": "sorting"}})


def test_modular_encode_decode():
    task = modular()
    assert task.encode("12 + 3 =") == [12, 3, 13]
    assert task.encode("12+3=") == [12, 3, 13] == task.encode("12 add 3 =")
    for loose in ("12 3", "12+3", "12", "123 ="):  # strict: exactly `a op b =` (issue 12: "12" was read as 1 + 2)
        with pytest.raises(ValueError, match="write exactly 'a \\+ b ='"):
            task.encode(loose)
    assert task.decode(task.encode("4 + 5 =")) == "4 + 5 ="
    assert task.encode(task.decode([7, 8, 13])) == [7, 8, 13]
    assert task.label_names[task.label([4, 5, 13])] == "9"
    with pytest.raises(ValueError, match=r"number 14 .* out of range: this task's numbers are 0..12"):
        task.encode("14 + 1 =")
    with pytest.raises(ValueError, match=r"operator '\*' .* not this task's operator 'add'"):
        task.encode("1 * 2 =")
    with pytest.raises(ValueError, match="cannot read 'hello'"):
        task.encode("hello")


def a_and_b(**overrides):
    return make_task({"name": "a_and_b", "n_train": 600, "n_test": 300, "max_train_len": 8, "max_test_len": 40, **overrides})


def test_a_and_b_labels_balance_and_hard_negatives():
    task = a_and_b()
    train = task.split("train")
    texts = [task.decode(t) for t in train.tokens]
    for text, label in zip(texts, train.labels.tolist()):
        assert label == int("a" in text and "b" in text)
    assert abs(train.labels.float().mean().item() - 0.5) < 0.02
    kinds = {(("a" in t), ("b" in t)) for t in texts}
    assert kinds == {(True, True), (True, False), (False, True), (False, False)}  # every hard negative
    assert max(len(t) for t in texts) <= 8


def test_a_and_b_test_split_is_longer_and_disjoint():
    task = a_and_b()
    train = {task.decode(t) for t in task.split("train").tokens}
    test = [task.decode(t) for t in task.split("test").tokens]
    assert max(len(t) for t in test) > 8
    assert sum(len(t) > 8 for t in test) >= len(test) // 3
    assert not set(test) & {t for t in train if len(t) > 3}  # short strings may coincide only when exhausted


def test_a_and_b_encoding_and_padding():
    task = a_and_b()
    assert task.encode("a cab") == [1, 2, 28, 4, 2, 3]
    assert task.decode(task.encode("a cab")) == "a cab"
    assert task.token_labels(task.encode("a b")) == ["<cls>", "a", "␣", "b"]
    batch = task.encode_batch(["ab", "a"])
    assert batch.tolist() == [[1, 2, 3], [1, 2, 0]]
    with pytest.raises(ValueError, match=r"character 'A' is not in this task's alphabet 'abcdefghijklmnopqrstuvwxyz '"):
        task.encode("A cab")
    with pytest.raises(ValueError, match="longer than this task's max_len"):
        task.encode("a" * 2000)


def test_a_and_b_config_errors():
    with pytest.raises(ConfigError, match=r"alphabet 'xyz' must contain both 'a' and 'b'"):
        validate_experiment({"task": {"name": "a_and_b", "alphabet": "xyz"}})


def test_a_prediction_prints_as_its_answer_not_its_whole_distribution():
    from lab.models.prediction import prediction_from_logits

    task = make_task({"name": "modular", "p": 59})
    logits = torch.zeros(59)
    logits[17] = 10.0
    prediction = prediction_from_logits(task, logits)
    assert prediction.probabilities.shape == (59,) and prediction.probabilities.sum().item() == pytest.approx(1.0)
    assert repr(prediction) == "Prediction(label='17', label_id=17, probability=0.9974)"  # e^10 / (e^10 + 58)


def test_a_confident_prediction_is_not_rounded_to_certainty():
    """A logit gap of 25 over 58 other classes: p = 1 - 58 e^-25 = 1 - 8.1e-10, which float32 (and 4 digits) make 1."""
    import math

    from lab.models.prediction import prediction_from_logits

    logits = torch.zeros(59)
    logits[17] = 25.0
    prediction = prediction_from_logits(make_task({"name": "modular", "p": 59}), logits)
    assert 1 - prediction.probability == pytest.approx(58 * math.exp(-25), rel=1e-6)
    assert prediction.probability == prediction.probabilities[17].item()  # the value and the distribution agree
    assert repr(prediction) == "Prediction(label='17', label_id=17, probability=0.99999999919)"
