"""Modular-arithmetic analysis (Nanda et al. 2023): Fourier basis, key frequencies, progress measures, `lab analyze`."""

from __future__ import annotations

import json
import math

import pytest
import torch

import lab
from lab.analysis import fourier, progress
from runs_for_tests import a_and_b_run, copy_run, grokked_run, make_unreadable, tiny_modular_run  # noqa: F401  (fixtures)


@pytest.mark.parametrize("p", [23, 10])
def test_fourier_basis_is_orthonormal(p):
    basis, labels, freqs = lab.fourier_basis(p)
    assert basis.shape == (p, p)
    assert torch.allclose(basis @ basis.T, torch.eye(p, dtype=torch.float64), atol=1e-10)
    assert labels[:3] == ["const", "cos 1", "sin 1"] and freqs.max() == p // 2
    x = torch.arange(p, dtype=torch.float64)
    assert torch.allclose(basis[labels.index("cos 3")], torch.cos(2 * math.pi * 3 * x / p) / math.sqrt(p / 2))


def test_gini():
    assert fourier.gini([1, 1, 1, 1]) == pytest.approx(0.0)
    assert fourier.gini([0, 0, 0, 5]) == pytest.approx(0.75)
    # sum of |x_i - x_j| over ordered pairs / (2 n^2 mean) = 56 / 128
    assert fourier.gini([1, 2, 3, 10]) == pytest.approx(0.4375)


def synthetic_fourier_model(p: int, frequencies: list[int], per_frequency: int = 8):
    """A 1-layer model whose neurons compute ReLU(1 + cos(w_k a + φ) + cos(w_k b + φ)) for chosen k:
    the embedding holds cos/sin(w_k x) for each k, one head with zero queries and keys attends
    uniformly over [a, b, =] and copies the embeddings (x3 in W_in undoes the 1/3), and neuron j
    reads frequency frequencies[j // per_frequency] at phase φ_j."""
    from lab.config import load_experiment
    from lab.models.transformer import Transformer
    from lab.tasks import make_task

    d_model = 2 * len(frequencies)
    config = load_experiment("modadd_quick", [f"task.p={p}", f"model.d_model={d_model}", "model.n_heads=1",
                                              f"model.d_head={d_model}", f"model.d_mlp={per_frequency * len(frequencies)}"]).resolve()
    model = Transformer(config.model)
    x = torch.arange(p, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        for i, k in enumerate(frequencies):
            model.W_E[:p, 2 * i] = torch.cos(2 * math.pi * k * x / p)
            model.W_E[:p, 2 * i + 1] = torch.sin(2 * math.pi * k * x / p)
        attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
        attn.W_V[0] = torch.eye(d_model)
        attn.W_O[0] = torch.eye(d_model)
        for j in range(mlp.W_in.shape[1]):
            i, phase = j // per_frequency, 2 * math.pi * j / per_frequency / 3
            mlp.W_in[2 * i, j], mlp.W_in[2 * i + 1, j] = 3 * math.cos(phase), -3 * math.sin(phase)
        mlp.b_in.fill_(1.0)
        mlp.W_out.normal_(generator=torch.Generator().manual_seed(0))
        model.W_U.normal_(generator=torch.Generator().manual_seed(1))
    return model.eval(), make_task(config.task)


def test_key_frequency_finder_recovers_a_synthetic_model():
    chosen = [3, 7, 10]
    model, task = synthetic_fourier_model(23, chosen)
    found = lab.key_frequencies(model, task=task)
    assert sorted(found["frequency"]) == chosen
    assert list(found["n_neurons"]) == [8, 8, 8]
    assert found["variance_explained"].sum() > 0.8  # ReLU adds harmonics; the chosen frequencies hold most variance
    neurons = lab.neuron_frequencies(model, task=task)
    assert list(neurons["frequency"]) == [3] * 8 + [7] * 8 + [10] * 8
    norms = lab.fourier_norms(model, task=task)
    assert list(norms.columns) == ["frequency", "embed_norm", "neuron_logit_norm"]
    assert len(norms) == 12
    top = norms.sort_values("embed_norm", ascending=False)["frequency"].head(3)
    assert sorted(top) == chosen and norms.set_index("frequency").loc[[1, 2, 4], "embed_norm"].max() < 1e-5


def test_key_frequencies_of_a_grokked_run(grokked_run):
    found = lab.key_frequencies(grokked_run)
    assert list(found.columns)[:3] == ["frequency", "n_neurons", "variance_explained"]
    assert 1 <= len(found) <= 6
    assert list(found["n_neurons"]) == sorted(found["n_neurons"], reverse=True)
    assert found["variance_explained"].between(0, 1).all() and found["variance_explained"].sum() > 0.5
    untrained = lab.key_frequencies(grokked_run, step=0, method="thresholded")
    assert untrained.empty  # random neurons have no dominant frequency (the paper's method names every neuron's best)


def test_fourier_analysis_refuses_other_tasks(a_and_b_run):
    with pytest.raises(ValueError, match="Fourier analysis is for modular runs; this one is task 'a_and_b'"):
        lab.key_frequencies(a_and_b_run)
    with pytest.raises(ValueError, match="for modular runs"):
        lab.progress_measures(a_and_b_run)
    with pytest.raises(ValueError, match="for modular runs"):
        lab.fourier_norms(a_and_b_run)


def test_progress_measures_tell_the_published_story(grokked_run):
    frame = lab.progress_measures(grokked_run)
    for column in ("step", "train_loss", "test_loss", "restricted_loss", "excluded_loss", "gini_embed",
                   "gini_neuron_logit", "sum_sq_weights", "train_acc", "test_acc"):
        assert column in frame.columns
    assert list(frame["step"]) == grokked_run.checkpoint_steps
    assert frame.attrs["key_frequencies"] == lab.key_frequencies(grokked_run)["frequency"].tolist()
    # losses agree with the trainer's own evaluation at the steps both have
    metrics = grokked_run.metrics.set_index("step")
    last = frame.iloc[-1]
    assert last["test_loss"] == pytest.approx(metrics.loc[500, "test_loss"], rel=1e-3)
    assert last["train_acc"] == 1.0
    # restricted loss falls well before test loss: at the first checkpoint after memorisation the
    # key-frequency terms alone already predict the test split far better than the full model does
    memorised = frame[frame["train_acc"] == 1.0].iloc[0]
    assert memorised["restricted_loss"] < 0.5 * memorised["test_loss"]
    # excluded loss (key terms removed, train split) rises while train loss stays near zero (it may
    # fall again after the cleanup, so look at its peak once the training set is memorised)
    after = frame[frame["step"] >= memorised["step"]]
    peak = after.loc[after["excluded_loss"].idxmax()]
    assert peak["excluded_loss"] > frame.iloc[0]["excluded_loss"] and peak["excluded_loss"] > 10 * peak["train_loss"]
    assert last["excluded_loss"] > 10 * last["train_loss"]
    # the embedding becomes sparse in the Fourier basis
    assert last["gini_embed"] > frame.iloc[0]["gini_embed"] + 0.1
    # the sum of squared weights is the square of the weight norm training logged, at the steps both have
    shared = [step for step in frame["step"] if step in metrics.index]
    assert len(shared) >= 3
    assert frame.set_index("step").loc[shared, "sum_sq_weights"].tolist() == pytest.approx(
        (metrics.loc[shared, "weight_norm"] ** 2).tolist(), rel=1e-6)


def test_progress_measures_are_cached_and_recomputed_only_when_checkpoints_change(tiny_modular_run, tmp_path_factory,
                                                                                 tmp_path):
    from lab.runs.storage import checkpoint_path, load_tensors, save_tensors

    run = lab.load_run(copy_run("tiny_modular", tmp_path_factory, tmp_path / "tiny"))
    first = lab.progress_measures(run)
    cache_file = run.path / "analysis" / "progress_measures.json"
    assert json.loads(cache_file.read_text())["rows"].keys() == {str(s) for s in run.checkpoint_steps}
    assert run.checkpoint_steps == [0, 4, 8, 12]

    # Cached rows are reused, not recomputed: the checkpoints before the last (whose key frequencies are
    # looked up each time) are made unreadable, keeping their size and time, so recomputing them would fail.
    restore = {step: make_unreadable(checkpoint_path(run.path, step)) for step in (0, 4, 8)}
    assert lab.progress_measures(lab.load_run(run.path)).equals(first)

    # A changed checkpoint (same step, new weights) and a new one are computed; 0 and 8, still unreadable, are not.
    restore[4]()
    weights, meta = load_tensors(checkpoint_path(run.path, 4))
    save_tensors(checkpoint_path(run.path, 4), {k: v * 0.5 for k, v in weights.items()}, meta)
    save_tensors(checkpoint_path(run.path, 2), weights, meta)
    updated = lab.progress_measures(lab.load_run(run.path)).set_index("step")
    assert list(updated.index) == [0, 2, 4, 8, 12]
    assert updated.loc[4, "sum_sq_weights"] == pytest.approx(first.set_index("step").loc[4, "sum_sq_weights"] * 0.25, rel=1e-6)
    assert updated.loc[2].tolist() == pytest.approx(first.set_index("step").loc[4].tolist())  # step 4's weights, under step 2

    # A damaged cache is recomputed, not an error (the checkpoints readable again).
    for step in (0, 8):
        restore[step]()
    cache_file.write_text("{damaged")
    assert lab.progress_measures(lab.load_run(run.path)).set_index("step").equals(updated)


def test_the_progress_cache_holds_each_checkpoints_fourier_norms_and_key_frequencies(grokked_run, tmp_path):
    """The Progress page's checkpoint slider reads them from the cache `lab analyze` / `lab demo` filled."""
    import os
    import shutil

    from lab.runs.storage import checkpoint_path

    run = lab.load_run(shutil.copytree(grokked_run.path, tmp_path / "run"))
    step = run.checkpoint_steps[-2]
    expected = (lab.fourier_norms(run, step=step), lab.key_frequencies(run, step=step))
    assert len(expected[1]) > 0  # a grokked checkpoint: key frequencies to store
    lab.progress_measures(run)

    # read from the cache: the checkpoint is unreadable (its size and time kept), and the answer comes anyway
    path = checkpoint_path(run.path, step)
    make_unreadable(path)
    norms, keys = progress.fourier_at(lab.load_run(run.path), step)
    assert norms.equals(expected[0]) and keys.equals(expected[1])

    # a checkpoint rewritten since the cache was filled is computed afresh: loading it fails, naming it
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    with pytest.raises(lab.RunError, match=path.name):
        progress.fourier_at(lab.load_run(run.path), step)


def test_lab_analyze_cli(tiny_modular_run, tmp_path_factory, tmp_path, capsys):
    from lab.cli import main

    run_dir = copy_run("tiny_modular", tmp_path_factory, tmp_path / "runs" / "tiny")
    assert main(["analyze", "tiny", "--runs-dir", str(tmp_path / "runs"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "tiny: 4 checkpoints; key frequencies:" in out and "restricted_loss" in out
    assert (run_dir / "analysis" / "progress_measures.json").is_file()
    assert main(["analyze", "nope", "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "lab: error: no run 'nope'" in capsys.readouterr().err
