"""Training a language model: a target at every position (`Task.read_position` None), through `lab train`,
stacked sweeps, resume, evaluation and the run's summary, on the reverse task (tiny sizes)."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import lab
from lab.config import validate_experiment
from lab.errors import ConfigError
from lab.models.architectures import build_model
from lab.runs.storage import read_jsonl
from lab.sweeps.ensemble import StackedEnsemble, train_ensemble
from lab.tasks import IGNORE_INDEX, Split, make_task
from lab.training.losses import task_loss
from lab.training.trainer import Trainer, evaluate, score
from test_sweep_members import close

BASE = {
    "name": "rev",
    "task": {"name": "reverse", "seq_len": 4, "n_symbols": 6, "n_train": 256, "n_test": 64},
    "model": {"n_layers": 2, "d_model": 32, "n_heads": 2, "d_head": 16, "d_mlp": 64},
    "train": {"steps": 40, "lr": 3e-3, "weight_decay": 0.1, "batch_size": 64, "eval_every": 10,
              "checkpoint_every": 20, "log_checkpoints": 0, "device": "cpu"},
}


def config(**model):
    return validate_experiment({**BASE, "model": {**BASE["model"], **model}})


def without_time(rows):
    return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in rows]


def test_loss_is_the_mean_over_target_positions_and_accuracy_is_per_token():
    cfg = config().resolve()
    task = make_task(cfg.task)
    model = build_model(cfg.model)
    split = task.split("test")
    labels = split.labels.clone()
    labels[:, ::2] = IGNORE_INDEX  # half the positions read no loss
    logits = model.forward_at(split.tokens, None)  # (batch, pos, vocab)
    assert logits.shape == (*split.tokens.shape, cfg.model.d_vocab_out)
    read = labels != IGNORE_INDEX
    by_hand = F.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    expected = -(by_hand * read).sum() / read.sum()
    torch.testing.assert_close(task_loss(logits, labels), expected)
    torch.testing.assert_close(task_loss(logits, labels, "stablemax").isfinite(), torch.tensor(True))

    assert score(logits, torch.full_like(labels, IGNORE_INDEX), cfg) == (0.0, 0, 0)  # a chunk with no target adds nothing

    loss, acc = evaluate(model, Split(split.tokens, labels), task, cfg)
    right = ((logits.argmax(-1) == labels) & read).sum().item()
    assert acc == right / read.sum().item()
    assert loss == pytest.approx(expected.item(), rel=1e-6)


def test_a_pooled_model_is_refused_on_a_next_token_task():
    with pytest.raises(ConfigError, match="model.arch = 'mlp' gives one answer per input.*valid there: 'transformer', 'lstm'"):
        validate_experiment({**BASE, "model": {"arch": "mlp"}}).resolve()


def test_lab_train_on_a_next_token_task_resumes_to_the_bit_and_lab_runs_lists_it(tmp_path):
    toml = tmp_path / "rev.toml"
    toml.write_text("\n".join(f"[{section}]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in BASE[section].items())
                              for section in ("task", "model", "train")))
    cli = [sys.executable, "-m", "lab.cli"]
    straight = subprocess.run([*cli, "train", str(toml), "--runs-dir", str(tmp_path), "--name", "straight", "--quiet"],
                              capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    half = subprocess.run([*cli, "train", str(toml), "--runs-dir", str(tmp_path), "--name", "run", "--quiet",
                           "--set", "train.steps=20"], capture_output=True, text=True)
    assert half.returncode == 0, half.stderr
    resumed = subprocess.run([*cli, "train", "--resume", str(tmp_path / "run"), "--set", "train.steps=40", "--quiet"],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 10, 20, 30, 40]
    assert without_time(rows) == without_time(read_jsonl(tmp_path / "straight" / "metrics.jsonl"))
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]  # it learns something in 40 steps (the separator at least)

    run = lab.load_run(tmp_path / "run")
    answer = run.predict("1 2 3 4 |")  # the next token after the whole input: the first of the reversed half
    assert answer.label in run.task.vocab and answer.probabilities.shape == (len(run.task.vocab),)

    listed = subprocess.run([*cli, "runs", "--runs-dir", str(tmp_path), "--json"], capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    runs = {r["name"]: r for r in json.loads(listed.stdout)}
    assert runs["run"]["task"] == "reverse" and runs["run"]["status"] == "finished"


@pytest.mark.filterwarnings("ignore:grad and param do not obey the gradient layout contract")
def test_stacked_members_of_a_next_token_sweep_are_their_standalone_runs(tmp_path):
    cfgs = [config(seed=seed) for seed in (0, 1)]
    # the stacked forward is each member's own, at every position
    resolved = [c.resolve() for c in cfgs]
    ensemble = StackedEnsemble(resolved)
    tokens = make_task(resolved[0].task).split("test").tokens[:16]
    (params,) = ensemble.bucket_params
    logits = ensemble.forward(params, tokens.expand(2, -1, -1))  # (members, batch, pos, vocab)
    expected = torch.stack([build_model(resolved[m].model)(tokens) for m in ensemble.order])
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=1e-6)

    train_ensemble([(c, tmp_path / f"member{m}") for m, c in enumerate(cfgs)], progress=False)
    for m, c in enumerate(cfgs):
        Trainer(c, tmp_path / f"alone{m}", progress=False).run()
        member = read_jsonl(tmp_path / f"member{m}" / "metrics.jsonl")
        alone = read_jsonl(tmp_path / f"alone{m}" / "metrics.jsonl")
        assert [r["step"] for r in member] == [r["step"] for r in alone]
        assert close(member, alone)


@pytest.mark.filterwarnings("ignore:grad and param do not obey the gradient layout contract")
@pytest.mark.parametrize("batch_size", [None, 64])
def test_train_eval_rows_scores_evenly_spaced_training_rows_and_the_whole_test_split(tmp_path, batch_size):
    cfg = validate_experiment({**BASE, "train": {**BASE["train"], "steps": 10, "batch_size": batch_size, "train_eval_rows": 50}})
    Trainer(cfg, tmp_path / "alone", progress=False).run()
    rows = read_jsonl(tmp_path / "alone" / "metrics.jsonl")

    resolved = cfg.resolve()
    task, model = make_task(resolved.task), build_model(resolved.model)  # the run's initial weights
    train, test = task.split("train"), task.split("test")
    index = torch.arange(50) * len(train) // 50
    assert rows[0]["train_loss"] == evaluate(model, Split(train.tokens[index], train.labels[index]), task, resolved)[0]
    assert rows[0]["test_loss"] == evaluate(model, test, task, resolved)[0]
    assert rows[0]["train_loss"] != evaluate(model, train, task, resolved)[0]

    train_ensemble([(cfg, tmp_path / "member")], progress=False)
    member = read_jsonl(tmp_path / "member" / "metrics.jsonl")
    assert member[0]["train_loss"] == pytest.approx(rows[0]["train_loss"], rel=1e-6)
    assert close(member, rows)
