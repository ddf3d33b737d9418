"""The LSTM rung (issue 17, `model.arch = "lstm"`, lab/models/lstm.py).

Its arithmetic is torch.nn.LSTM's (same weights, same numbers and gradients); it reads padding as
nothing; `forward_at` is `forward` at a position; a sweep stacks it (vmap over `functional_call`) and a
stacked member trains as its own `lab train`; it trains from the command line on a next-token task,
alone and in a sweep beside the transformer; and it learns reverse's second half, not its first. Ladder membership (matched parameters,
resume, `run_with_cache`, `predict`, one-line refusals of attention analyses) is tested with the other
rungs in tests/test_ladder.py.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import lab
from lab.config import validate_experiment
from lab.models.architectures import build_model
from lab.runs.storage import read_jsonl
from lab.sweeps.ensemble import StackedEnsemble, train_ensemble
from lab.tasks import make_task
from lab.training.trainer import Trainer
# one_thread: an autouse fixture (one torch thread); an LSTM step is many small operations, and on a busy 2-core
# machine a second thread only waits for a core (measured: a step 30 times slower with two)
from test_sweep_members import (DRIFT_REL_DIFF, TIGHT_REL_DIFF, TIGHT_STEPS, A_AND_B, config, one_thread,  # noqa: F401
                                rel_diff, standalone)

REVERSE = {"name": "reverse", "seq_len": 4, "n_symbols": 6, "n_train": 512, "n_test": 128}


def lstm_config(task: dict, **model):
    return validate_experiment({"task": task, "model": {"arch": "lstm", "d_model": 8, "lstm_hidden": 12, **model}}).resolve()


# --- the arithmetic -----------------------------------------------------------------------------------


def test_lstm_computes_torch_nn_lstm_on_the_same_weights_gradients_included():
    cfg = lstm_config({"name": "modular", "p": 11}, lstm_layers=2)
    model = build_model(cfg.model).double()
    reference = model.torch_lstm()
    assert reference.weight_hh_l1.shape == model.layers[1].weight_hh.shape == (4 * 12, 12)
    embedded = torch.randn(5, 9, 8, dtype=torch.float64)  # (batch, pos, d_model), longer than the task's inputs
    ours = model.layers[1](model.layers[0](embedded, torch.ones(5, 9, dtype=torch.bool)), torch.ones(5, 9, dtype=torch.bool))
    theirs, _ = reference(embedded)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(ours)
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    for index, layer in enumerate(model.layers):
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            torch.testing.assert_close(getattr(layer, name).grad, getattr(reference, f"{name}_l{index}").grad,
                                       rtol=1e-10, atol=1e-12, msg=f"layers.{index}.{name}")


def test_initial_weights_are_nn_lstms_uniform_and_seeded():
    cfg = lstm_config({"name": "modular", "p": 11}, lstm_hidden=64)
    model, again = build_model(cfg.model), build_model(cfg.model)
    bound = 1 / 64**0.5
    weights = torch.cat([p.reshape(-1) for p in model.layers.parameters()])
    assert weights.abs().max() <= bound and weights.abs().max() > 0.99 * bound and abs(weights.mean()) < 0.01 * bound
    other = build_model(cfg.model.model_copy(update={"seed": 1}))
    for (name, param), same, different in zip(model.named_parameters(), again.parameters(), other.parameters()):
        assert torch.equal(param, same), name
        assert name == "b_U" or not torch.equal(param, different), name


def test_forward_at_is_forward_at_that_position():
    causal = build_model(lstm_config(REVERSE).model)
    tokens = make_task(lstm_config(REVERSE).task).split("test").tokens[:6]  # (6, 8)
    every = causal(tokens)
    assert every.shape == (6, 8, 7)
    torch.testing.assert_close(causal.forward_at(tokens, None), every, rtol=0, atol=0)
    for position in (0, 3, -1):
        torch.testing.assert_close(causal.forward_at(tokens, position), every[:, position], rtol=1e-6, atol=1e-6)
    with pytest.raises(IndexError, match="position 8 is outside an input of 8 positions"):
        causal.forward_at(tokens, 8)

    ab = lstm_config(A_AND_B)
    classifier = build_model(ab.model)
    tokens = make_task(ab.task).split("test").tokens[:6]
    assert classifier(tokens).shape == (6, 1, 2)  # one answer, after the whole string
    torch.testing.assert_close(classifier.forward_at(tokens, 0), classifier(tokens)[:, 0])
    with pytest.raises(ValueError, match="not causal: it gives one answer per input"):
        classifier.forward_at(tokens, None)


def test_padding_anywhere_is_read_as_nothing():
    """The state is carried over padding: a sequence's logits are the same alone, padded at the end or at the start."""
    model = build_model(lstm_config(REVERSE).model).double()
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    alone = model(tokens)  # (1, 5, vocab)
    junk = torch.tensor([[0, 5, 5]])
    at_end = model(torch.cat([tokens, junk], 1), key_padding=torch.tensor([[False] * 5 + [True] * 3]))
    torch.testing.assert_close(at_end[:, :5], alone, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(at_end[:, 5:], alone[:, -1:].expand(1, 3, -1), rtol=1e-12, atol=1e-12)  # the last real answer
    at_start = model(torch.cat([junk, tokens], 1), key_padding=torch.tensor([[True] * 3 + [False] * 5]))
    torch.testing.assert_close(at_start[:, 3:], alone, rtol=1e-12, atol=1e-12)
    # a changed padding token changes nothing
    torch.testing.assert_close(model(torch.cat([tokens, junk + 1], 1), key_padding=torch.tensor([[False] * 5 + [True] * 3])),
                               at_end, rtol=0, atol=0)


def test_hook_on_h_changes_what_the_unembedding_reads():
    model = build_model(lstm_config(REVERSE).model)
    tokens = torch.tensor([[1, 2, 3, 4]])
    zeroed = model.run_with_hooks(tokens, fwd_hooks=[("layers.0.hook_h", lambda h, hook: torch.zeros_like(h))])
    torch.testing.assert_close(zeroed, model.b_U.expand(1, 4, -1))


# --- stacked in a sweep ---------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:grad and param do not obey the gradient layout contract")  # flat_grad's rows, on purpose
@pytest.mark.parametrize("task", [{"name": "modular", "p": 11}, A_AND_B, REVERSE], ids=["modular", "a_and_b", "reverse"])
def test_stacked_forward_is_each_lstms_own_forward_at(task):
    cfgs = [lstm_config(task, lstm_layers=2, seed=seed) for seed in range(3)]
    models = [build_model(c.model) for c in cfgs]
    ensemble = StackedEnsemble(cfgs)
    data = make_task(cfgs[0].task)
    tokens = data.split("test").tokens[:20]
    (params,) = ensemble.bucket_params
    logits = ensemble.forward(params, tokens.expand(3, -1, -1))
    expected = torch.stack([models[m].forward_at(tokens, data.read_position) for m in ensemble.order])
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=1e-6)
    weights = torch.randn_like(logits)
    (logits * weights).sum().backward()
    (expected * weights).sum().backward()
    slot = {given: slot for slot, given in enumerate(ensemble.order)}
    for m, model in enumerate(models):
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(ensemble.flat_grad[slot[m]], grads, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("task", [None, A_AND_B], ids=["modular", "a_and_b"])
def test_sweep_member_trains_as_its_standalone_run(tmp_path, task):
    changes = {"model.arch": "lstm", "model.lstm_hidden": 24, "model.seed": 1} | ({"task": task} if task else {})
    members = [config(**changes), config(**changes | {"model.seed": 2})]
    summaries = train_ensemble([(cfg, tmp_path / f"ens_{i}") for i, cfg in enumerate(members)], progress=False)
    standalone(members[0], tmp_path / "std")
    rows, expected = read_jsonl(tmp_path / "ens_0" / "metrics.jsonl"), read_jsonl(tmp_path / "std" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [r["step"] for r in expected] == list(range(0, 101, 10))
    assert rows[0]["weight_norm"] == pytest.approx(expected[0]["weight_norm"], rel=1e-12)
    assert rel_diff(rows, expected, TIGHT_STEPS) < TIGHT_REL_DIFF and rel_diff(rows, expected) < DRIFT_REL_DIFF
    assert expected[-1]["train_loss"] < 0.7 * expected[0]["train_loss"]  # it learned something to compare
    summary = json.loads((tmp_path / "std" / "summary.json").read_text())
    assert summaries[0]["arch"] == summary["arch"] == "lstm" and summaries[0]["n_params"] == summary["n_params"]


# --- from the command line ----------------------------------------------------------------------------

REVERSE_TOML = """
[task]
name = "reverse"
seq_len = 4
n_symbols = 6
n_train = 512
n_test = 128

[model]
d_model = 16
n_heads = 2
d_head = 8
d_mlp = 64
lstm_hidden = 32

[train]
steps = 30
lr = 1e-2
weight_decay = 0.0
batch_size = 64
eval_every = 10
checkpoint_every = 30
log_checkpoints = 0
device = "cpu"
"""


def test_lstm_trains_and_sweeps_beside_the_transformer_from_the_command_line(tmp_path):
    experiment = tmp_path / "reverse.toml"
    experiment.write_text(REVERSE_TOML)
    cmd, runs = [sys.executable, "-m", "lab.cli"], ["--runs-dir", str(tmp_path / "runs")]
    single = os.environ | {"OMP_NUM_THREADS": "1"}  # as `one_thread` does for this process
    trained = subprocess.run([*cmd, "train", str(experiment), "--set", "model.arch=lstm", "--name", "lstm_run", "--quiet", *runs],
                             capture_output=True, text=True, env=single)
    assert trained.returncode == 0, trained.stderr
    run = lab.load_run(tmp_path / "runs" / "lstm_run")
    assert run.arch == "lstm" and run.summary["status"] == "finished"
    rows = read_jsonl(run.path / "metrics.jsonl")
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    tokens = run.task.split("test").tokens[:4]
    assert run.model().forward_at(tokens, None).shape == (4, 8, 7)  # next-token logits at every position

    swept = subprocess.run([*cmd, "sweep", str(experiment), "--grid", "model.arch=lstm,transformer", "--seeds", "1",
                            "--name", "arches", "--quiet", *runs], capture_output=True, text=True, env=single)
    assert swept.returncode == 0, swept.stderr
    summaries = [json.loads(path.read_text()) for path in sorted((tmp_path / "runs" / "arches").glob("*/summary.json"))]
    assert sorted(s["arch"] for s in summaries) == ["lstm", "transformer"]
    assert all(s["status"] == "finished" and s["step"] == 30 for s in summaries)
    # the sweep's LSTM member is the standalone run, to the ensemble's rounding
    member = next(path.parent for path in (tmp_path / "runs" / "arches").glob("*/summary.json")
                  if json.loads(path.read_text())["arch"] == "lstm")
    assert rel_diff(read_jsonl(member / "metrics.jsonl"), rows) < TIGHT_REL_DIFF


def test_lstm_learns_the_second_half_of_reverse_and_not_the_first(tmp_path):
    """Hilton's check, for the LSTM: the second half is copies of tokens already read, the first half is random."""
    data = {"task": REVERSE | {"n_symbols": 8, "n_train": 1536}, "model": {"arch": "lstm", "d_model": 16, "lstm_hidden": 64},
            "train": {"steps": 300, "lr": 1e-2, "weight_decay": 0.0, "batch_size": 128, "eval_every": 300,
                      "checkpoint_every": 300, "log_checkpoints": 0, "device": "cpu"}}
    Trainer(validate_experiment(data), tmp_path / "run", progress=False).run()
    run = lab.load_run(tmp_path / "run")
    model, task = run.model(), run.task
    test = task.split("test")
    right = (model.forward_at(test.tokens, None).argmax(-1) == test.labels).double()  # (batch, pos)
    halves = task.target_halves()
    assert right[:, halves["second"]].mean() > 0.9
    assert right[:, halves["first"]].mean() < 0.3  # chance is 1/8
