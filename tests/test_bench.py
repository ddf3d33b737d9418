"""`lab bench`'s machinery on tiny inputs (no timing assertions): FLOP counting, interleaving,
the TransformerLens baseline being the same model as ours, a capped grok case, the table."""

import json

import torch

from lab.bench import format_table, grok_case, interleaved_medians, step_flops, transformer_lens_step
from lab.config import ModelConfig, apply_overrides, validate_experiment
from lab.training import Trainer


def test_step_flops_of_the_nanda_setup():
    cfg = ModelConfig(n_layers=1, d_model=128, n_heads=4, d_head=32, d_mlp=512, d_vocab=114, d_vocab_out=113, n_ctx=3, causal=True)
    B = 3830
    forward = (
        (114 + 3) * 2 * 128 * 384  # Q, K, V tables of the tokens and positions (one layer, no LayerNorm)
        + B * 2 * 2 * 4 * 32 * 3  # scores and pattern·V for one query over 3 keys
        + B * 2 * 128 * 128  # W_O
        + B * 2 * 2 * 128 * 512  # MLP
        + B * 2 * 128 * 113  # unembedding
    )
    assert step_flops(cfg, B, 3) == 3 * forward
    # with LayerNorm, K and V are computed at the 3 positions and Q at the read one
    ln = cfg.model_copy(update={"normalization": "LN"})
    ln_forward = forward - (114 + 3) * 2 * 128 * 384 + B * (3 * 2 * 128 * 256 + 2 * 128 * 128)
    assert step_flops(ln, B, 3) == 3 * ln_forward
    # a second layer runs at every position: it adds a full layer's work
    two = ln.model_copy(update={"n_layers": 2})
    full_layer = B * (3 * (2 * 128 * 384 + 2 * 128 * 128 + 2 * 2 * 128 * 512) + 2 * 2 * 4 * 32 * 9)
    assert step_flops(two, B, 3) == 3 * (ln_forward + full_layer)


def test_interleaved_medians_calls_each_function_once_per_round_in_turn():
    calls = []
    times = interleaved_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                rounds=3, warmup=1, device=torch.device("cpu"))
    assert calls == ["a", "b"] * 4
    assert [len(t) for t in times.values()] == [3, 3] and all(t >= 0 for ts in times.values() for t in ts)


TINY = {
    "name": "tiny",
    "task": {"name": "modular", "p": 7, "train_frac": 0.5},
    "model": {"d_model": 16, "n_heads": 2, "d_head": 8, "d_mlp": 32},
    "train": {"steps": 20, "lr": 1e-3, "eval_every": 5, "log_checkpoints": 0, "device": "cpu"},
}


def test_the_transformer_lens_baseline_is_our_model_and_trains(tmp_path):
    config = validate_experiment(TINY).resolve()
    trainer = Trainer(config, tmp_path / "run", progress=False)
    step, bridge = transformer_lens_step(trainer, torch.device("cpu"))
    ours = trainer.model
    tokens = torch.tensor([[0, 1, 7], [3, 6, 7], [5, 5, 7]])
    with torch.no_grad():
        torch.testing.assert_close(bridge(tokens), ours(tokens), rtol=1e-5, atol=1e-5)
    first, second = float(step()), float(step())
    assert second < first


def test_grok_case_reports_steps_memorisation_and_the_cap(tmp_path, monkeypatch):
    from lab import bench

    def load_tiny(name, overrides):
        return validate_experiment(apply_overrides(json.loads(json.dumps(TINY)), overrides))

    monkeypatch.setattr(bench, "load_experiment", load_tiny)
    case = grok_case("tiny", "grokfast_ema", max_steps=10, device=torch.device("cpu"))
    assert case["steps_run"] <= 10 and case["eval_every"] == 50  # the bench evaluates every case every 50 steps
    assert case["capped"] == (case["steps"] is None)
    if case["steps"] is None:
        assert case["seconds"] is None and case["steps_run"] == 10


def test_format_table_lists_every_case():
    result = {
        "device": "cpu", "device_name": "x86_64", "torch": "2", "threads": 2, "load_average_1m": 1.0, "load_average_1m_end": 1.0,
        "step": {"rounds": 3, "ours_ms": 10.0, "transformer_lens_ms": 30.0, "ours_gflops_per_s": 50.0, "flops_per_step": 6e9,
                 "step_speedup_vs_transformer_lens": 3.0, "matmul_peak_gflops_per_s": 80.0, "matmul_n": 2048,
                 "share_of_matmul_peak": 0.625},
        "grok": {"modadd_quick": {"baseline": {"steps": 1200, "seconds": 20.0, "memorize_step": 100, "steps_run": 1200, "seconds_run": 20.0},
                                  "grokfast_ema": {"steps": None, "seconds": None, "memorize_step": 50, "steps_run": 500, "seconds_run": 9.0}}},
        "modadd_quick_wall_s": {"seconds": 30.0, "memorize_step": 100, "grok_step": 1200, "steps": 1300},
        "memory": {"peak_rss_mb": 700.0},
    }
    table = format_table(result)
    assert "3.00 x" in table and "62.5 %" in table
    assert "baseline" in table and "1200" in table and ">500" in table


def test_bench_cli_rejects_bad_arguments_in_one_line():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "lab.cli", "bench", "--max-steps", "0"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip() == "lab: error: --max-steps must be at least 1, got 0"
