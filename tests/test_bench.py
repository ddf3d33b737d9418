"""`lab bench` on tiny inputs (no timing thresholds): its FLOP count against PyTorch's own counter, the
interleaving, the TransformerLens baseline being our model, and a whole bench run on a tiny setup,
checked through the JSON and the table it writes."""

import json
import subprocess
import sys
import tempfile

import pytest
import torch
from conftest import tiny, tiny_data
from torch.utils.flop_counter import FlopCounterMode

from lab.bench import QUICK_MAX_STEPS
from lab.bench import suite as bench
from lab.bench.measure import sequence_step_flops
from lab.config import load_experiment, validate_experiment
from lab.training.recipes import RECIPES
from lab.training.trainer import Trainer


def counted_step_flops(config) -> tuple[int, int]:
    """(FLOPs PyTorch's FlopCounterMode counts in one training step, FLOPs `step_flops` predicts)."""
    config = config.resolve()
    trainer = Trainer(config, tempfile.mkdtemp() + "/run", progress=False)
    trainer.update()  # the first step builds optimiser state; count a steady one
    with FlopCounterMode(display=False) as counter:
        trainer.update()
    return counter.get_total_flops(), bench.step_flops(config.model, len(trainer.train_split), config.model.n_ctx)


def test_step_flops_is_the_work_pytorch_counts_in_a_training_step():
    counted, predicted = counted_step_flops(load_experiment("nanda_2023"))
    assert predicted == pytest.approx(counted, rel=0.01)  # the setup whose share of the matmul peak the bench reports
    # other shapes take other paths through forward_at (per-position Q/K/V, a full first layer, no MLP).
    # FlopCounterMode sees matmul kernels only, and the one query's scores over a few keys are computed
    # element-wise, which step_flops counts: it may count a little more, never less.
    base = tiny()
    for model in ({"normalization": "LN", "n_layers": 2}, {"attn_only": True}, {}):
        config = base.model_copy(update={"model": base.model.model_copy(update=model)})
        counted, predicted = counted_step_flops(config)
        assert counted <= predicted <= 1.1 * counted, model


def test_sequence_step_flops_is_the_work_pytorch_counts_in_a_language_model_step(tmp_path):
    # the explicit attention (a hook on the pattern keeps SDPA, which FlopCounterMode cannot see on a CPU, out)
    config = validate_experiment({
        "name": "lm", "task": {"name": "reverse", "seq_len": 5, "n_symbols": 8, "n_train": 32, "n_test": 8},
        "model": {"n_layers": 2, "d_model": 32, "n_heads": 4, "d_head": 8, "d_mlp": 64, "normalization": "LN"},
        "train": {"device": "cpu"}}).resolve()
    trainer = Trainer(config, tmp_path / "run", progress=False)
    trainer.model.blocks[0].attn.hook_pattern.add_hook(lambda pattern, hook: pattern)
    trainer.model.blocks[1].attn.hook_pattern.add_hook(lambda pattern, hook: pattern)
    trainer.update()
    with FlopCounterMode(display=False) as counter:
        trainer.update()
    batch, n_pos = trainer.train_split.tokens.shape
    assert sequence_step_flops(config.model, batch, n_pos) == counter.get_total_flops()


def test_interleaved_medians_calls_each_function_once_per_round_in_turn():
    calls = []
    times = bench.interleaved_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                      rounds=3, warmup=1, device=torch.device("cpu"))
    assert calls == ["a", "b"] * 4
    assert [len(t) for t in times.values()] == [3, 3] and all(t >= 0 for ts in times.values() for t in ts)


def test_the_transformer_lens_baseline_is_our_model_and_trains(tmp_path):
    trainer = Trainer(tiny().resolve(), tmp_path / "run", progress=False)
    step, bridge = bench.transformer_lens_step(trainer, torch.device("cpu"))
    tokens = trainer.task.encode_batch(["0 + 1 =", "3 + 6 =", "5 + 5 ="])
    with torch.no_grad():
        torch.testing.assert_close(bridge(tokens), trainer.model(tokens), rtol=1e-5, atol=1e-5)
    first, second = float(step()), float(step())
    assert second < first


def write_toml(path, data: dict):
    lines = [f'name = "{data["name"]}"']
    for section in ("task", "model", "train"):
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in data[section].items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_a_whole_bench_on_a_tiny_setup_writes_consistent_figures(tmp_path, capsys):
    experiment = write_toml(tmp_path / "tiny.toml", tiny_data(steps=10, lr=1e-2, checkpoint_every=1000))
    language_model = write_toml(tmp_path / "tiny_lm.toml", {
        "name": "tiny_lm", "task": {"name": "reverse", "seq_len": 5, "n_symbols": 8, "n_train": 64, "n_test": 16},
        "model": {"n_layers": 2, "d_model": 32, "n_heads": 4, "d_head": 8, "d_mlp": 64, "normalization": "LN"},
        "train": {"batch_size": 16, "device": "cpu"}})
    setup = bench.BenchSetup(step=experiment, grok=(experiment,), wall=experiment, sequence=language_model)
    out = tmp_path / "bench.json"
    assert bench.main(quick=True, device="cpu", max_steps=None, json_path=str(out), rounds=2, setup=setup) == 0
    result = json.loads(out.read_text())
    table = capsys.readouterr().out

    step = result["step"]
    assert step["rounds"] == 2 and step["ours_ms"] > 0 and step["transformer_lens_ms"] > 0
    assert step["step_speedup_vs_transformer_lens"] == pytest.approx(step["transformer_lens_ms"] / step["ours_ms"])
    assert step["baseline_same_logits_max_abs_diff"] < 1e-4  # the baseline really is our model
    assert 0 < step["share_of_matmul_peak"] == pytest.approx(step["ours_gflops_per_s"] / step["matmul_peak_gflops_per_s"])
    assert f"{step['step_speedup_vs_transformer_lens']:.2f} x" in table

    sequence = result["sequence_step"]  # the full-sequence step: ours, PyTorch's encoder, the bridge
    assert sequence["rounds"] == 2 and sequence["batch"] == 16 and sequence["positions"] == 10  # 5 + separator + 5, less the last
    for baseline in ("torch_encoder", "transformer_lens"):
        assert sequence[f"{baseline}_same_logits_max_abs_diff"] < 1e-4  # the baselines really are our model
        assert sequence[f"speedup_vs_{baseline}"] == pytest.approx(sequence[f"{baseline}_ms"] / sequence["ours_ms"])
        assert sequence[f"{baseline}_tokens_per_s"] == pytest.approx(16 * 10 / (sequence[f"{baseline}_ms"] / 1000))
        assert f"ours {sequence[f'speedup_vs_{baseline}']:.2f}x" in table
    assert result["sequence_step_speedup_vs_torch_encoder"] == sequence["speedup_vs_torch_encoder"]
    assert 0 < sequence["share_of_matmul_peak"] == pytest.approx(sequence["ours_gflops_per_s"] / sequence["matmul_peak_gflops_per_s"])
    assert any("scaled_dot_product" in op for op in sequence["attention_ops"]["torch_encoder"])

    cases = result["grok"][experiment]
    assert result["max_steps"] == QUICK_MAX_STEPS and f"capped at {QUICK_MAX_STEPS} steps" in table  # --quick's cap
    assert list(cases) == list(RECIPES)
    for recipe, case in cases.items():
        assert case["eval_every"] == 50 and case["steps_run"] <= 10  # every case evaluated alike, capped
        assert case["capped"] == (case["steps"] is None) == (case["seconds"] is None)
        if case["steps"] is not None:  # stopped at grok (stop_after_grok = 0), and memorised no later
            assert case["steps_run"] == case["steps"] and case["memorize_step"] <= case["steps"]
        shown = str(case["steps"]) if case["steps"] is not None else f">{case['steps_run']}"
        assert any(recipe in line and shown in line for line in table.splitlines()), recipe

    wall = result["modadd_quick_wall_s"]
    assert wall["experiment"] == experiment and wall["steps"] == 10 and wall["seconds"] > 0
    assert result["wall_s"] >= wall["seconds"] + sum(case["seconds_run"] for case in cases.values())  # the whole bench
    assert result["cpu_s"] > 0 and f"bench wall time {result['wall_s']:.0f} s" in table
    memory = result["memory"]
    assert memory["peak_rss_mb"] > memory["training_rss_mb"] >= 0

    sweep = result["sweep"]["small"]  # --quick: the small sweep size only
    assert "quick" not in result["sweep"] and sweep["rounds"] == 2
    assert sweep["members"] == 64 and sweep["speedup_vs_sequential"] > 0
    assert sweep["speedup_vs_sequential"] == pytest.approx(sweep["sequential_step_ms"] / sweep["ensemble_step_ms"], rel=1e-6)
    assert sweep["member_steps_per_s"] == pytest.approx(64 / (sweep["ensemble_step_ms"] / 1000), rel=1e-6)
    assert 0 < sweep["share_of_matmul_peak"] < 1
    assert f"{sweep['speedup_vs_sequential']:6.2f}x sequential" in table


def test_json_without_a_path_puts_the_json_alone_on_standard_output(monkeypatch, capsys):
    """`lab bench --quick --json`: standard output is the JSON alone (to pipe), the table goes to standard error."""
    from lab import cli

    figures = {"quick": True, "max_steps": QUICK_MAX_STEPS}
    monkeypatch.setattr(bench, "run_bench", lambda **kwargs: {**figures, "kwargs": sorted(kwargs)})
    monkeypatch.setattr(bench, "format_table", lambda result: f"TABLE of {len(result)} keys")
    assert cli.main(["bench", "--quick", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {**figures, "kwargs": ["device", "max_steps", "quick", "rounds", "setup"]}
    assert err.strip() == "TABLE of 3 keys"


def test_bench_cli_rejects_bad_arguments_in_one_line():
    done = subprocess.run([sys.executable, "-m", "lab.cli", "bench", "--max-steps", "0"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip() == "lab: error: --max-steps must be at least 1, got 0"


# --- the full-sequence step (lab/bench/sequence.py) ------------------------------------------------


def small_lm(**model):
    """A causal 2-layer model with a language model's shapes (every position's logits), built directly."""
    from lab.config import ModelConfig
    from lab.models.architectures import build_model

    shape = {"n_layers": 2, "d_model": 32, "n_heads": 4, "d_head": 8, "d_mlp": 64}
    cfg = ModelConfig(**{**shape, **model}, d_vocab=50, d_vocab_out=50, n_ctx=12, causal=True)
    built = build_model(cfg).train()
    with torch.no_grad():  # LayerNorm gains and biases away from 1 and 0, so that a mis-copied one shows
        for name, param in built.named_parameters():
            if not name.rsplit(".", 1)[-1].startswith("W_"):
                param.add_(0.1 * torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
    return built


@pytest.mark.parametrize("model", [{"normalization": "LN", "act_fn": "gelu"}, {"normalization": "none"},
                                   {"normalization": "LN", "positional": "none"}])
def test_pytorchs_encoder_baseline_is_our_model_logits_and_gradients(model):
    from lab.bench.sequence import TorchEncoderLM

    ours = small_lm(**model)
    encoder = TorchEncoderLM(ours).train()
    tokens = torch.randint(0, 50, (5, 12), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 50, (5, 12), generator=torch.Generator().manual_seed(1))
    ours_logits, their_logits = ours.forward_at(tokens, None), encoder(tokens)
    torch.testing.assert_close(their_logits, ours_logits, rtol=1e-5, atol=1e-5)
    for logits in (ours_logits, their_logits):
        torch.nn.functional.cross_entropy(logits.reshape(-1, 50), labels.reshape(-1)).backward()
    torch.testing.assert_close(encoder.embed.weight.grad, ours.W_E.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(encoder.unembed.weight.grad, ours.W_U.grad.T, rtol=1e-4, atol=1e-6)
    # the first layer's query weights: in_proj_weight's first d_model rows are W_Q as (head * d_head, d_model)
    W_Q_grad = ours.blocks[0].attn.W_Q.grad.permute(0, 2, 1).reshape(32, 32)
    torch.testing.assert_close(encoder.encoder.layers[0].self_attn.in_proj_weight.grad[:32], W_Q_grad, rtol=1e-4, atol=1e-6)


def test_pytorchs_encoder_baseline_is_causal_and_runs_fused_attention():
    from lab.bench.sequence import TorchEncoderLM, attention_ops

    encoder = TorchEncoderLM(small_lm(normalization="LN")).train()
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 50
    with torch.no_grad():
        before, after = encoder(tokens), encoder(changed)
    torch.testing.assert_close(before[:, :7], after[:, :7])  # a later token changes no earlier logits
    assert (before[:, 7:] - after[:, 7:]).abs().max() > 1e-3
    assert any("scaled_dot_product" in op for op in attention_ops(lambda: encoder(tokens)))


def test_pytorchs_encoder_baseline_refuses_a_model_it_cannot_be_in_one_line():
    from lab.bench.sequence import TorchEncoderLM
    from lab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^model.attn_score = 'dot' has no equivalent in PyTorch's TransformerEncoder"):
        TorchEncoderLM(small_lm(attn_score="dot"))
    with pytest.raises(ConfigError, match=r"^model.n_heads \* model.d_head = 16 differs from d_model = 32"):
        TorchEncoderLM(small_lm(n_heads=2))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line_for_the_bench_and_for_training(tmp_path):
    done = subprocess.run([sys.executable, "-m", "lab.cli", "bench", "--device", "cuda"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == "lab: error: --device cuda: no CUDA device is available on this machine; use --device cpu"
    experiment = write_toml(tmp_path / "tiny.toml", tiny_data())
    done = subprocess.run([sys.executable, "-m", "lab.cli", "train", experiment, "--runs-dir", str(tmp_path / "runs"),
                           "--set", "train.device=cuda"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == "lab: error: train.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'"
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no run folder left behind
