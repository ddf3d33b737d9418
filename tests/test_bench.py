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

from lab.bench import suite as bench
from lab.config import load_experiment
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
    setup = bench.BenchSetup(step=experiment, grok=(experiment,), wall=experiment)
    out = tmp_path / "bench.json"
    assert bench.main(quick=True, device="cpu", max_steps=10, json_path=str(out), rounds=2, setup=setup) == 0
    result = json.loads(out.read_text())
    table = capsys.readouterr().out

    step = result["step"]
    assert step["rounds"] == 2 and step["ours_ms"] > 0 and step["transformer_lens_ms"] > 0
    assert step["step_speedup_vs_transformer_lens"] == pytest.approx(step["transformer_lens_ms"] / step["ours_ms"])
    assert step["baseline_same_logits_max_abs_diff"] < 1e-4  # the baseline really is our model
    assert 0 < step["share_of_matmul_peak"] == pytest.approx(step["ours_gflops_per_s"] / step["matmul_peak_gflops_per_s"])
    assert f"{step['step_speedup_vs_transformer_lens']:.2f} x" in table

    cases = result["grok"][experiment]
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
    memory = result["memory"]
    assert memory["peak_rss_mb"] > memory["training_rss_mb"] >= 0

    sweep = result["sweep"]["small"]  # --quick: the small sweep size only
    assert "quick" not in result["sweep"] and sweep["rounds"] == 2
    assert sweep["members"] == 64 and sweep["speedup_vs_sequential"] > 0
    assert sweep["speedup_vs_sequential"] == pytest.approx(sweep["sequential_step_ms"] / sweep["ensemble_step_ms"], rel=1e-6)
    assert sweep["member_steps_per_s"] == pytest.approx(64 / (sweep["ensemble_step_ms"] / 1000), rel=1e-6)
    assert 0 < sweep["share_of_matmul_peak"] < 1
    assert f"{sweep['speedup_vs_sequential']:6.2f}x sequential" in table


def test_bench_cli_rejects_bad_arguments_in_one_line():
    done = subprocess.run([sys.executable, "-m", "lab.cli", "bench", "--max-steps", "0"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip() == "lab: error: --max-steps must be at least 1, got 0"
