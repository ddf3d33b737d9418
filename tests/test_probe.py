"""The REPL probe API as a user calls it: load_run, predict, attention, ablations, letter attention, grids."""

from __future__ import annotations

import json

import pytest
import torch

import lab
from runs_for_tests import a_and_b_run, grokked_run, runs_root, tiny_modular_run  # noqa: F401  (fixtures)

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


def test_ablate_neurons(grokked_run):
    d_mlp = grokked_run.config.model.d_mlp
    nothing = lab.ablate_neurons(grokked_run, [])
    assert nothing["loss"] == pytest.approx(nothing["base_loss"])
    everything = lab.ablate_neurons(grokked_run, list(range(d_mlp)))
    assert everything["accuracy"] < nothing["accuracy"] - 0.5
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


def test_public_names_are_exported_lazily():
    import subprocess
    import sys

    for name in ("attention", "AttentionResult", "ablate_heads", "ablate_neurons", "letter_attention",
                 "modular_attention_grid", "progress_measures", "key_frequencies", "fourier_norms", "Prediction"):
        assert name in dir(lab) and getattr(lab, name) is not None
    code = "import sys, lab.cli; lab.cli.build_parser(); import lab; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
