"""The architecture ladder (issue 9): MLP, CNN and perceptron beside the transformer, on both tasks.

Each architecture trains through the one Trainer, resumes bit for bit, loads with `Run.model()`, exposes
its hook points through `run_with_cache`, answers `predict`, has its Fourier analysis (MLP, CNN) or says
in one line that an analysis is not available for it; the ladder experiments match parameter budgets.
"""

import json
import math
import signal
import subprocess
import sys

import pytest
import torch
from conftest import tiny

import lab
from lab.models.architectures import ARCHS, build_model, count_params, n_params, require_attention
from lab.config import load_experiment, load_sweep_table, validate_experiment
from lab.runs.storage import read_jsonl
from lab.tasks import make_task
from lab.training.trainer import Trainer

OTHER_ARCHS = [arch for arch in ARCHS if arch != "transformer"]
WIDTHS = {"mlp_width": 24, "cnn_channels": 12, "cnn_layers": 2, "linear_width": 0, "lstm_hidden": 12}
TINY_AB = {
    "name": "tiny_ab",
    "task": {"name": "a_and_b", "alphabet": "abxy", "max_train_len": 8, "max_test_len": 16, "max_len": 32,
             "n_train": 64, "n_test": 32},
    "model": {"d_model": 8, "n_heads": 2, "d_head": 4, "d_mlp": 16, "positional": "none", **WIDTHS},
    "train": {"steps": 30, "lr": 1e-2, "weight_decay": 0.01, "batch_size": 16, "eval_every": 10,
              "checkpoint_every": 10, "log_checkpoints": 0, "device": "cpu"},
}


def config_for(task: str, arch: str, **train):
    """A tiny experiment of `task` ("modular" or "a_and_b") with `model.arch = arch`."""
    if task == "modular":
        data = json.loads(tiny().model_dump_json())
        data["model"].update(WIDTHS)
    else:
        data = json.loads(json.dumps(TINY_AB))
    data["model"]["arch"] = arch
    data["train"].update(train)
    return validate_experiment(data)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(task, arch) -> a finished tiny run of every architecture on both tasks."""
    runs = {}
    for task in ("modular", "a_and_b"):
        for arch in ARCHS:
            path = tmp_path_factory.mktemp("runs") / f"{task}_{arch}"
            Trainer(config_for(task, arch), path, progress=False).run()
            runs[task, arch] = lab.load_run(path)
    return runs


# --- matched budgets ------------------------------------------------------------------------------


@pytest.mark.parametrize("experiment", ["ladder_modular", "ladder_a_and_b"])
def test_the_ladders_match_parameter_budgets_within_ten_percent(experiment):
    counts = {arch: n_params(load_experiment(experiment, [f"model.arch={arch}"]).resolve().model) for arch in ARCHS}
    reference = counts["transformer"]
    for arch, count in counts.items():
        assert abs(count - reference) <= 0.1 * reference, f"{experiment}: {arch} has {count} parameters, transformer {reference}"
    sweep = load_sweep_table(experiment)  # a sweep over the architecture, several seeds each
    assert sorted(sweep["model.arch"]) == sorted(ARCHS) and sweep["seeds"] >= 2
    if experiment == "ladder_modular":
        assert len(sweep["task.train_frac"]) >= 3


def test_n_params_counts_every_weight():
    config = config_for("modular", "mlp").resolve()
    model = build_model(config.model)
    cfg = config.model  # p = 11: 12 tokens, [a, b, =] concatenated
    expected = cfg.d_vocab * cfg.d_model + (3 * cfg.d_model + 1) * cfg.mlp_width + (cfg.mlp_width + 1) * 11
    assert count_params(model) == n_params(cfg) == expected


# --- training, resume, run folders ----------------------------------------------------------------


@pytest.mark.parametrize("task", ["modular", "a_and_b"])
@pytest.mark.parametrize("arch", OTHER_ARCHS)
def test_each_arch_trains_and_resumes_bit_for_bit(tmp_path, monkeypatch, task, arch):
    config = config_for(task, arch)
    whole = Trainer(config, tmp_path / "whole", progress=False).run()
    assert whole["status"] == "finished" and whole["arch"] == arch and whole["n_params"] == n_params(config.resolve().model)
    rows = read_jsonl(tmp_path / "whole" / "metrics.jsonl")
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]

    # Interrupt a second run after 15 updates the way Ctrl-C does (the trainer's SIGINT handler), then resume.
    update = Trainer.update

    def update_then_interrupt(self):
        update(self)
        if self.step == 15:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(Trainer, "update", update_then_interrupt)
    assert Trainer(config, tmp_path / "cut", progress=False).run()["status"] == "interrupted"
    monkeypatch.setattr(Trainer, "update", update)
    assert Trainer.resume(tmp_path / "cut", progress=False).run(resume=True)["status"] == "finished"

    def without_time(path):
        return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in read_jsonl(path / "metrics.jsonl")]

    assert without_time(tmp_path / "cut") == without_time(tmp_path / "whole")
    for name, weight in lab.load_run(tmp_path / "whole").state_dict().items():
        assert torch.equal(weight, lab.load_run(tmp_path / "cut").state_dict()[name]), name


AB_TOML = """
[task]
name = "a_and_b"
alphabet = "abxy"
max_train_len = 8
max_test_len = 16
max_len = 32
n_train = 64
n_test = 32

[model]
d_model = 8
positional = "none"
cnn_channels = 12

[train]
steps = 20
batch_size = 16
eval_every = 10
device = "cpu"
"""


def test_lab_train_with_arch_from_the_command_line(tmp_path):
    experiment = tmp_path / "ab.toml"
    experiment.write_text(AB_TOML)
    cmd, runs = [sys.executable, "-m", "lab.cli"], ["--runs-dir", str(tmp_path / "runs")]
    done = subprocess.run([*cmd, "train", str(experiment), "--set", "model.arch=cnn", "--name", "cnn_run", "--quiet", *runs],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    run = lab.load_run(tmp_path / "runs" / "cnn_run")
    assert run.arch == "cnn" and run.n_params == n_params(load_experiment(experiment, ["model.arch=cnn"]).resolve().model)
    listing = subprocess.run([*cmd, "runs", *runs], capture_output=True, text=True).stdout.splitlines()
    assert listing[0].split()[:4] == ["name", "task", "arch", "params"]
    assert listing[1].split()[:4] == ["cnn_run", "a_and_b", "cnn", str(run.n_params)]
    bad = subprocess.run([*cmd, "train", str(experiment), "--set", "model.arch=rnn", *runs], capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "'rnn'" in bad.stderr


def test_run_knows_its_parameter_count_and_list_runs_shows_it(trained):
    run = trained["a_and_b", "mlp"]
    assert run.n_params == count_params(run.model()) == run.summary["n_params"]
    row = next(r for r in lab.list_runs(run.path.parent) if r["name"] == run.name)
    assert row["n_params"] == run.n_params and row["arch"] == "mlp"


# --- hooks, prediction ----------------------------------------------------------------------------

HOOKS = {
    "mlp": {"hook_embed", "hook_pooled", "layers.0.hook_pre", "layers.0.hook_post"},
    "cnn": {"hook_embed", "layers.0.hook_pre", "layers.0.hook_post", "layers.1.hook_pre", "layers.1.hook_post", "hook_pooled"},
    "linear": {"hook_features"},
    "lstm": {"hook_embed", "layers.0.hook_h", "layers.0.hook_c"},
    "transformer": {"hook_embed", "blocks.0.attn.hook_pattern", "blocks.0.mlp.hook_post"},
}


@pytest.mark.parametrize("task", ["modular", "a_and_b"])
@pytest.mark.parametrize("arch", ARCHS)
def test_run_with_cache_gives_the_hook_points(trained, task, arch):
    run = trained[task, arch]
    model = run.model()
    tokens = run.task.split("test").tokens[:5]
    logits, cache = model.run_with_cache(tokens)
    assert HOOKS[arch] <= set(cache.keys())
    torch.testing.assert_close(logits[:, run.task.read_position], model.forward_at(tokens, run.task.read_position))
    if arch == "mlp":
        width = model.cfg.mlp_width
        assert cache["layers.0.hook_post"].shape == (5, width)
        d_in = model.cfg.d_model * (3 if task == "modular" else 1)  # [a, b, =] concatenated, or averaged
        assert cache["hook_pooled"].shape == (5, d_in)
    if arch == "cnn":
        assert cache["layers.1.hook_post"].shape == (5, tokens.shape[1], model.cfg.cnn_channels)
        torch.testing.assert_close(cache["hook_pooled"], cache["layers.1.hook_post"].masked_fill(
            (tokens == (run.task.pad_token_id if run.task.pad_token_id is not None else -1))[..., None], -math.inf).amax(1))
    if arch == "lstm":  # the logits read the last layer's h: at every position (modular, causal) or after the last token
        h = cache["layers.0.hook_h"]
        assert h.shape == cache["layers.0.hook_c"].shape == (5, tokens.shape[1], model.cfg.lstm_hidden)
        torch.testing.assert_close(logits, (h if task == "modular" else h[:, -1:]) @ model.W_U + model.b_U)


@pytest.mark.parametrize("arch", ARCHS)
def test_predict_works_for_each_arch(trained, arch):
    for task, text in (("modular", "3 + 4 ="), ("a_and_b", "xaby")):
        run = trained[task, arch]
        prediction = run.predict(text)
        assert prediction.label in run.task.label_names and 0 < prediction.probability <= 1
        assert lab.predict(run.model(), text, task=run.task).label == prediction.label


@pytest.mark.parametrize("arch", ["mlp", "cnn", "linear", "lstm"])
def test_an_answer_does_not_depend_on_the_padding_of_its_batch(arch):
    """Pooled models mask padding and the LSTM skips it: a string scores the same alone and beside a longer one."""
    config = config_for("a_and_b", arch).resolve()
    model, task = build_model(config.model).double(), make_task(config.task)
    alone = model(task.encode_batch(["xab"]))[:, 0]
    padded = model(task.encode_batch(["xab", "yyyyxxxxyyyyab"]))[:1, 0]
    torch.testing.assert_close(alone, padded, rtol=1e-12, atol=1e-12)


def test_a_concatenating_mlp_cannot_read_past_its_window():
    config = config_for("a_and_b", "mlp").resolve()
    model = build_model(config.model.model_copy(update={"mlp_input": "concat"}))
    assert model.layers[0].W_in.shape[0] == config.model.n_ctx * config.model.d_model
    with pytest.raises(ValueError, match="longer than this MLP's window of 33"):
        model(torch.ones(1, 34, dtype=torch.long))


# --- analyses -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", OTHER_ARCHS)
def test_attention_analyses_say_in_one_line_that_the_arch_has_no_attention(trained, arch):
    modular, ab = trained["modular", arch], trained["a_and_b", arch]
    calls = [lambda: lab.attention(ab, "xab"), lambda: lab.modular_attention_grid(modular),
             lambda: lab.ablate_heads(ab), lambda: lab.ablate_heads(ab.model(), task=ab.task),
             lambda: lab.letter_attention(ab), lambda: lab.attention(str(ab.path), "xab")]
    for call in calls:
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value).count("\n") == 0 and f"not available for arch {arch!r}" in str(err.value)
    with pytest.raises(lab.ExportError, match=f"not available for arch {arch!r}"):
        lab.to_transformer_lens(ab.model())
    require_attention(trained["a_and_b", "transformer"], "anything")  # the transformer passes


@pytest.mark.parametrize("arch", ["mlp", "cnn", "lstm"])
def test_fourier_analysis_reads_the_mlp_cnn_and_lstm(trained, arch):
    run = trained["modular", arch]
    norms = lab.fourier_norms(run)
    assert list(norms["frequency"]) == list(range(11 // 2 + 1)) and (norms["embed_norm"] > 0).all()
    neurons = lab.neuron_frequencies(run)
    assert len(neurons) == {"mlp": run.config.model.mlp_width, "cnn": run.config.model.cnn_channels, "lstm": run.config.model.lstm_hidden}[arch]
    frame = lab.progress_measures(run)
    assert len(frame) == len(run.checkpoint_steps) and frame["gini_embed"].notna().all()


def test_fourier_analysis_finds_the_frequency_an_mlp_is_built_with():
    """An MLP whose embedding is cos/sin of frequency 3 and whose neurons add a's and b's cosines has
    every neuron periodic with frequency 3: the key-frequency finder must say 3 and only 3."""
    config = config_for("modular", "mlp").resolve()
    model, task = build_model(config.model).double(), make_task(config.task)
    p, d = task.p, config.model.d_model
    x = torch.arange(p, dtype=torch.float64)
    with torch.no_grad():
        model.W_E.zero_()
        model.W_E[:p, 0], model.W_E[:p, 1] = torch.cos(2 * math.pi * 3 * x / p), torch.sin(2 * math.pi * 3 * x / p)
        W_in = torch.zeros(3 * d, config.model.mlp_width, dtype=torch.float64)
        phases = torch.linspace(0, math.pi, config.model.mlp_width, dtype=torch.float64)
        for position in (0, 1):  # a's block and b's block of the concatenated input
            W_in[position * d] = torch.cos(phases)
            W_in[position * d + 1] = torch.sin(phases)
        model.layers[0].W_in.copy_(W_in)
    keys = lab.key_frequencies(model, task=task)
    assert keys["frequency"].tolist() == [3]


def test_neuron_ablation_of_an_lstm_says_in_one_line_why_not(trained):
    with pytest.raises(ValueError, match="not available for arch 'lstm': its units feed their own recurrence"):
        lab.ablate_neurons(trained["modular", "lstm"], [0])


def test_fourier_analysis_of_a_perceptron_says_it_has_no_neurons(trained):
    with pytest.raises(ValueError, match="not available for arch 'linear'"):
        lab.key_frequencies(trained["modular", "linear"])


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_ablate_neurons_patches_the_hidden_layer(trained, arch):
    run = trained["modular", arch]
    model = run.model()
    width = model.cfg.mlp_width if arch == "mlp" else model.cfg.cnn_channels
    result = lab.ablate_neurons(run, list(range(width)), layer=0 if arch == "mlp" else 1, split="train")
    none, ablated = result.iloc[0], result.iloc[1]  # rows "none" and the neurons ablated
    assert none["accuracy"] == pytest.approx(run.summary["final"]["train_acc"])
    if arch == "mlp":  # every neuron zeroed: the logits are b_U alone, the same for every input
        split = run.task.split("train")
        expected = (model.b_U.argmax() == split.labels).double().mean().item()
        assert ablated["accuracy"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="does not exist"):
        lab.ablate_neurons(run, [width])
