"""The progress measures are the paper's: the lab's numbers against an independent port of the formulas in
Nanda et al.'s notebook (Grokking_Analysis.ipynb of github.com/mechanistic-interpretability-grokking/
progress-measures-paper), on a small grokked checkpoint; the TransformerLens-demo variant against its own
formula; the `nanda_2023` split against the paper's `gen_train_test`; the cache's versioning."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import pytest
import torch

import lab
from lab.analysis import fourier, progress
from runs_for_tests import copy_run, grokked_run, tiny_modular_run  # noqa: F401  (fixtures)

# --- an independent port of the notebook's formulas (its names in the comments) -------------------------


def paper_fourier_basis(p: int) -> torch.Tensor:
    """`fourier_basis`: Const/sqrt(p), then cos k and sin k (normalised) for k = 1 .. p//2 (odd p)."""
    x = torch.arange(p, dtype=torch.float64)
    rows = [torch.ones(p, dtype=torch.float64) / math.sqrt(p)]
    for k in range(1, p // 2 + 1):
        for wave in (torch.cos(2 * math.pi * k * x / p), torch.sin(2 * math.pi * k * x / p)):
            rows.append(wave / wave.norm())
    return torch.stack(rows)


def basis_term(basis: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """`fourier_2d_basis_term`: the outer product of basis rows i (over a) and j (over b), flattened."""
    return (basis[i][:, None] * basis[j][None, :]).flatten()


def paper_key_frequencies(neuron_acts: torch.Tensor, p: int) -> list[int]:
    """Cells 75-76: each neuron's frequency is the argmax over k of the share of its centred variance held by
    the 8 terms of k in the 2-D Fourier basis; the key frequencies are `np.unique` of those. (Neurons that
    never vary are left out, the lab's one documented departure: the notebook's 0/0 would make them k = 1.)"""
    basis = paper_fourier_basis(p)
    centred = neuron_acts - neuron_acts.mean(0, keepdim=True)
    fourier_acts = torch.einsum("xyn,fx,Fy->fFn", centred.reshape(p, p, -1), basis, basis).reshape(p * p, -1)
    norms = fourier_acts.pow(2).sum(0)
    indices = torch.tensor([[2 * k - 1, 2 * k, (2 * k - 1) * p, 2 * k * p, (2 * k - 1) * p + 2 * k - 1,
                             (2 * k - 1) * p + 2 * k, 2 * k * p + 2 * k - 1, 2 * k * p + 2 * k]
                            for k in range(1, p // 2 + 1)])
    explained = fourier_acts[indices.flatten()].reshape(p // 2, 8, -1).pow(2).sum(1) / norms
    neuron_freqs = explained.argmax(0) + 1
    return sorted(set(neuron_freqs[norms > 0].tolist()))


def key_components(logits: torch.Tensor, p: int, key_freqs: list[int]) -> torch.Tensor:
    """sum over key frequencies of `get_component_cos_xpy` + `get_component_sin_xpy` of (p*p, vocab) values."""
    basis = paper_fourier_basis(p)
    total = torch.zeros_like(logits)
    for k in key_freqs:
        cos_xpy = (basis_term(basis, 2 * k - 1, 2 * k - 1) - basis_term(basis, 2 * k, 2 * k)) / math.sqrt(2)
        sin_xpy = (basis_term(basis, 2 * k, 2 * k - 1) + basis_term(basis, 2 * k - 1, 2 * k)) / math.sqrt(2)
        for direction in (cos_xpy, sin_xpy):
            total += direction[:, None] @ (direction[None, :] @ logits)
    return total


def cross_entropy_high_precision(logits: torch.Tensor, labels: torch.Tensor) -> float:
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return float(-logprobs.gather(-1, labels[:, None]).mean())


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).double().mean())


def paper_measures(logits: torch.Tensor, labels: torch.Tensor, is_train: torch.Tensor, p: int, key_freqs) -> dict:
    """`trig_loss` / `trig_acc` (restricted, mode='all', bias-corrected) and `excluded_loss_2D_full` /
    `excluded_acc_2D_full` (all key frequencies removed from the logits, mode='train')."""
    trig = key_components(logits, p, key_freqs)
    restricted = (logits - trig).mean(0, keepdim=True) + trig
    excluded = logits - trig
    return {"restricted_loss": cross_entropy_high_precision(restricted, labels),
            "restricted_acc": accuracy(restricted, labels),
            "excluded_loss": cross_entropy_high_precision(excluded[is_train], labels[is_train]),
            "excluded_acc": accuracy(excluded[is_train], labels[is_train])}


@torch.no_grad()
def grid(run, step: int):
    """(logits (p*p, p), neuron activations (p*p, d_mlp), labels, is_train) over the row-major (a, b) grid."""
    model, task, p = run.model(step, cache=False), run.task, run.task.p
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    tokens = torch.stack([a.flatten(), b.flatten(), torch.full((p * p,), p)], dim=1)
    logits, cache = model.run_with_cache(tokens)
    train = {tuple(pair) for pair in task.split("train").tokens[:, :2].tolist()}
    is_train = torch.tensor([(x, y) in train for x, y in tokens[:, :2].tolist()])
    return (logits[:, -1].double(), cache["blocks.0.mlp.hook_post"][:, -1].double(), (a + b).flatten() % p, is_train)


# --- the lab against the port ---------------------------------------------------------------------------


def test_key_frequencies_are_every_neurons_frequency_as_in_the_paper(grokked_run):
    _, acts, _, _ = grid(grokked_run, grokked_run.checkpoint_steps[-1])
    expected = paper_key_frequencies(acts, grokked_run.task.p)
    found = lab.key_frequencies(grokked_run)
    assert sorted(found["frequency"]) == expected
    assert found["n_neurons"].sum() == int((acts.var(0) > 0).sum())  # every active neuron counts for its frequency
    # at initialisation the neurons' frequencies are spread: the paper's definition names many, the threshold none
    _, acts0, _, _ = grid(grokked_run, 0)
    assert sorted(lab.key_frequencies(grokked_run, step=0)["frequency"]) == paper_key_frequencies(acts0, grokked_run.task.p)
    assert len(paper_key_frequencies(acts0, grokked_run.task.p)) > 5
    assert lab.key_frequencies(grokked_run, step=0, method="thresholded").empty


def test_restricted_and_excluded_loss_equal_the_papers_formulas_at_every_checkpoint(grokked_run):
    frame = lab.progress_measures(grokked_run).set_index("step")
    p = grokked_run.task.p
    _, last_acts, _, _ = grid(grokked_run, grokked_run.checkpoint_steps[-1])
    key_freqs = paper_key_frequencies(last_acts, p)  # the notebook takes those of the checkpoint it analyses
    assert sorted(frame.attrs["key_frequencies"]) == key_freqs and 1 <= len(key_freqs) < p // 2
    for step in grokked_run.checkpoint_steps:
        logits, _, labels, is_train = grid(grokked_run, step)
        expected = paper_measures(logits, labels, is_train, p, key_freqs)
        for name, value in expected.items():
            assert frame.loc[step, name] == pytest.approx(value, rel=1e-6, abs=1e-9), (step, name)
        assert frame.loc[step, "train_loss"] == pytest.approx(
            cross_entropy_high_precision(logits[is_train], labels[is_train]), rel=1e-6)
    # the published story on the paper's numbers: after memorisation the key terms alone predict every pair
    # far better than the model predicts the test pairs, and removing them breaks the memorised train pairs
    last = frame.iloc[-1]
    assert last["restricted_loss"] < 0.01 * last["test_loss"] and last["excluded_loss"] > 1000 * last["train_loss"]


def test_the_transformer_lens_demo_variant_projects_the_neurons_and_scores_restricted_loss_on_the_test_split(grokked_run):
    """TransformerLens's Grokking_Demo `get_restricted_loss`: the neuron activations' key-frequency terms plus
    their mean, through W_out W_U, the mean logits restored, on the test split; it differs from the paper's."""
    run, p = grokked_run, grokked_run.task.p
    step = run.checkpoint_steps[-1]
    key_freqs = lab.progress_measures(run).attrs["key_frequencies"]
    logits, acts, labels, is_train = grid(run, step)
    a, b = torch.meshgrid(torch.arange(p, dtype=torch.float64), torch.arange(p, dtype=torch.float64), indexing="ij")
    approx_acts = acts.mean(0, keepdim=True).expand_as(acts).clone()
    for k in key_freqs:
        for wave in (torch.cos, torch.sin):
            vec = wave(2 * math.pi * k / p * (a + b)).flatten()
            vec = (vec / vec.norm())[:, None]
            approx_acts += (acts * vec).sum(0) * vec
    model = run.model(step, cache=False)
    restricted = approx_acts @ (model.blocks[0].mlp.W_out.double() @ model.W_U.double()).detach()
    restricted += logits.mean(0, keepdim=True) - restricted.mean(0, keepdim=True)
    expected = cross_entropy_high_precision(restricted[~is_train], labels[~is_train])
    demo = lab.progress_measures(run, definition="tl_demo")
    assert demo.iloc[-1]["restricted_loss"] == pytest.approx(expected, rel=1e-6)
    assert demo.attrs["definition"].startswith("tl_demo: neuron activations") and "test pairs" in demo.attrs["definition"]
    paper = lab.progress_measures(run)
    assert paper.iloc[-1]["excluded_loss"] != pytest.approx(demo.iloc[-1]["excluded_loss"], rel=1e-3)
    assert lab.restricted_loss(run, definition="tl_demo") == pytest.approx(expected, rel=1e-6)


def test_pairs_are_configurable_and_bad_definitions_name_the_valid_ones(grokked_run):
    run, p = grokked_run, grokked_run.task.p
    key_freqs = lab.progress_measures(run).attrs["key_frequencies"]
    logits, _, labels, is_train = grid(run, run.checkpoint_steps[-1])
    on_test = fourier.ProgressDefinition(restricted_pairs="test", excluded_pairs="all")
    trig = key_components(logits, p, key_freqs)
    restricted = (logits - trig).mean(0, keepdim=True) + trig
    assert lab.restricted_loss(run, definition=on_test) == pytest.approx(
        cross_entropy_high_precision(restricted[~is_train], labels[~is_train]), rel=1e-6)
    assert lab.excluded_loss(run, definition=on_test) == pytest.approx(
        cross_entropy_high_precision(logits - trig, labels), rel=1e-6)
    with pytest.raises(lab.LabError, match=r"^progress definition 'nanda' is not known; valid: paper, tl_demo") as err:
        lab.progress_measures(run, definition="nanda")
    assert "\n" not in str(err.value)
    with pytest.raises(lab.LabError, match=r"restricted_pairs 'val' is not known; valid: all, train, test"):
        fourier.ProgressDefinition(restricted_pairs="val")
    with pytest.raises(lab.LabError, match=r"key-frequency method 'top' is not known; valid: paper, thresholded"):
        lab.key_frequencies(run, method="top")


# --- the cache ------------------------------------------------------------------------------------------


def test_an_older_cache_is_recomputed_and_each_definition_has_its_own(tiny_modular_run, tmp_path_factory, tmp_path,
                                                                      monkeypatch):
    run = lab.load_run(copy_run("tiny_modular", tmp_path_factory, tmp_path / "tiny"))
    fresh = lab.progress_measures(run)
    cache_file = run.path / progress.CACHE_FILE
    stored = json.loads(cache_file.read_text())
    assert stored["version"] == progress.CACHE_VERSION == 3 and stored["definition"]["projection"] == "logits"

    # a version-2 cache (the TransformerLens-demo numbers, same checkpoints) must not be read as the paper's
    stale = dict(stored, version=2)
    stale.pop("definition")
    for entry in stale["rows"].values():
        entry["measures"] = dict(entry["measures"], restricted_loss=123.0)
    cache_file.write_text(json.dumps(stale))
    again = lab.progress_measures(run)
    assert again.equals(fresh) and json.loads(cache_file.read_text())["version"] == 3

    computed = []
    real = progress.measures_at
    monkeypatch.setattr(progress, "measures_at", lambda *args: computed.append(args[0].step) or real(*args))
    demo = lab.progress_measures(run, definition="tl_demo")
    assert (run.path / "analysis" / "progress_measures.tl_demo.json").is_file() and len(computed) == len(demo)
    computed.clear()
    assert lab.progress_measures(run).equals(fresh) and computed == []  # the paper's cache was left alone


def test_lab_analyze_says_which_definition_and_pairs(tiny_modular_run, tmp_path_factory, tmp_path):
    run_dir = copy_run("tiny_modular", tmp_path_factory, tmp_path / "runs" / "tiny")

    def analyze(*extra):
        return subprocess.run([sys.executable, "-m", "lab.cli", "analyze", "tiny", "--runs-dir", str(tmp_path / "runs"),
                               "--quiet", *extra], capture_output=True, text=True, timeout=300)

    paper = analyze()
    assert paper.returncode == 0, paper.stderr
    assert "definition paper: logits projected" in paper.stdout and "restricted loss on all pairs" in paper.stdout
    demo = analyze("--definition", "tl_demo")
    assert demo.returncode == 0 and "restricted loss on test pairs" in demo.stdout
    assert f"stored in {run_dir / 'analysis' / 'progress_measures.tl_demo.json'}" in demo.stdout
    wrong = analyze("--definition", "nanda")
    assert wrong.returncode == 2 and "invalid choice: 'nanda' (choose from 'paper', 'tl_demo')" in wrong.stderr


# --- the nanda_2023 split -------------------------------------------------------------------------------


def test_nanda_2023_trains_on_exactly_the_papers_pairs():
    """The paper's `gen_train_test(frac_train=0.3, num=113, seed=0)`: Python's random.shuffle of the row-major
    pairs after random.seed(0), the first int(0.3 * 113²) for training."""
    from lab.config import load_experiment

    pairs = [(i, j, 113) for i in range(113) for j in range(113)]
    random.seed(0)
    random.shuffle(pairs)
    div = int(0.3 * len(pairs))
    task = lab.make_task(load_experiment("nanda_2023").task)
    assert [tuple(t) for t in task.split("train").tokens.tolist()] == pairs[:div]
    assert [tuple(t) for t in task.split("test").tokens.tolist()] == pairs[div:]
    # other modular experiments keep the lab's torch.randperm split (existing runs stay reproducible)
    quick = lab.make_task(load_experiment("modadd_quick").task)
    order = torch.randperm(59 * 59, generator=torch.Generator().manual_seed(0))[: int(0.4 * 59 * 59)]
    assert torch.equal(quick.split("train").tokens[:, 0] * 59 + quick.split("train").tokens[:, 1], order)


def test_a_bad_split_shuffle_is_one_line_naming_the_valid_ones(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lab.cli", "train", "modadd_quick", "--runs-dir", str(tmp_path),
                             "--set", "task.split_shuffle=numpy"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "split_shuffle" in result.stderr and "'torch'" in result.stderr and "'python'" in result.stderr
    assert result.stderr.count("\n") == 1
