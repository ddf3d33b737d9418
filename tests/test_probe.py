"""The REPL probe API as a user calls it: load_run, predict, attention, ablations, letter attention, grids."""

from __future__ import annotations

import json

import pytest
import torch

import lab
from runs_for_tests import a_and_b_run, grokked_run, make_unreadable, runs_root, tiny_modular_run  # noqa: F401  (fixtures)

# --- the run API ----------------------------------------------------------------------------------


def test_load_run_by_path_and_by_name(grokked_run):
    by_name = lab.load_run("modadd_quick", runs_dir=grokked_run.path.parent)
    assert by_name.path == grokked_run.path
    assert grokked_run.checkpoint_steps == sorted(grokked_run.checkpoint_steps)
    assert grokked_run.checkpoint_steps[-1] == 500
    assert list(grokked_run.metrics["step"])[-1] == 500
    assert grokked_run.task.p == 23
    model = grokked_run.model()
    assert not model.training and model.device.type == "cpu"
    rows = lab.list_runs(grokked_run.path.parent)
    assert "modadd_quick" in [row["name"] for row in rows]


def test_missing_and_damaged_runs_name_the_file(tmp_path, tiny_modular_run):
    with pytest.raises(lab.RunError, match="no run"):
        lab.load_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(lab.RunError, match="config.json"):
        lab.load_run(tmp_path / "empty")
    import shutil

    damaged = shutil.copytree(tiny_modular_run.path, tmp_path / "damaged")
    (damaged / "config.json").write_text("{not json")
    with pytest.raises(lab.RunError, match=r"config\.json: damaged JSON"):
        lab.load_run(damaged).config
    (damaged / "config.json").write_text((tiny_modular_run.path / "config.json").read_text())
    last = sorted((damaged / "checkpoints").iterdir())[-1]
    last.write_bytes(b"truncated")
    with pytest.raises(lab.RunError, match=last.name):
        lab.load_run(damaged).model()


def test_predict_text_and_tokens(grokked_run):
    prediction = grokked_run.predict("12 + 5 =")
    assert isinstance(prediction, lab.Prediction)
    assert prediction.label == "17" and prediction.label_id == 17
    assert prediction.probabilities.shape == (23,)
    assert prediction.probability == pytest.approx(float(prediction.probabilities.max()))
    assert float(prediction.probabilities.sum()) == pytest.approx(1.0, abs=1e-5)
    same = grokked_run.predict([12, 5, 23])
    assert same.label == "17" and same.probability == pytest.approx(prediction.probability)
    early = grokked_run.predict("12 + 5 =", step=0)
    assert early.probability < 0.5  # the untrained model is unsure


def test_predict_bad_input_gives_clear_errors(grokked_run):
    with pytest.raises(ValueError, match="number 40 .* out of range: this task's numbers are 0..22"):
        grokked_run.predict("40 + 1 =")
    with pytest.raises(ValueError, match="token id 99 is out of range"):
        grokked_run.predict([1, 99, 23])
    with pytest.raises(ValueError, match="no checkpoint at step 123 .* saved steps: 0, "):
        grokked_run.predict("1 + 2 =", step=123)
    with pytest.raises(ValueError, match="longer than this model's n_ctx of 3"):
        grokked_run.predict([1, 2, 3, 23])


# --- attention ------------------------------------------------------------------------------------


def test_attention_modular(grokked_run):
    result = lab.attention(grokked_run, "12 + 34 =".replace("34", "5"))
    assert isinstance(result, lab.AttentionResult)
    assert result.pattern.shape == (1, 4, 3, 3) and result.pattern.dtype == torch.float32
    assert result.tokens == ["12", "5", "="] and result.token_ids == [12, 5, 23]
    assert result.prediction == "17" and result.step == 500
    assert torch.allclose(result.pattern.sum(-1), torch.ones(1, 4, 3))
    assert result.pattern.triu(1).abs().max() == 0  # causal
    early = lab.attention(grokked_run, "12 + 5 =", step=0)
    assert early.step == 0 and not torch.allclose(early.pattern, result.pattern)


def test_attention_a_and_b_and_bare_model(a_and_b_run):
    result = lab.attention(a_and_b_run, "a cab")
    assert result.pattern.shape == (1, 2, 6, 6)
    assert result.tokens == ["<cls>", "a", "␣", "c", "a", "b"]
    assert result.prediction == "yes" and result.probability > 0.5
    assert result.pattern.triu(1).abs().max() > 0  # bidirectional
    assert lab.attention(a_and_b_run, "ccc").prediction == "no"
    model, task = a_and_b_run.model(), a_and_b_run.task
    bare = lab.attention(model, "a cab", task=task)
    assert bare.step is None and torch.equal(bare.pattern, result.pattern)
    with pytest.raises(ValueError, match="a bare model has no task"):
        lab.attention(model, "a cab")
    with pytest.raises(ValueError, match="needs a Run"):
        lab.attention(model, "a cab", step=0, task=task)


def test_attention_bad_text(a_and_b_run, grokked_run):
    with pytest.raises(ValueError, match="character 'A' is not in this task's alphabet"):
        lab.attention(a_and_b_run, "Abc")
    with pytest.raises(ValueError, match="text of 65 characters is longer than this task's max_len of 64"):
        lab.attention(a_and_b_run, "a" * 65)
    with pytest.raises(ValueError, match="cannot read 'hello'"):
        lab.attention(grokked_run, "hello")
    with pytest.raises(ValueError, match="no checkpoint at step 7"):
        lab.attention(a_and_b_run, "ab", step=7)


def test_modular_attention_grid_matches_attention(grokked_run, a_and_b_run):
    grid = lab.modular_attention_grid(grokked_run)
    assert grid.shape == (1, 4, 23, 23)
    single = lab.attention(grokked_run, "12 + 5 =")
    assert torch.allclose(grid[:, :, 12, 5], single.pattern[:, :, -1, 0], atol=1e-6)
    with pytest.raises(ValueError, match="for modular runs"):
        lab.modular_attention_grid(a_and_b_run)


# --- ablations ------------------------------------------------------------------------------------


def test_ablate_heads_columns_and_a_needed_head(grokked_run):
    frame = lab.ablate_heads(grokked_run)
    assert list(frame.columns) == ["component", "layer", "head", "loss", "accuracy", "delta_loss", "delta_accuracy"]
    assert list(frame["component"]) == ["none", "L0H0", "L0H1", "L0H2", "L0H3"]
    none = frame.iloc[0]
    assert none["layer"] is None and none["head"] is None and none["delta_loss"] == 0
    assert none["accuracy"] == pytest.approx(grokked_run.metrics.iloc[-1]["test_acc"])
    assert frame.iloc[1]["layer"] == 0 and frame.iloc[2]["head"] == 1
    # Every head carries part of a or b to the `=` position: removing any one of them costs accuracy.
    assert frame["delta_accuracy"].iloc[1:].max() < -0.05
    mean = lab.ablate_heads(grokked_run, split="train", method="mean")
    assert mean.iloc[0]["accuracy"] == 1.0 and mean["delta_loss"].iloc[1:].min() > 0


def test_ablate_heads_bad_arguments(grokked_run):
    with pytest.raises(ValueError, match="unknown ablation method 'resample'; valid: 'zero', 'mean'"):
        lab.ablate_heads(grokked_run, method="resample")
    with pytest.raises(ValueError, match="unknown split 'val'; valid: 'train', 'test'"):
        lab.ablate_heads(grokked_run, split="val")


def test_ablate_neurons_is_a_table_like_ablate_heads(grokked_run):
    d_mlp = grokked_run.config.model.d_mlp
    everything = lab.ablate_neurons(grokked_run, list(range(d_mlp)))
    assert list(everything.columns) == ["component", "layer", "neurons", "loss", "accuracy", "delta_loss", "delta_accuracy"]
    assert list(everything["component"]) == ["none", f"L0 MLP ({d_mlp} neurons)"]
    none, ablated = everything.iloc[0], everything.iloc[1]
    assert none["layer"] is None and none["neurons"] is None and none["delta_loss"] == 0
    assert ablated["layer"] == 0 and ablated["neurons"] == list(range(d_mlp))
    assert none["accuracy"] == pytest.approx(grokked_run.metrics.iloc[-1]["test_acc"])
    assert ablated["delta_accuracy"] == ablated["accuracy"] - none["accuracy"] < -0.5  # the MLP does the work
    nothing = lab.ablate_neurons(grokked_run, [])
    assert nothing.iloc[1]["component"] == "L0 MLP (0 neurons)" and nothing.iloc[1]["delta_loss"] == 0
    with pytest.raises(ValueError, match=f"neuron {d_mlp} does not exist: this model's neurons are 0..{d_mlp - 1}"):
        lab.ablate_neurons(grokked_run, [d_mlp])
    with pytest.raises(ValueError, match="layer 1 does not exist"):
        lab.ablate_neurons(grokked_run, [0], layer=1)


# --- a_and_b: which head finds which letter -------------------------------------------------------


def test_letter_attention_names_a_head_per_letter(a_and_b_run, grokked_run):
    frame = lab.letter_attention(a_and_b_run)
    assert {"component", "layer", "head", "mass_on_a", "mass_on_b", "ablated_accuracy"} <= set(frame.columns)
    assert list(frame["component"]) == ["L0H0", "L0H1"]
    assert frame[["mass_on_a", "mass_on_b"]].stack().between(0, 1).all()
    # This model splits the work: one head finds `a`, the other `b`, and each is needed.
    assert sorted(frame["finds"]) == ["a", "b"]
    accuracy = a_and_b_run.metrics.iloc[-1]["test_acc"]
    assert (frame["ablated_accuracy"] < accuracy - 0.05).all()
    with pytest.raises(ValueError, match="for a_and_b runs"):
        lab.letter_attention(grokked_run)


# --- the fast ablation path against the plain hook-based computation --------------------------------
# The reference below is the straightforward way (what lab did before the fast path): a full forward
# over every position with `run_with_hooks` patching the component, one forward per head.


def reference_ablation(model, task, split, method, hook_name, index, loss_kind="softmax"):
    """(loss, accuracy) on `split` with act[index] of `hook_name` zeroed or set to its per-position mean."""
    from lab.training.losses import task_loss

    data = task.split(split)
    real = (data.tokens != task.pad_token_id).float() if task.pad_token_id is not None else torch.ones(data.tokens.shape)
    hooks = []
    if hook_name is not None:
        value = 0.0
        if method == "mean":
            _, cache = model.run_with_cache(data.tokens, names_filter=hook_name)
            act = cache[hook_name]
            mask = real.reshape(*real.shape, *([1] * (act.ndim - 2)))
            value = (act * mask).sum(0) / mask.sum(0).clamp(min=1)  # (pos, ...)

        def patch(act, hook):
            act = act.clone()
            act[index] = value if isinstance(value, float) else value.expand_as(act)[index]
            return act

        hooks = [(hook_name, patch)]
    with torch.no_grad():
        logits = model.run_with_hooks(data.tokens, fwd_hooks=hooks)[:, task.read_position]
    loss = task_loss(logits, data.labels, loss_kind, torch.float64).item()
    return loss, (logits.argmax(-1) == data.labels).double().mean().item()


def reference_letter_masses(model, task, split):
    """(layer, head) mean <cls> attention on `a` (strings with an a) and on `b`, from the full patterns."""
    tokens = task.split(split).tokens
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    rows = torch.stack([cache["pattern", layer][:, :, task.read_position] for layer in range(model.cfg.n_layers)], 1)
    masses = []
    for letter in "ab":
        is_letter = (tokens == task.vocab.index(letter)).double()
        has = is_letter.sum(-1) > 0
        masses.append((rows.double() * is_letter[:, None, None]).sum(-1)[has].mean(0))
    return masses


def untrained_models():
    """Untrained models: 2-layer causal with positions (modular) and bidirectional with padding (a_and_b),
    so that earlier-layer ablations, LayerNorm and padding all take the general path; and a 1-layer
    a_and_b model whose test strings are longer than its vocabulary (the path that sums per token)."""
    from lab.config import load_experiment
    from lab.models.transformer import Transformer
    from lab.tasks import make_task

    models = []
    for experiment, overrides in [
        ("modadd_quick", ["task.p=11", "model.n_layers=2", "model.d_model=24", "model.n_heads=3", "model.d_head=8",
                          "model.d_mlp=32", "model.normalization=LN"]),
        ("a_and_b", ["task.max_train_len=6", "task.max_test_len=12", "task.max_len=16", "task.n_train=64",
                     "task.n_test=48", "model.n_layers=2"]),
        ("a_and_b", ["task.max_train_len=6", "task.max_test_len=40", "task.max_len=48", "task.n_train=64",
                     "task.n_test=48"]),
    ]:
        config = load_experiment(experiment, overrides).resolve()
        models.append((Transformer(config.model).eval(), make_task(config.task)))
    return models


UNTRAINED = ["two_layer_modular", "two_layer_a_and_b", "long_a_and_b"]


@pytest.mark.parametrize("which", ["grokked", "a_and_b", *UNTRAINED])
def test_fast_head_ablation_equals_the_hook_reference(which, grokked_run, a_and_b_run):
    if which in ("grokked", "a_and_b"):
        run = grokked_run if which == "grokked" else a_and_b_run
        model, task, loss_kind = run.model(), run.task, run.config.train.loss
    else:
        (model, task), loss_kind = untrained_models()[UNTRAINED.index(which)], "softmax"
    for split in ("test", "train"):
        for method in ("zero", "mean"):
            frame = lab.ablate_heads(model, split=split, method=method, task=task)
            expected = [reference_ablation(model, task, split, method, None, None, loss_kind)]
            for layer in range(model.cfg.n_layers):
                for head in range(model.cfg.n_heads):
                    expected.append(reference_ablation(model, task, split, method, f"blocks.{layer}.attn.hook_z",
                                                       (slice(None), slice(None), head), loss_kind))
            assert frame["loss"].tolist() == pytest.approx([e[0] for e in expected], rel=1e-4, abs=1e-6), (split, method)
            assert frame["accuracy"].tolist() == [e[1] for e in expected], (split, method)
    if task.name == "a_and_b":
        letters = lab.letter_attention(model, task=task)
        on_a, on_b = reference_letter_masses(model, task, "test")
        assert letters["mass_on_a"].tolist() == pytest.approx(on_a.flatten().tolist(), abs=1e-6)
        assert letters["mass_on_b"].tolist() == pytest.approx(on_b.flatten().tolist(), abs=1e-6)


@pytest.mark.parametrize("layer", [0, 1])
def test_fast_neuron_ablation_equals_the_hook_reference(layer, grokked_run):
    model, task = untrained_models()[0] if layer == 1 else (grokked_run.model(), grokked_run.task)
    neurons = [0, 3, 5]
    index = (slice(None), slice(None), torch.tensor(neurons))
    for method in ("zero", "mean"):
        got = lab.ablate_neurons(model, neurons, layer=layer, split="train", method=method, task=task).iloc[1]
        loss, accuracy = reference_ablation(model, task, "train", method, f"blocks.{layer}.mlp.hook_post", index)
        assert got["loss"] == pytest.approx(loss, rel=1e-4, abs=1e-6) and got["accuracy"] == accuracy
    if layer == 1:  # an earlier layer's neurons, too
        got = lab.ablate_neurons(model, neurons, layer=0, split="train", method="mean", task=task).iloc[1]
        loss, accuracy = reference_ablation(model, task, "train", "mean", "blocks.0.mlp.hook_post", index)
        assert got["loss"] == pytest.approx(loss, rel=1e-4, abs=1e-6) and got["accuracy"] == accuracy


def test_head_analyses_are_cached_per_checkpoint_in_the_run_folder(a_and_b_run, tmp_path):
    import os

    from lab.analysis import heads

    run = lab.load_run(_copy(a_and_b_run, tmp_path))
    fresh = lab.ablate_heads(run, split="train", method="mean", cache=False)
    first = lab.ablate_heads(run, split="train", method="mean")
    assert first.equals(fresh)
    step = run.checkpoint_steps[-1]
    cache_file = run.path / "analysis" / "heads" / f"step_{step:06d}.json"
    stored = json.loads(cache_file.read_text())["entries"]
    # one pass over the split fills every analysis of it, and nothing of the other split
    assert {"ablate_heads/train/mean", "ablate_heads/train/zero", "letter_attention/train"} == set(stored)
    assert heads.precompute_heads(run) == 2 * len(run.checkpoint_steps) - 1  # (checkpoint, split) pairs computed
    assert heads.precompute_heads(run) == 0
    assert sorted(os.listdir(run.path / "analysis" / "heads")) == [f"step_{s:06d}.json" for s in run.checkpoint_steps]
    letters = lab.letter_attention(run, step=run.checkpoint_steps[0], split="train")

    # Everything precomputed: answered without loading any model. Every checkpoint is made unreadable,
    # keeping its size and modification time (the cache's key), so a recomputation would fail.
    checkpoints = sorted((run.path / "checkpoints").glob("*.safetensors"))
    restore = {path: make_unreadable(path) for path in checkpoints}
    unloaded = lab.load_run(run.path)  # no model held in memory either
    assert lab.ablate_heads(unloaded, split="train", method="mean").equals(first)
    assert lab.letter_attention(unloaded, step=run.checkpoint_steps[0], split="train").equals(letters)
    for cached_step in unloaded.checkpoint_steps:
        for split in ("train", "test"):
            for method in ("zero", "mean"):
                assert len(lab.ablate_heads(unloaded, split=split, method=method, step=cached_step)) == 3  # none + 2 heads

    # A rewritten checkpoint (new modification time) is recomputed, not answered from the cache: the damaged
    # one fails to load, naming its file; restored, it gives the same numbers again. So does a damaged cache file.
    last = checkpoints[-1]
    os.utime(last, ns=(last.stat().st_atime_ns, last.stat().st_mtime_ns + 10**9))
    with pytest.raises(lab.RunError, match=last.name):
        lab.ablate_heads(lab.load_run(run.path), split="train", method="mean")
    restore[last]()
    assert lab.ablate_heads(lab.load_run(run.path), split="train", method="mean").equals(first)
    cache_file.write_text("{damaged")
    assert lab.ablate_heads(lab.load_run(run.path), split="train", method="mean").equals(first)
    with pytest.raises(TypeError, match="needs a Run"):
        heads.precompute_heads(run.model())


def _copy(run, tmp_path):
    import shutil

    return shutil.copytree(run.path, tmp_path / run.name, ignore=shutil.ignore_patterns("analysis"))  # no cache yet


def test_public_names_are_exported_lazily():
    import subprocess
    import sys

    for name in ("attention", "AttentionResult", "ablate_heads", "ablate_neurons", "letter_attention",
                 "modular_attention_grid", "progress_measures", "key_frequencies", "fourier_norms", "Prediction"):
        assert name in dir(lab) and getattr(lab, name).__name__ == name  # the function or class of that name
    code = "import sys, lab.cli; lab.cli.build_parser(); import lab; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
