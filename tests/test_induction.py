"""Induction heads forming (lab.analysis.induction, lab.plots.induction, the Induction heads page, `lab analyze`):
TransformerLens's own `detect_head` and `evals.induction_loss` as the oracle on an exported model, the
per-checkpoint cache, the documented detectors, and the pages a next-token run meets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import lab
from lab.analysis import induction
from runs_for_tests import tiny_modular_run  # noqa: F401  (fixture)
from test_dashboard import app, errors, goto, no_exception, same_figure, specs, when_computed  # noqa: F401  (app: fixture)

ROOT = Path(__file__).resolve().parent.parent

# A repeated-tokens run small enough to train in seconds: two attention-only layers of two heads.
TINY = {
    "name": "induction_tiny",
    "task": {"name": "repeated_tokens", "n_symbols": 16, "n_ctx": 16, "min_segment": 3, "max_segment": 6,
             "n_train": 256, "n_test": 64},
    "model": {"n_layers": 2, "d_model": 32, "n_heads": 2, "d_head": 16, "attn_only": True},
    "train": {"steps": 30, "lr": 1e-3, "weight_decay": 0.0, "batch_size": 64, "eval_every": 10,
              "checkpoint_every": 10, "log_checkpoints": 0, "device": "cpu"},
}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    from lab.config import validate_experiment
    from lab.training.trainer import Trainer

    folder = tmp_path_factory.mktemp("induction_runs") / "induction_tiny"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(validate_experiment(TINY).resolve(), folder, progress=False).run()
    finally:
        torch.set_num_threads(threads)
    return folder


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    import shutil

    shutil.copytree(tiny_run, tmp_path / "runs" / "induction_tiny")
    return tmp_path / "runs" / "induction_tiny"


# --- TransformerLens as the oracle ---------------------------------------------------------------------


def _sharp_model(d_vocab: int, n_ctx: int = 24):
    """A 2-layer attention-only causal transformer whose heads attend sharply and differently (queries and keys
    scaled up from the init), so that scores of different heads differ and a mislabelled head would show."""
    from lab.config import ModelConfig
    from lab.models.architectures import build_model

    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, attn_only=True, d_vocab=d_vocab, d_vocab_out=d_vocab,
                      n_ctx=n_ctx, causal=True, seed=3)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.W_Q.mul_(6)
            block.attn.W_K.mul_(6)
    return model


def _bridge_with_tokenizer(model):
    """The TransformerLens export, with a word-level tokenizer ("t0 t1 ...": one word per token id, no BOS) so that
    TransformerLens's `detect_head`, which tokenizes text itself, reads exactly our token ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bridge = lab.to_transformer_lens(model)
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(model.cfg.d_vocab)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bridge.tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="t0")
    bridge.cfg.default_prepend_bos = False
    return bridge


def test_head_scores_and_induction_loss_equal_transformer_lens_on_the_export():
    """TransformerLens's own `detect_head` (all three head kinds) and `evals.induction_loss` on the exported
    bridge give the lab's numbers on the same weights and the same batch (TransformerLens draws it: seeded)."""
    import einops
    from transformer_lens.evals import induction_loss
    from transformer_lens.head_detector import detect_head

    model = _sharp_model(d_vocab=20000)  # induction_loss draws token ids 100..19999
    bridge = _bridge_with_tokenizer(model)
    torch.manual_seed(7)
    theirs_loss = float(induction_loss(bridge, batch_size=4, subseq_len=11, prepend_bos=False, device="cpu"))
    torch.manual_seed(7)  # the batch induction_loss drew
    tokens = einops.repeat(torch.randint(100, 20000, (4, 11)), "b p -> b (2 p)")
    assert induction.induction_loss(model, tokens) == pytest.approx(theirs_loss, rel=1e-5)

    ours = lab.head_detector_scores(model, tokens)
    assert list(ours["component"]) == [f"L{l}H{h}" for l in range(2) for h in range(4)]
    texts = [" ".join(f"t{int(t)}" for t in sequence) for sequence in tokens]
    assert torch.equal(bridge.to_tokens(texts[0]), tokens[:1])
    for kind in induction.HEAD_KINDS:
        theirs = detect_head(bridge, texts, f"{kind}_head").flatten().double()
        assert np.allclose(ours[kind].to_numpy(), theirs.numpy(), atol=1e-5), kind
        assert ours[kind].max() - ours[kind].min() > 0.01, f"{kind}: heads too alike for the comparison to tell them apart"


def test_the_default_batch_is_transformer_lens_shaped_and_fits_detect_head():
    tokens = induction.diagnostic_batch(20, 16, bos_token_id=0, exclude=[19])
    half = (16 - 1) // 2
    assert tokens.shape == (induction.DIAGNOSTIC_SEQUENCES, 2 * half) and 2 * half < 16  # detect_head: shorter than n_ctx
    assert (tokens[:, 0] == 0).all() and torch.equal(tokens[:, 1:half], tokens[:, half + 1:])
    assert not (tokens[:, 1:] == 0).any() and not (tokens == 19).any()  # neither BOS nor the excluded token drawn
    assert torch.equal(tokens, induction.diagnostic_batch(20, 16, bos_token_id=0, exclude=[19]))  # the same every time
    with pytest.raises(ValueError, match="n_ctx 6"):
        induction.diagnostic_batch(20, 6)


def test_the_perfect_induction_score_is_what_a_perfect_head_scores():
    """A head attending exactly to the induction targets (uniformly where there are several; to position 0 where
    there are none) scores `perfect_induction_score` by TransformerLens's similarity score."""
    tokens = induction.diagnostic_batch(50, 24)
    target = induction.detection_patterns(tokens)["induction"]  # (batch, query, key)
    pattern = torch.where(target.sum(-1, keepdim=True) > 0, target / target.sum(-1, keepdim=True).clamp(min=1),
                          torch.nn.functional.one_hot(torch.zeros(target.shape[:2], dtype=torch.long), target.shape[-1]).float())
    scores = induction.scores_from_patterns(pattern[:, None, None], {"induction": target})
    assert float(scores["induction"][0, 0]) == pytest.approx(induction.perfect_induction_score(tokens))
    # every row of the second repeat has a target (half the rows), and a few first-half rows by chance duplicates
    assert 0.5 <= induction.perfect_induction_score(tokens) < 0.65


def test_icl_positions_scale_olsson_tokens():
    assert induction.icl_positions(512) == (49, 499)  # the paper's tokens 50 and 500 of 512
    assert induction.icl_positions(64) == (5, 61)
    assert induction.icl_positions(16) == (1, 15)
    with pytest.raises(ValueError, match="at least 2 positions"):
        induction.icl_positions(1)


def test_detectors():
    steps = [0, 10, 20, 30, 40, 50]
    # the running maximum (the plateau, 4.2 at step 10) must be halved: 2.2 is not below 2.1, 1.0 is
    assert induction.loss_drop_step(steps, [4.0, 4.2, 4.1, 2.2, 1.0, 0.2]) == 40
    assert induction.loss_drop_step(steps, [4.0, 3.0, 2.5, 2.2, 2.1, 2.05]) is None  # 2.05 is not below 2.0
    assert induction.loss_drop_step(steps, [None, float("nan"), 4.0, 1.0, 1.0, 1.0]) == 30
    assert induction.formation_step(steps, [0.05, 0.06, 0.1, 0.24, 0.26, 0.45], perfect=0.5) == 40
    assert induction.formation_step(steps, [0.05] * 6, perfect=0.5) is None


# --- a run: every checkpoint, cached ------------------------------------------------------------------


def test_history_of_a_run_is_the_models_numbers_and_the_trainers_test_loss(run_copy):
    run = lab.load_run(run_copy)
    history = lab.induction_history(run)
    steps = run.checkpoint_steps
    assert list(history.measures["step"]) == steps and len(steps) >= 3
    last = steps[-1]
    model = run.model(last)
    row = history.measures.set_index("step").loc[last]
    # the test loss over target tokens is the one the trainer logged at that step
    logged = run.metrics.set_index("step").loc[last, "test_loss"]
    assert row["test_loss"] == pytest.approx(logged, rel=1e-5)
    # the repeated segment and the rest partition the targets: their token-weighted mean is the test loss
    task, read = run.task, run.task.split("test").labels != -100
    repeated = task.repeated_mask("test") & read
    n_rep, n_other = int(repeated.sum()), int((read & ~repeated).sum())
    assert (row["repeated_loss"] * n_rep + row["other_loss"] * n_other) / (n_rep + n_other) == pytest.approx(row["test_loss"], rel=1e-9)
    # head scores and induction loss: the model's own, on the task's diagnostic batch (with its <bos>)
    direct = lab.head_detector_scores(model, task=task)
    heads = history.heads[history.heads["step"] == last]
    for kind in induction.HEAD_KINDS:
        assert np.allclose(heads[heads["kind"] == kind]["score"], direct[kind])
    assert row["top_induction"] == pytest.approx(direct["induction"].max())
    assert row["induction_loss"] == pytest.approx(induction.induction_loss(model, task=task))
    # the in-context-learning score is the loss-by-position difference at the documented positions
    early, late = history.icl_positions
    by_position = history.by_position.query("step == @last and source == 'test'").set_index("position")["loss"]
    assert row["icl_score"] == pytest.approx(by_position[late] - by_position[early])
    assert history.drop_series == "repeated_loss"
    assert "checkpoints" in history.summary() and run.name in history.summary()


def test_history_is_cached_per_checkpoint_and_a_rewritten_checkpoint_is_recomputed(run_copy, monkeypatch):
    from lab.analysis.ablation import CACHE_DIR
    from lab.runs.storage import checkpoint_path

    run = lab.load_run(run_copy)
    first = lab.induction_history(run)
    files = sorted((run_copy / CACHE_DIR).glob("step_*.json"))
    assert len(files) == len(run.checkpoint_steps)
    assert all(induction.CACHE_KEY in json.loads(f.read_text())["entries"] for f in files)

    computed = []
    real = induction.measures_at
    monkeypatch.setattr(induction, "measures_at", lambda model, task: computed.append(1) or real(model, task))
    again = lab.induction_history(run)
    assert computed == []  # every checkpoint from the cache
    assert again.measures.equals(first.measures)

    step = run.checkpoint_steps[1]
    path = checkpoint_path(run.path, step)
    os.utime(path, ns=(time.time_ns(), time.time_ns()))  # rewritten (a resumed run writes it again)
    lab.induction_history(run)
    assert len(computed) == 1  # that checkpoint only


def test_a_classifier_run_is_refused_in_one_line(tiny_modular_run):
    with pytest.raises(ValueError, match="next-token runs.*task 'modular'"):
        lab.induction_history(tiny_modular_run)


def test_plot_induction_lines_up_the_measures_with_the_training_loss(run_copy):
    run = lab.load_run(run_copy)
    fig = lab.plot_induction(run)
    names = [trace.name for trace in fig.data]
    assert {"train loss", "test loss", "test loss on the repeated segment", "induction loss (random tokens repeated)",
            "in-context-learning score", "L0H0", "L1H1"} <= set(names)
    train = next(trace for trace in fig.data if trace.name == "train loss")
    assert list(train.x) == list(run.metrics["step"])  # every evaluation, on the same step axis as the checkpoints
    repeated = next(trace for trace in fig.data if trace.name == "test loss on the repeated segment")
    assert list(repeated.x) == run.checkpoint_steps
    positions = lab.plot_induction(run, "positions", step=run.checkpoint_steps[-1])
    assert {f"test split, step {run.checkpoint_steps[-1]}", "test split, step 0"} <= {t.name for t in positions.data}
    heads = lab.plot_induction(run, "heads")
    assert [trace.z.shape for trace in heads.data] == [(2, 2)] * 3  # (layer, head) per kind
    with pytest.raises(ValueError, match="kind must be one of"):
        lab.plot_induction(run, "nope")


def test_lab_analyze_a_next_token_run(run_copy):
    """`lab analyze RUN` on a next-token run computes and stores the induction measures, with a one-line summary."""
    from lab.analysis.ablation import CACHE_DIR

    done = subprocess.run([sys.executable, "-m", "lab.cli", "analyze", str(run_copy), "--quiet"], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    assert first.startswith("induction_tiny: 4 checkpoints;") and "induction" in first
    assert "top_induction" in done.stdout and str(run_copy / CACHE_DIR) in done.stdout
    assert len(list((run_copy / CACHE_DIR).glob("step_*.json"))) == 4


# --- the dashboard --------------------------------------------------------------------------------------


def test_induction_page_draws_the_history_and_the_checkpoint(run_copy, app):
    at = when_computed(goto(app(run_copy.parent).run(), "induction"))
    no_exception(at)
    assert not errors(at)
    charts = specs(at)
    run = lab.load_run(run_copy)
    same_figure(charts[0], lab.plot_induction(run))
    titles = [spec["layout"]["title"]["text"] for spec in charts]
    last = run.checkpoint_steps[-1]
    assert titles[1:] == [f"Loss by token position at step {last} (grey: step 0)", f"Head scores at step {last}"]
    assert any("checkpoints;" in m.value for m in at.markdown)  # the one-line summary


def test_classifier_pages_say_in_one_line_they_do_not_apply(run_copy, app):
    """Heads and Circuits on a next-token run: one line pointing to the Induction heads page; Progress lists only
    modular runs, and says there are none; the Induction heads page refuses a classifier the same way."""
    at = app(run_copy.parent).run()
    for page in ("heads", "circuits"):
        at = goto(at, page)
        no_exception(at)
        assert errors(at) == [f"induction_tiny: the {page.capitalize()} page applies to classification runs (one answer "
                              "read at one position); this run (task 'repeated_tokens') predicts the next token at every "
                              "position: see the Induction heads page"]
        assert not at.get("plotly_chart")
    at = goto(at, "progress")
    no_exception(at)
    assert any("No modular runs" in i.value for i in at.info)


def test_induction_page_on_a_classifier_run(tiny_modular_run, tmp_path, app):
    import shutil

    shutil.copytree(tiny_modular_run.path, tmp_path / "mod")
    at = goto(app(tmp_path).run(), "induction")
    no_exception(at)
    assert len(errors(at)) == 1 and "induction measures are for next-token runs" in errors(at)[0]
