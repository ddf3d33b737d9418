"""`lab bench`: how fast the lab trains, measured side by side in one process.

1. Step time on the Nanda et al. 2023 setup (p = 113, 30% of pairs, full batch of 3,830, one layer,
   d_model 128, 4 heads, d_mlp 512, AdamW): our `Trainer.update` against the way TransformerLens
   users train today (TransformerLens's Grokking demo): a `TransformerBridge.boot_native` model of
   the same config, full-sequence logits, float64 cross-entropy on the last position,
   `torch.optim.AdamW`. The two are interleaved with a fp32 matmul that measures this machine's
   peak, round by round, so that all three see the same load; medians are reported.
   `share_of_matmul_peak` = (FLOPs our step must do / our median step time) / measured peak.
2. Steps and seconds to grok (first evaluation with test accuracy >= 0.99) of every recipe in
   `lab.recipes.RECIPES` on `modadd_quick` and `nanda_2023`, each run stopping at grok or at
   `--max-steps`; memorisation steps are recorded to show the generalisation is delayed.
   `--quick` runs only modadd_quick. The wall time of a whole `lab train modadd_quick` process is
   measured too.
3. Peak memory (max RSS, or CUDA max allocated) of a training run on the Nanda setup.

JSON keys (`--json PATH`) are documented in the README's benchmark section.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from lab.config import ModelConfig, load_experiment
from lab.recipes import RECIPES, recipe_overrides
from lab.training import Trainer, resolve_device

GROK_EXPERIMENTS = ("modadd_quick", "nanda_2023")


# --- FLOPs ---------------------------------------------------------------------------------------


def step_flops(cfg: ModelConfig, batch: int, n_pos: int, causal_keys: int | None = None) -> int:
    """Matmul FLOPs one training step must do when the loss reads one position (2 per multiply-add),
    counted for the algorithm of `Transformer.forward_at`.

    Earlier layers run at every position; the last layer needs keys and values at the `causal_keys`
    positions the read position can see (all by default), and its query, attention output, MLP and
    unembedding at the read position only. A one-layer model without LayerNorm gets Q, K and V from
    per-token and per-position tables ((d_vocab + n_pos) rows instead of batch * positions).
    Backward costs twice the forward (gradients of inputs and of weights; the first layer's input
    gradient is needed too, since the embeddings are trained). Element-wise work (softmax, ReLU,
    AdamW) and table look-ups are not counted.
    """
    d, he, h, e = cfg.d_model, cfg.n_heads * cfg.d_head, cfg.n_heads, cfg.d_head
    keys = n_pos if causal_keys is None else causal_keys
    mlp = 0 if cfg.attn_only else 2 * 2 * d * cfg.d_mlp
    per_position_full = 2 * d * 3 * he + 2 * he * d + mlp  # QKV, O, MLP at one position
    scores_full = 2 * 2 * h * e * n_pos * n_pos  # q·k and pattern·v over all (query, key) pairs
    forward = (cfg.n_layers - 1) * batch * (n_pos * per_position_full + scores_full)
    if cfg.n_layers == 1 and cfg.normalization == "none":
        forward += (cfg.d_vocab + n_pos) * 2 * d * 3 * he  # the Q, K, V tables
        last = 2 * 2 * h * e * keys + 2 * he * d + mlp
    else:
        last = keys * 2 * d * 2 * he + 2 * d * he + 2 * 2 * h * e * keys + 2 * he * d + mlp
    forward += batch * (last + 2 * d * cfg.d_vocab_out)
    return 3 * forward


# --- timing --------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(fns: dict[str, Callable[[], object]], rounds: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """Call every function once per round, in turn, `rounds` times (after `warmup` rounds); seconds per call."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def matmul_sample(n: int, device: torch.device) -> tuple[int, Callable[[], object]]:
    """(FLOPs, a function doing one n x n x n fp32 matmul): the probe of the machine's matmul peak."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)
    return 2 * n**3, lambda: torch.mm(a, b, out=out)


def transformer_lens_step(ours: Trainer, device: torch.device) -> tuple[Callable[[], torch.Tensor], torch.nn.Module]:
    """One training step as in TransformerLens's Grokking demo, on a native TransformerBridge of the same
    config (`boot_native`, via `lab.export`) that starts from our model's weights."""
    model = ours.model.to_transformer_lens().to(device).train()
    tc = ours.config.train
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, betas=tc.betas)
    tokens, labels = ours.train_split.tokens, ours.train_split.labels

    def step() -> float:
        logits = model(tokens)[:, -1].to(torch.float64)  # the demo's loss_fn: float64 log-softmax
        loss = -logits.log_softmax(dim=-1).gather(-1, labels[:, None]).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    return step, model


def bench_step(rounds: int, device: torch.device, log: Callable[[str], None]) -> dict:
    config = load_experiment("nanda_2023", [f"train.device={json.dumps(device.type)}"]).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        ours = Trainer(config, Path(tmp) / "run", progress=False)
    log("importing TransformerLens for the baseline ...")
    tl_step, bridge = transformer_lens_step(ours, device)
    # The baseline must be the same model: with our weights it must give our logits.
    with torch.no_grad():
        tokens = ours.train_split.tokens[:256]
        same = (bridge(tokens)[:, -1] - ours.model(tokens)[:, -1]).abs().max().item()
    n = 2048 if device.type == "cpu" else 8192
    peak_flops, matmul = matmul_sample(n, device)
    flops = step_flops(config.model, len(ours.train_split), config.model.n_ctx)
    log(f"timing {rounds} interleaved rounds of: TransformerLens step, our step, {n}^3 matmul ...")
    times = interleaved_medians({"transformer_lens": tl_step, "ours": ours.update, "matmul": matmul},
                                rounds=rounds, warmup=3, device=device)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    peak = peak_flops / med["matmul"]
    achieved = flops / med["ours"]
    return {
        "ours_ms": 1e3 * med["ours"],
        "transformer_lens_ms": 1e3 * med["transformer_lens"],
        "rounds": rounds,
        "flops_per_step": flops,
        "ours_gflops_per_s": achieved / 1e9,
        "matmul_peak_gflops_per_s": peak / 1e9,
        "matmul_n": n,
        "baseline_same_logits_max_abs_diff": same,
        "step_speedup_vs_transformer_lens": med["transformer_lens"] / med["ours"],
        "share_of_matmul_peak": achieved / peak,
    }


# --- grokking ------------------------------------------------------------------------------------


def grok_case(experiment: str, recipe: str, max_steps: int, device: torch.device) -> dict:
    """Train `experiment` with `recipe` until test acc >= 0.99 (or `max_steps`); steps and seconds to grok."""
    # every case is evaluated every 50 steps, so that grok steps are resolved alike
    overrides = [*recipe_overrides(recipe), f"train.device={json.dumps(device.type)}", "train.stop_after_grok=0",
                 "train.eval_every=50"]
    config = load_experiment(experiment, overrides).resolve()
    if config.train.steps > max_steps:
        config = config.model_copy(update={"train": config.train.model_copy(update={"steps": max_steps})})
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summary = Trainer(config, Path(tmp) / "run", progress=False).run()
        seconds = time.perf_counter() - start
    if summary["status"] == "interrupted":  # Ctrl-C stopped the training loop: stop the whole bench
        raise KeyboardInterrupt
    grok, memorize = summary["grok_step"], summary["memorize_step"]
    return {
        "steps": grok,
        "seconds": round(seconds, 2) if grok is not None else None,
        "memorize_step": memorize,
        "steps_run": summary["step"],
        "seconds_run": round(seconds, 2),
        "eval_every": config.train.eval_every,
        "capped": grok is None,
        "delay": round(grok / memorize, 2) if grok and memorize else None,
    }


def wall_time_of_train(experiment: str, device: torch.device) -> dict:
    """A whole `lab train EXPERIMENT --quiet` process, start to exit."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "lab.cli", "train", experiment, "--runs-dir", tmp, "--quiet",
                               "--set", f"train.device={json.dumps(device.type)}"], capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"lab train {experiment} failed: {done.stderr.strip()[-500:]}")
        summary = json.loads(next(Path(tmp).iterdir()).joinpath("summary.json").read_text())
    return {"seconds": round(seconds, 2), "steps": summary["step"], "memorize_step": summary["memorize_step"],
            "grok_step": summary["grok_step"], "final_test_acc": summary["final"].get("test_acc")}


# --- memory --------------------------------------------------------------------------------------

_MEMORY_PROBE = """
import json, resource, sys, tempfile, torch
from lab.config import load_experiment
from lab.training import Trainer
device = sys.argv[1]
config = load_experiment("nanda_2023", [f"train.device={json.dumps(device)}"]).resolve()

def status_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

try:  # Linux: reset the high-water mark, so that the imports' transient peak does not hide training's
    open("/proc/self/clear_refs", "w").write("5")
    base = status_kb("VmRSS")
except OSError:
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
trainer = Trainer(config, tempfile.mkdtemp() + "/run", progress=False)
for _ in range(5):
    trainer.update()
cuda = torch.cuda.max_memory_allocated() if device == "cuda" else None
try:
    training_peak = status_kb("VmHWM")
except OSError:
    training_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "before_kb": base,
                  "training_peak_kb": training_peak, "cuda": cuda}))
"""


def bench_memory(device: torch.device) -> dict:
    """Peak memory of a training process on the Nanda setup (5 full-batch steps), in a fresh process."""
    done = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, device.type], capture_output=True, text=True, check=True)
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    out = {"peak_rss_mb": round(probe["maxrss_kb"] / 1024, 1),
           "training_rss_mb": round((probe["training_peak_kb"] - probe["before_kb"]) / 1024, 1)}
    if probe["cuda"] is not None:
        out["cuda_max_allocated_mb"] = round(probe["cuda"] / 2**20, 1)
    return out


# --- the whole bench -----------------------------------------------------------------------------


def run_bench(quick: bool = False, device: str = "cpu", max_steps: int = 20000, rounds: int | None = None,
              log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    dev = resolve_device(device)
    result: dict = {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "quick": quick,
        "max_steps": max_steps,
    }
    step = bench_step(rounds or (10 if quick else 30), dev, log)
    result["step"] = step
    log(f"step: ours {step['ours_ms']:.1f} ms, TransformerLens {step['transformer_lens_ms']:.1f} ms "
        f"({step['step_speedup_vs_transformer_lens']:.2f}x), {100 * step['share_of_matmul_peak']:.0f}% of the matmul peak")
    result["step_speedup_vs_transformer_lens"] = step["step_speedup_vs_transformer_lens"]
    result["share_of_matmul_peak"] = step["share_of_matmul_peak"]
    result["grok"] = {}
    for experiment in GROK_EXPERIMENTS[:1] if quick else GROK_EXPERIMENTS:
        result["grok"][experiment] = {}
        for recipe in RECIPES:
            log(f"grok: {experiment} / {recipe} (cap {max_steps} steps) ...")
            case = result["grok"][experiment][recipe] = grok_case(experiment, recipe, max_steps, dev)
            log(f"  memorised at {case['memorize_step']}, grokked at {case['steps']} ({case['seconds_run']:.1f} s)")
    log("wall time of `lab train modadd_quick` ...")
    result["modadd_quick_wall_s"] = wall_time_of_train("modadd_quick", dev)
    result["memory"] = bench_memory(dev)
    result["load_average_1m_end"] = os.getloadavg()[0]
    return result


def format_table(result: dict) -> str:
    s = result["step"]
    lines = [
        f"device {result['device']} ({result['device_name']}), torch {result['torch']}, {result['threads']} threads, "
        f"load average {result['load_average_1m']:.1f} -> {result['load_average_1m_end']:.1f}",
        "",
        f"Step on the Nanda et al. 2023 setup (medians of {s['rounds']} interleaved rounds)",
        f"  ours                  {s['ours_ms']:9.1f} ms   {s['ours_gflops_per_s']:7.1f} GFLOP/s ({s['flops_per_step'] / 1e9:.2f} GFLOP/step)",
        f"  TransformerLens       {s['transformer_lens_ms']:9.1f} ms",
        f"  speed-up              {s['step_speedup_vs_transformer_lens']:9.2f} x",
        f"  fp32 matmul peak      {s['matmul_peak_gflops_per_s']:9.1f} GFLOP/s ({s['matmul_n']}^3)",
        f"  share of matmul peak  {100 * s['share_of_matmul_peak']:9.1f} %",
        "",
        "Steps to grok (first eval with test acc >= 0.99)",
        f"  {'experiment':<14}{'recipe':<22}{'memorized':>10}{'grokked':>9}{'seconds':>9}",
    ]
    for experiment, recipes in result["grok"].items():
        for recipe, r in recipes.items():
            grok = r["steps"] if r["steps"] is not None else f">{r['steps_run']}"
            secs = f"{r['seconds']:.1f}" if r["seconds"] is not None else f">{r['seconds_run']:.0f}"
            lines.append(f"  {experiment:<14}{recipe:<22}{str(r['memorize_step']):>10}{str(grok):>9}{secs:>9}")
    w = result["modadd_quick_wall_s"]
    lines += [
        "",
        f"`lab train modadd_quick`: {w['seconds']:.1f} s process start to exit, memorized at {w['memorize_step']}, "
        f"grokked at {w['grok_step']}, {w['steps']} steps",
        f"Peak memory of a Nanda training process: {result['memory']['peak_rss_mb']:.0f} MB RSS"
        + (f", CUDA {result['memory']['cuda_max_allocated_mb']:.0f} MB" if "cuda_max_allocated_mb" in result["memory"] else ""),
    ]
    return "\n".join(lines)


def main(quick: bool, device: str, max_steps: int, json_path: str | None, rounds: int | None = None) -> int:
    result = run_bench(quick=quick, device=device, max_steps=max_steps, rounds=rounds)
    print(format_table(result))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return 0
