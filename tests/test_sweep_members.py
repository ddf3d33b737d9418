"""Sweep members (lab/sweeps/ensemble.py): every member trains as its own `lab train` would.

The stack runs each model's own forward (`torch.func.vmap` over `functional_call`), and every member's
folder is written by the Trainer's run loop, so a member differs from its standalone run only where
a batched kernel rounds differently from the unbatched one: on a CPU, MKL's batched matmul (and
vmap's matmul-then-bias for `addmm`) round some shapes differently in the last bit (measured:
~1e-7 relative per step). So over the first 50 steps of the runs below (modular p = 11, lr 3e-3)
every loss and weight norm agrees to TIGHT_REL_DIFF; later the training dynamics amplify any
rounding difference (Adam divides tiny gradients by their own tiny scale): a standalone run whose
W_E is moved by one ulp drifts as far from itself (test_drift_is_the_dynamics_not_the_ensemble), so
over whole runs the test allows DRIFT_REL_DIFF and asks for the same memorisation and grok steps.
"""

import copy
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lab
import lab.runs.outcomes
from lab.config import validate_experiment
from lab.models.architectures import build_model
from lab.sweeps.ensemble import StackedEnsemble, group_by_shape, train_ensemble
from lab.errors import ConfigError, RunError
from lab.runs.storage import (
    checkpoint_steps,
    load_resume_state,
    read_jsonl,
    save_resume_state,
)
from lab.tasks import make_task
from lab.training.trainer import Trainer
from test_training import wait_for_rows

TIGHT_REL_DIFF = 1e-5  # rows up to TIGHT_STEPS
TIGHT_STEPS = 50
DRIFT_REL_DIFF = 1e-2  # every row

BASE = {
    "name": "ens",
    "task": {"name": "modular", "p": 11, "train_frac": 0.5},
    "model": {"d_model": 32, "n_heads": 2, "d_head": 16, "d_mlp": 64},
    "train": {"steps": 100, "lr": 3e-3, "weight_decay": 1.0, "eval_every": 10, "checkpoint_every": 50,
              "log_checkpoints": 4, "device": "cpu"},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tiny models train fastest on one thread; two threads on a busy 2-core machine wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(**changes):
    """BASE with dotted-key changes, e.g. config(**{"train.lr": 1e-2})."""
    data = copy.deepcopy(BASE)
    for key, value in changes.items():
        if "." not in key:  # a whole section, e.g. task={...}
            data[key] = value
            continue
        section, name = key.split(".")
        data[section][name] = value
    return validate_experiment(data)


def standalone(cfg, run_dir):
    run_dir.mkdir(parents=True)
    return Trainer(cfg, run_dir, progress=False).run()


def rel_diff(rows_a, rows_b, until: int | None = None, keys=("train_loss", "test_loss", "weight_norm")) -> float:
    """The largest relative difference of losses and weight norms between two runs' rows (up to step `until`)."""
    return max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-3) for a, b in zip(rows_a, rows_b) for k in keys
               if until is None or a["step"] <= until)


def close(rows_a, rows_b) -> bool:
    return rel_diff(rows_a, rows_b, TIGHT_STEPS) < TIGHT_REL_DIFF and rel_diff(rows_a, rows_b) < DRIFT_REL_DIFF


def without_times(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("wall_time_s", "started_at", "updated_at", "final")}


# --- the stacked forward pass ------------------------------------------------------------------------

ARCHITECTURES = [
    pytest.param({"name": "modular", "p": 11}, {}, id="one-layer"),
    pytest.param({"name": "modular", "p": 11}, {"positional": "none"}, id="no-positions"),
    pytest.param({"name": "modular", "p": 11}, {"n_layers": 2, "normalization": "LN"}, id="two-layers-LN"),
    pytest.param({"name": "modular", "p": 11}, {"attn_only": True, "act_fn": "gelu"}, id="attn-only-gelu"),
    pytest.param({"name": "a_and_b", "n_train": 64, "n_test": 32, "max_test_len": 40}, {}, id="a_and_b-padding"),
    pytest.param({"name": "a_and_b", "n_train": 64, "n_test": 32, "max_test_len": 40},
                 {"n_layers": 2, "normalization": "LN", "positional": "none"}, id="a_and_b-two-layers"),
    pytest.param({"name": "modular", "p": 11}, {"n_layers": 2, "shared_blocks": True, "attn_score": "general",
                                                "positional": "sinusoidal"}, id="shared-blocks-general"),
    pytest.param({"name": "a_and_b", "n_train": 64, "n_test": 32, "max_test_len": 40},
                 {"n_layers": 2, "residual": False, "attn_score": "additive"}, id="a_and_b-no-residual-additive"),
    pytest.param({"name": "modular", "p": 11}, {"arch": "mlp"}, id="mlp-concat"),
    pytest.param({"name": "a_and_b", "n_train": 64, "n_test": 32, "max_test_len": 40}, {"arch": "mlp"}, id="mlp-mean"),
    pytest.param({"name": "a_and_b", "n_train": 64, "n_test": 32, "max_test_len": 40}, {"arch": "cnn"}, id="cnn"),
    pytest.param({"name": "modular", "p": 11}, {"arch": "linear"}, id="linear-one-hot"),
    pytest.param({"name": "a_and_b", "n_train": 64, "n_test": 32, "max_test_len": 40}, {"arch": "linear"}, id="linear-counts"),
]


@pytest.mark.filterwarnings("ignore:grad and param do not obey the gradient layout contract")  # flat_grad's rows, on purpose
@pytest.mark.parametrize("task, model", ARCHITECTURES)
def test_stacked_forward_is_each_models_own_forward_at(task, model):
    """The stack's forward and its gradients are each member model's `forward_at` (to float rounding)."""
    cfgs = [validate_experiment({"task": task, "model": {"d_model": 16, "n_heads": 2, "d_head": 8, "d_mlp": 32, **model,
                                                         "seed": seed}}).resolve() for seed in range(3)]
    models = [build_model(c.model) for c in cfgs]
    ensemble = StackedEnsemble(cfgs)
    read = make_task(cfgs[0].task).read_position
    tokens = make_task(cfgs[0].task).split("test").tokens[:30]
    (params,) = ensemble.bucket_params  # name -> (3, *shape) leaves whose .grad rows are flat_grad's
    logits = ensemble.forward(params, tokens.expand(3, -1, -1))  # (3, batch, vocab)
    stack_position = {given: slot for slot, given in enumerate(ensemble.order)}
    expected = torch.stack([models[m].forward_at(tokens, read) for m in ensemble.order])
    assert logits.shape == expected.shape == (3, 30, cfgs[0].model.d_vocab_out)
    # a model alone attends through SDPA, the vmapped stack explicitly (SDPA has no batching rule there): with
    # two layers they round apart by up to 2e-6 in the logits, 1e-6 of the largest gradient in the gradients
    torch.testing.assert_close(logits, expected, atol=4e-6, rtol=1e-6)
    weights = torch.randn_like(logits)
    (logits * weights).sum().backward()
    (expected * weights).sum().backward()
    for m, model in enumerate(models):
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(ensemble.flat_grad[stack_position[m]], grads, atol=2e-6 * grads.abs().max().item(), rtol=1e-5)


# --- members equal standalone runs ----------------------------------------------------------------------

A_AND_B = {"name": "a_and_b", "n_train": 64, "n_test": 32, "max_test_len": 40}
# The concatenating MLP memorises p = 11 by step 50 while its test loss climbs steeply: its members' rounding
# differences grow from 1e-7 at step 40 to 1e-4 at step 80 (measured), so it is held tight for 40 steps.
TIGHT_STEPS_OF = {"mlp": 40}

VARIANTS = {
    "base": {},
    "seed": {"model.seed": 1},
    "data_seed": {"task.data_seed": 1},
    "train_frac": {"task.train_frac": 0.7},
    "lr": {"train.lr": 5e-3},
    "weight_decay": {"train.weight_decay": 0.3},
    "betas": {"train.betas": [0.8, 0.99]},
    "no_warmup": {"train.warmup_steps": 0},
    "mini_batch": {"train.batch_size": 24},
    "float64_loss": {"train.loss_dtype": "float64"},
    "stablemax_orthograd": {"train.loss": "stablemax", "train.orthograd": True},
    "grokfast_ema": {"train.grad_filter": {"kind": "ema", "alpha": 0.9, "lamb": 1.0}},
    "grokfast_ma": {"train.grad_filter": {"kind": "ma", "window": 5, "lamb": 1.0}},
    # every model family the ladder has, on the modular task and on a_and_b (padding)
    "two_layers_ln": {"model.n_layers": 2, "model.normalization": "LN"},
    "attn_only_gelu": {"model.attn_only": True, "model.act_fn": "gelu"},
    "mlp": {"model.arch": "mlp"},
    "cnn": {"model.arch": "cnn"},
    "linear": {"model.arch": "linear"},
    "a_and_b": {"task": A_AND_B},
    "a_and_b_mlp": {"task": A_AND_B, "model.arch": "mlp"},
    "a_and_b_cnn": {"task": A_AND_B, "model.arch": "cnn"},
    "a_and_b_linear": {"task": A_AND_B, "model.arch": "linear"},
}


@pytest.fixture(scope="module")
def ensemble_and_standalone(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    configs = {name: config(**changes) for name, changes in VARIANTS.items()}
    summaries = train_ensemble([(cfg, root / f"ens_{name}") for name, cfg in configs.items()], progress=False)
    for name, cfg in configs.items():
        standalone(cfg, root / f"std_{name}")
    return root, dict(zip(configs, summaries))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_member_matches_its_standalone_run(ensemble_and_standalone, name):
    root, summaries = ensemble_and_standalone
    ens, std = root / f"ens_{name}", root / f"std_{name}"
    rows, expected = read_jsonl(ens / "metrics.jsonl"), read_jsonl(std / "metrics.jsonl")
    assert [r["step"] for r in rows] == [r["step"] for r in expected] == list(range(0, 101, 10))
    assert [set(r) for r in rows] == [set(r) for r in expected]
    assert [r["lr"] for r in rows] == [r["lr"] for r in expected]
    assert rows[0]["weight_norm"] == pytest.approx(expected[0]["weight_norm"], rel=1e-12)  # the same initial weights
    assert rel_diff(rows, expected, TIGHT_STEPS_OF.get(name, TIGHT_STEPS)) < TIGHT_REL_DIFF
    assert rel_diff(rows, expected) < DRIFT_REL_DIFF
    for key in ("train_acc", "test_acc"):  # at most one example decided differently at a row
        assert max(abs(r[key] - e[key]) for r, e in zip(rows, expected)) <= 1 / 30 + 1e-12
    summary, std_summary = summaries[name], json.loads((std / "summary.json").read_text())
    assert summary == json.loads((ens / "summary.json").read_text())
    assert without_times(summary) | {"name": None} == without_times(std_summary) | {"name": None}
    assert checkpoint_steps(ens) == checkpoint_steps(std)
    state, std_state = load_resume_state(ens), load_resume_state(std)
    assert state.step == std_state.step == 100
    assert state.optimizer.keys() == std_state.optimizer.keys()
    assert {k: set(v) for k, v in state.optimizer.items()} == {k: set(v) for k, v in std_state.optimizer.items()}
    assert state.grad_filter.keys() == std_state.grad_filter.keys()
    for key, weight in state.model.items():
        if key.endswith("attn.b_K"):
            # q·b_K is the same for every key, and softmax ignores what all keys share: b_K's gradient is
            # zero in exact arithmetic, so AdamW walks it by rounding noise alone, in any implementation
            continue
        assert (weight - std_state.model[key]).norm() <= DRIFT_REL_DIFF * std_state.model[key].norm(), key


def test_variants_memorise_and_generalise_at_the_standalone_steps(ensemble_and_standalone):
    root, summaries = ensemble_and_standalone
    memorised = 0
    for name, summary in summaries.items():
        std_summary = json.loads((root / f"std_{name}" / "summary.json").read_text())
        assert (summary["memorize_step"], summary["grok_step"]) == (std_summary["memorize_step"], std_summary["grok_step"]), name
        memorised += summary["memorize_step"] is not None
    assert memorised >= len(VARIANTS) // 2  # the comparison above is about something


def test_drift_is_the_dynamics_not_the_ensemble(tmp_path):
    """In a chaotic regime (lr 1e-2, weight decay 3), one ulp in the initial W_E moves a standalone run
    as far from itself as the ensemble member is from it: the ensemble adds no error of its own."""
    cfg = config(**{"task.train_frac": 0.8, "train.lr": 1e-2, "train.weight_decay": 3.0, "train.steps": 200})
    standalone(cfg, tmp_path / "std")
    train_ensemble([(cfg, tmp_path / "ens")], progress=False)
    (tmp_path / "ulp").mkdir()
    nudged = Trainer(cfg, tmp_path / "ulp", progress=False)
    with torch.no_grad():
        nudged.model.W_E.mul_(1 + 2**-23)
    nudged.run()
    std = read_jsonl(tmp_path / "std" / "metrics.jsonl")
    ensemble_drift = rel_diff(read_jsonl(tmp_path / "ens" / "metrics.jsonl"), std)
    ulp_drift = rel_diff(read_jsonl(tmp_path / "ulp" / "metrics.jsonl"), std)
    assert ulp_drift > 1e-3  # the regime is chaotic: the test can tell drift from error
    assert ensemble_drift < 30 * ulp_drift


# --- members that stop, resume, and live in ordinary run folders --------------------------------------------


def test_member_that_groks_stops_early_and_leaves_the_others_running(tmp_path):
    groks = config(**{"task.train_frac": 0.95, "train.lr": 4e-3, "train.weight_decay": 2.0, "train.stop_after_grok": 20,
                      "train.steps": 150})
    keeps_going = config(**{"train.steps": 150})
    early, full = train_ensemble([(groks, tmp_path / "groks"), (keeps_going, tmp_path / "full")], progress=False)
    std = standalone(groks, tmp_path / "std")
    assert early["grok_step"] is not None and early["status"] == "finished"
    assert early["step"] == std["step"] == early["grok_step"] + 20 < 150
    assert (early["memorize_step"], early["grok_step"]) == (std["memorize_step"], std["grok_step"])
    rows, expected = read_jsonl(tmp_path / "groks" / "metrics.jsonl"), read_jsonl(tmp_path / "std" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [r["step"] for r in expected]
    assert rel_diff(rows, expected, TIGHT_STEPS) < TIGHT_REL_DIFF
    assert checkpoint_steps(tmp_path / "groks") == checkpoint_steps(tmp_path / "std")
    assert full["status"] == "finished" and full["step"] == 150
    assert read_jsonl(tmp_path / "full" / "metrics.jsonl")[-1]["step"] == 150


def test_progress_bar_of_members_that_stop_early_ends_full_and_says_why(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lab.runs.outcomes, "GROK_ACC", 0.0)  # grokked at step 0: both stop at their first eval >= 20
    members = [(config(**{"train.stop_after_grok": 20, "model.seed": seed}), tmp_path / f"m{seed}") for seed in (0, 1)]
    summaries = train_ensemble(members, progress=True)
    assert [s["step"] for s in summaries] == [20, 20]
    last_frame = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "100%" in last_frame and "20/20" in last_frame, last_frame
    assert "stopped early: 2 grokked (stop_after_grok)" in last_frame


def stop_after(calls: int):
    """A `stop` callable that asks to stop on its `calls`-th question (one question per step)."""
    asked = [0]

    def stop() -> bool:
        asked[0] += 1
        return asked[0] >= calls

    return stop


def test_interrupted_ensemble_resumes_to_exactly_the_uninterrupted_result(tmp_path):
    configs = [config(), config(**{"model.seed": 1, "task.train_frac": 0.7}), config(**{"train.batch_size": 24})]
    train_ensemble([(cfg, tmp_path / f"straight{i}") for i, cfg in enumerate(configs)], progress=False)
    members = [(cfg, tmp_path / f"cut{i}") for i, cfg in enumerate(configs)]
    first = train_ensemble(members, progress=False, stop=stop_after(37))
    assert [s["status"] for s in first] == ["interrupted"] * 3
    assert [s["step"] for s in first] == [36] * 3
    assert all(load_resume_state(tmp_path / f"cut{i}").step == 36 for i in range(3))
    second = train_ensemble(members, progress=False)
    assert [s["status"] for s in second] == ["finished"] * 3
    for i in range(3):
        cut, straight = read_jsonl(tmp_path / f"cut{i}" / "metrics.jsonl"), read_jsonl(tmp_path / f"straight{i}" / "metrics.jsonl")
        assert [{k: v for k, v in r.items() if k != "elapsed_s"} for r in cut] == \
               [{k: v for k, v in r.items() if k != "elapsed_s"} for r in straight]
        # plus the checkpoint the interruption wrote
        assert checkpoint_steps(tmp_path / f"cut{i}") == sorted({*checkpoint_steps(tmp_path / f"straight{i}"), 36})
    # finished members are left alone when the same sweep runs again
    before = [json.loads((tmp_path / f"cut{i}" / "summary.json").read_text()) for i in range(3)]
    assert train_ensemble(members, progress=False) == before


def test_member_killed_mid_sweep_resumes_beside_fresh_members(tmp_path):
    """One member stopped at step 30 continues from its resume state while another starts at 0, in one stack:
    the resumed member ends exactly where its uninterrupted training ends, the fresh one as its `lab train`."""
    killed, fresh = config(**{"model.seed": 2}), config(**{"train.lr": 5e-3})
    train_ensemble([(killed, tmp_path / "killed")], progress=False, stop=stop_after(31))
    assert load_resume_state(tmp_path / "killed").step == 30
    summaries = train_ensemble([(killed, tmp_path / "killed"), (fresh, tmp_path / "fresh")], progress=False)
    assert [s["status"] for s in summaries] == ["finished", "finished"]
    train_ensemble([(killed, tmp_path / "straight")], progress=False)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]  # noqa: E731
    assert strip(read_jsonl(tmp_path / "killed" / "metrics.jsonl")) == strip(read_jsonl(tmp_path / "straight" / "metrics.jsonl"))
    standalone(fresh, tmp_path / "std_fresh")
    rows, expected = read_jsonl(tmp_path / "fresh" / "metrics.jsonl"), read_jsonl(tmp_path / "std_fresh" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [r["step"] for r in expected]
    assert close(rows, expected)


def test_lab_train_resume_continues_an_ensemble_member(tmp_path):
    cfg = config(**{"train.grad_filter": {"kind": "ema"}})
    train_ensemble([(cfg, tmp_path / "member")], progress=False, stop=stop_after(43))
    assert json.loads((tmp_path / "member" / "summary.json").read_text())["status"] == "interrupted"
    summary = Trainer.resume(tmp_path / "member", progress=False).run(resume=True)
    standalone(cfg, tmp_path / "std")
    assert summary["status"] == "finished" and summary["step"] == 100
    rows, expected = read_jsonl(tmp_path / "member" / "metrics.jsonl"), read_jsonl(tmp_path / "std" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [r["step"] for r in expected]
    assert close(rows, expected)


def test_member_folders_load_like_any_run(tmp_path):
    (summary,) = train_ensemble([(config(), tmp_path / "member")], progress=False)
    run = lab.load_run(tmp_path / "member")
    assert run.summary == summary and run.summary["status"] == "finished"
    assert list(run.metrics["step"]) == list(range(0, 101, 10))
    assert run.checkpoint_steps[-1] == 100
    model = run.model()
    state = load_resume_state(tmp_path / "member")
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), state.model[name])
    tokens = run.task.split("test").tokens
    acc = (model.forward_at(tokens, run.task.read_position).argmax(-1) == run.task.split("test").labels).float().mean()
    assert acc.item() == pytest.approx(run.metrics["test_acc"].iloc[-1])


# --- grouping, fallbacks and bad input -----------------------------------------------------------------------


def test_group_by_shape_splits_shapes_and_keeps_ma_rings_apart():
    configs = [
        config(),
        config(**{"model.seed": 3, "train.weight_decay": 0.1, "task.train_frac": 0.3}),  # same shapes
        config(**{"model.d_model": 16, "model.d_head": 8}),  # another shape
        config(**{"train.grad_filter": {"kind": "ma", "window": 5}}),  # MA filter: its rings in a group of their own
        config(**{"task.p": 13}),  # another vocabulary
        config(**{"model.d_model": 16, "model.d_head": 8, "model.seed": 1}),
    ]
    assert group_by_shape(configs) == [[0, 1], [2, 5], [3], [4]]
    with pytest.raises(ConfigError, match="differ in model shape"):
        StackedEnsemble([configs[0], configs[2]])


def test_mixed_members_train_in_groups(tmp_path):
    ma = config(**{"train.grad_filter": {"kind": "ma", "window": 5}, "train.steps": 30})
    small = config(**{"model.d_model": 16, "model.d_head": 8, "train.steps": 30})
    mlp = config(**{"model.arch": "mlp", "train.steps": 30})
    base = config(**{"train.steps": 30})
    members = [(base, tmp_path / "a"), (ma, tmp_path / "ma"), (small, tmp_path / "small"), (mlp, tmp_path / "mlp")]
    summaries = train_ensemble(members, progress=False)
    assert [s["status"] for s in summaries] == ["finished"] * 4
    assert [s["step"] for s in summaries] == [30] * 4
    assert [s["arch"] for s in summaries] == ["transformer", "transformer", "transformer", "mlp"]
    for cfg, folder in members:
        standalone(cfg, tmp_path / f"std_{folder.name}")
        assert close(read_jsonl(folder / "metrics.jsonl"), read_jsonl(tmp_path / f"std_{folder.name}" / "metrics.jsonl"))


def test_folder_of_another_config_or_a_shared_folder_is_refused(tmp_path):
    train_ensemble([(config(**{"train.steps": 10}), tmp_path / "taken")], progress=False)
    with pytest.raises(RunError, match="different config"):
        train_ensemble([(config(**{"train.steps": 20}), tmp_path / "taken")], progress=False)
    with pytest.raises(RunError, match="share the run folder"):
        train_ensemble([(config(), tmp_path / "x"), (config(**{"model.seed": 1}), tmp_path / "x")], progress=False)


def test_diverging_member_stops_like_the_trainer_and_the_others_go_on(tmp_path):
    wild = config(**{"train.lr": 1e6, "train.warmup_steps": 0, "train.steps": 40})
    calm = config(**{"train.steps": 40})
    diverged, finished = train_ensemble([(wild, tmp_path / "wild"), (calm, tmp_path / "calm")], progress=False)
    std = standalone(wild, tmp_path / "std")
    assert std["status"] == "diverged"
    assert diverged["status"] == "diverged" and diverged["diverged_at"] == std["diverged_at"]
    assert "lower train.lr" in diverged["hint"]
    assert finished["status"] == "finished" and finished["step"] == 40
    assert math.isfinite(read_jsonl(tmp_path / "calm" / "metrics.jsonl")[-1]["train_loss"])


# --- interruption of a real process ---------------------------------------------------------------------

SWEEP_SCRIPT = """
import json, sys
from pathlib import Path
from lab.config import validate_experiment
from lab.sweeps.ensemble import train_ensemble
members = [(validate_experiment(data), Path(folder)) for data, folder in json.loads(sys.argv[1])]
train_ensemble(members, progress=False)
"""


def sweep_process(members: list[tuple[dict, Path]]) -> subprocess.Popen:
    spec = json.dumps([(data, str(folder)) for data, folder in members])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", SWEEP_SCRIPT, spec], env=env, stderr=subprocess.PIPE, text=True)


def long_members(root: Path) -> list[tuple[dict, Path]]:
    """Three members, one with mini-batches and one with a Grokfast filter: resume must restore both."""
    base = copy.deepcopy(BASE)
    base["train"].update(steps=800, eval_every=20, checkpoint_every=100)
    variants = [{}, {"batch_size": 24}, {"grad_filter": {"kind": "ema", "alpha": 0.9, "lamb": 1.0}, "lr": 2e-3}]
    return [({**base, "train": {**base["train"], **change}}, root / f"m{i}") for i, change in enumerate(variants)]


@pytest.fixture(scope="module")
def uninterrupted_sweep(tmp_path_factory):
    """The same sweep uninterrupted, in this process on one thread (`one_thread`), as the sweep processes run."""
    root = tmp_path_factory.mktemp("straight")
    train_ensemble([(validate_experiment(data), folder) for data, folder in long_members(root)], progress=False)
    return [read_jsonl(folder / "metrics.jsonl") for _, folder in long_members(root)]


def test_sweep_process_killed_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted_sweep):
    members = long_members(tmp_path)
    proc = sweep_process(members)
    wait_for_rows(members[0][1] / "metrics.jsonl", 250)  # past two checkpoints
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    statuses = [json.loads((folder / "summary.json").read_text())["status"] for _, folder in members]
    assert proc.returncode == -signal.SIGKILL and statuses == ["running"] * 3
    assert all(read_jsonl(folder / "metrics.jsonl")[-1]["step"] < 800 for _, folder in members)

    done = sweep_process(members)  # the same sweep again continues every member from its last checkpoint
    assert done.wait(timeout=300) == 0, done.stderr.read()
    for (_, folder), expected in zip(members, uninterrupted_sweep):
        rows = read_jsonl(folder / "metrics.jsonl")
        assert [r["step"] for r in rows] == [r["step"] for r in expected]  # none lost, none repeated
        strip = lambda rs: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rs]
        assert strip(rows) == strip(expected)  # the same numbers, to the bit
        assert json.loads((folder / "summary.json").read_text())["status"] == "finished"


def test_ctrl_c_checkpoints_every_member_and_stops_later_groups(tmp_path):
    """SIGINT (as Ctrl-C sends it) between steps: every running member is checkpointed at its step and
    marked interrupted; the group of another shape after it does not start."""
    calls = [0]

    def press_ctrl_c_once() -> bool:
        calls[0] += 1
        if calls[0] == 25:
            os.kill(os.getpid(), signal.SIGINT)
        return False

    members = [(config(), tmp_path / "a"), (config(**{"model.seed": 1}), tmp_path / "b"),
               (config(**{"model.d_model": 16, "model.d_head": 8}), tmp_path / "later")]
    summaries = train_ensemble(members, progress=False, stop=press_ctrl_c_once)
    assert [s["status"] for s in summaries[:2]] == ["interrupted", "interrupted"]
    assert summaries[0]["step"] == summaries[1]["step"] == load_resume_state(tmp_path / "a").step == 25
    assert summaries[2]["status"] == "not started" and not (tmp_path / "later" / "summary.json").exists()
    assert [s["status"] for s in train_ensemble(members, progress=False)] == ["finished"] * 3


def test_resume_state_that_does_not_fit_is_one_clear_error(tmp_path):
    member = (config(), tmp_path / "m")
    train_ensemble([member], progress=False, stop=stop_after(5))
    state = load_resume_state(tmp_path / "m")
    state.model["W_U"] = state.model["W_U"][:, :3]
    save_resume_state(tmp_path / "m", state)
    with pytest.raises(RunError, match=r"does not fit this run's config.json \(model/W_U has shape \[32, 3\]"):
        train_ensemble([member], progress=False)


def test_bench_sweep_reports_its_figures():
    """`lab bench`'s sweep figures (a smoke test of the harness: one timed round, no speed asserted)."""
    from lab.bench.sweep import bench_sweep, sweep_configs

    configs = sweep_configs("small")
    assert len(configs) == 64 and len(group_by_shape(configs)) == 1
    assert sorted({(c.train.weight_decay, c.task.train_frac, c.model.seed) for c in configs}) == sorted(
        (w, f, s) for w in (0.1, 0.3, 1.0, 3.0) for f in (0.3, 0.4, 0.5, 0.6) for s in range(4))
    result = bench_sweep(rounds=1, sizes=("small",), log=lambda message: None)
    figures = result["small"]
    assert figures["members"] == 64
    for key in ("speedup_vs_sequential", "member_steps_per_s", "ensemble_step_ms", "sequential_step_ms",
                "share_of_matmul_peak", "matmul_peak_gflops_per_s", "restack_ms"):
        assert figures[key] > 0 and math.isfinite(figures[key]), key
