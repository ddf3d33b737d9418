"""`lab bench`: how fast the lab trains, measured side by side in one process.

1. Step time on the Nanda et al. 2023 setup (p = 113, 30% of pairs, full batch of 3,830, one layer,
   d_model 128, 4 heads, d_mlp 512, AdamW): our `Trainer.update` against the way TransformerLens
   users train today (TransformerLens's Grokking demo): a `TransformerBridge.boot_native` model of
   the same config, full-sequence logits, float64 cross-entropy on the last position,
   `torch.optim.AdamW`. The two are interleaved with a fp32 matmul that measures this machine's
   peak, round by round, so that all three see the same load; medians are reported.
   `share_of_matmul_peak` = (FLOPs our step must do / our median step time) / measured peak.
2. Steps and seconds to grok (first evaluation with test accuracy >= 0.99) of every recipe in
   `lab.training.recipes.RECIPES` on `modadd_quick` and `nanda_2023`, each run stopping at grok or at
   `--max-steps`; memorisation steps are recorded to show the generalisation is delayed.
   `--quick` runs only modadd_quick. The wall time of a whole `lab train modadd_quick` process is
   measured too.
3. Peak memory (max RSS, or CUDA max allocated) of a training run on the Nanda setup.
4. The full-sequence step of a language model (the shipped text experiment, shakespeare): ours against
   PyTorch's own `nn.TransformerEncoder` and the TransformerLens bridge (lab/bench/sequence.py).
5. Sweeps: a stacked ensemble against its members one after another (lab/bench/sweep.py).

`--quick` caps every grok run at `QUICK_MAX_STEPS` (a case that has not grokked by then is reported
as `>N`), so that it finishes in about three minutes on an idle 2-core machine; the full bench caps
them at `--max-steps` (20,000 by default).

JSON keys (`--json PATH`, or `--json` alone for standard output) are documented in the README's benchmark section.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from lab.bench import FULL_MAX_STEPS, QUICK_MAX_STEPS
from lab.bench.sequence import bench_sequence_step
from lab.bench.sweep import bench_sweep
from lab.config import load_experiment
from lab.models.export import to_transformer_lens
from lab.bench.measure import interleaved_medians, matmul_n, matmul_sample, step_flops
from lab.training.recipes import RECIPES, recipe_overrides
from lab.runs.storage import atomic_write_json
from lab.training.trainer import Trainer, resolve_device


@dataclass(frozen=True)
class BenchSetup:
    """Which experiments the bench measures (names in experiments/ or TOML paths); the defaults are `lab bench`'s."""

    step: str = "nanda_2023"  # step timing and peak memory
    grok: tuple[str, ...] = ("modadd_quick", "nanda_2023")  # steps to grok per recipe (--quick: the first)
    wall: str = "modadd_quick"  # the whole `lab train` process, start to exit
    sequence: str = "shakespeare"  # the full-sequence (language-model) step against PyTorch's encoder and the bridge


# --- FLOPs ---------------------------------------------------------------------------------------


def transformer_lens_step(ours: Trainer, device: torch.device) -> tuple[Callable[[], torch.Tensor], torch.nn.Module]:
    """One training step as in TransformerLens's Grokking demo, on a native TransformerBridge of the same
    config (`boot_native`, via `lab.models.export`) that starts from our model's weights."""
    model = to_transformer_lens(ours.model, requires_grad=True).to(device, print_details=False).train()
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


def bench_step(rounds: int, device: torch.device, log: Callable[[str], None], experiment: str = "nanda_2023") -> dict:
    config = load_experiment(experiment, [f"train.device={json.dumps(device.type)}"]).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        ours = Trainer(config, Path(tmp) / "run", progress=False)
    log("importing TransformerLens for the baseline ...")
    tl_step, bridge = transformer_lens_step(ours, device)
    # The baseline must be the same model: with our weights it must give our logits.
    with torch.no_grad():
        tokens = ours.train_split.tokens[:256]
        same = (bridge(tokens)[:, -1] - ours.model(tokens)[:, -1]).abs().max().item()
    n = matmul_n(device)
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
from lab.training.trainer import Trainer
device, experiment = sys.argv[1], sys.argv[2]
config = load_experiment(experiment, [f"train.device={json.dumps(device)}"]).resolve()

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


def bench_memory(device: torch.device, experiment: str = "nanda_2023") -> dict:
    """Peak memory of a training process (5 steps of `experiment`, by default the Nanda setup), in a fresh process."""
    done = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, device.type, experiment], capture_output=True, text=True, check=True)
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    out = {"peak_rss_mb": round(probe["maxrss_kb"] / 1024, 1),
           "training_rss_mb": round((probe["training_peak_kb"] - probe["before_kb"]) / 1024, 1)}
    if probe["cuda"] is not None:
        out["cuda_max_allocated_mb"] = round(probe["cuda"] / 2**20, 1)
    return out


# --- the whole bench -----------------------------------------------------------------------------


def run_bench(quick: bool = False, device: str = "cpu", max_steps: int | None = None, rounds: int | None = None,
              log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
              setup: BenchSetup = BenchSetup()) -> dict:
    """Every figure of `lab bench` as plain data. `max_steps` caps each grok run (default FULL_MAX_STEPS,
    or QUICK_MAX_STEPS with `quick`)."""
    dev = resolve_device(device)
    if max_steps is None:
        max_steps = QUICK_MAX_STEPS if quick else FULL_MAX_STEPS
    began = time.perf_counter()
    result: dict = {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "quick": quick,
        "max_steps": max_steps,
        "setup": {"step": setup.step, "grok": list(setup.grok), "wall": setup.wall, "sequence": setup.sequence},
    }
    step = bench_step(rounds or (10 if quick else 30), dev, log, setup.step)
    result["step"] = step
    log(f"step: ours {step['ours_ms']:.1f} ms, TransformerLens {step['transformer_lens_ms']:.1f} ms "
        f"({step['step_speedup_vs_transformer_lens']:.2f}x), {100 * step['share_of_matmul_peak']:.0f}% of the matmul peak")
    result["step_speedup_vs_transformer_lens"] = step["step_speedup_vs_transformer_lens"]
    result["share_of_matmul_peak"] = step["share_of_matmul_peak"]
    sequence = result["sequence_step"] = bench_sequence_step(rounds or (10 if quick else 30), dev, log, setup.sequence)
    log(f"full-sequence step ({setup.sequence}): ours {sequence['ours_ms']:.1f} ms, PyTorch's encoder "
        f"{sequence['torch_encoder_ms']:.1f} ms ({sequence['speedup_vs_torch_encoder']:.2f}x), TransformerLens "
        f"{sequence['transformer_lens_ms']:.1f} ms ({sequence['speedup_vs_transformer_lens']:.2f}x)")
    result["sequence_step_speedup_vs_torch_encoder"] = sequence["speedup_vs_torch_encoder"]
    result["sequence_step_speedup_vs_transformer_lens"] = sequence["speedup_vs_transformer_lens"]
    result["grok"] = {}
    for experiment in setup.grok[:1] if quick else setup.grok:
        result["grok"][experiment] = {}
        for recipe in RECIPES:
            log(f"grok: {experiment} / {recipe} (cap {max_steps} steps) ...")
            case = result["grok"][experiment][recipe] = grok_case(experiment, recipe, max_steps, dev)
            log(f"  memorised at {case['memorize_step']}, grokked at {case['steps']} ({case['seconds_run']:.1f} s)")
    log(f"wall time of `lab train {setup.wall}` ...")
    result["modadd_quick_wall_s"] = {"experiment": setup.wall, **wall_time_of_train(setup.wall, dev)}
    result["memory"] = bench_memory(dev, setup.step)
    # Sweeps: 64 members trained as one stacked ensemble against the same members one after another.
    result["sweep"] = bench_sweep(device, rounds=rounds, sizes=("small",) if quick else ("small", "quick"), log=log)
    result["load_average_1m_end"] = os.getloadavg()[0]
    result["wall_s"] = round(time.perf_counter() - began, 1)
    # CPU seconds of this process and the ones it ran (lab train, the memory probe): under load the wall
    # time stretches, this much less; with one thread (OMP_NUM_THREADS=1) it is about the idle wall time
    used = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    result["cpu_s"] = round(sum(u.ru_utime + u.ru_stime for u in used), 1)
    return result


def format_table(result: dict) -> str:
    s, q = result["step"], result["sequence_step"]
    step_setup = result.get("setup", {}).get("step", "nanda_2023")
    lines = [
        f"device {result['device']} ({result['device_name']}), torch {result['torch']}, {result['threads']} threads, "
        f"load average {result['load_average_1m']:.1f} -> {result['load_average_1m_end']:.1f}",
        "",
        f"Step on {'the Nanda et al. 2023 setup' if step_setup == 'nanda_2023' else step_setup} (medians of {s['rounds']} interleaved rounds)",
        f"  ours                  {s['ours_ms']:9.1f} ms   {s['ours_gflops_per_s']:7.1f} GFLOP/s ({s['flops_per_step'] / 1e9:.2f} GFLOP/step)",
        f"  TransformerLens       {s['transformer_lens_ms']:9.1f} ms",
        f"  speed-up              {s['step_speedup_vs_transformer_lens']:9.2f} x",
        f"  fp32 matmul peak      {s['matmul_peak_gflops_per_s']:9.1f} GFLOP/s ({s['matmul_n']}^3)",
        f"  share of matmul peak  {100 * s['share_of_matmul_peak']:9.1f} %",
        "",
        f"Full-sequence step of {q['experiment']} ({q['model']['n_layers']} layers, d_model {q['model']['d_model']}, "
        f"vocab {q['model']['d_vocab']}; batch {q['batch']} x {q['positions']} tokens; medians of {q['rounds']} interleaved rounds)",
        f"  ours                  {q['ours_ms']:9.1f} ms   {q['ours_tokens_per_s']:9.0f} tokens/s   "
        f"{100 * q['share_of_matmul_peak']:.0f}% of the matmul peak ({q['flops_per_step'] / 1e9:.2f} GFLOP/step)",
        f"  PyTorch encoder       {q['torch_encoder_ms']:9.1f} ms   {q['torch_encoder_tokens_per_s']:9.0f} tokens/s   "
        f"ours {q['speedup_vs_torch_encoder']:.2f}x",
        f"  TransformerLens       {q['transformer_lens_ms']:9.1f} ms   {q['transformer_lens_tokens_per_s']:9.0f} tokens/s   "
        f"ours {q['speedup_vs_transformer_lens']:.2f}x",
        "",
        f"Steps to grok (first eval with test acc >= 0.99; runs capped at {result['max_steps']} steps)",
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
        f"`lab train {w.get('experiment', 'modadd_quick')}`: {w['seconds']:.1f} s process start to exit, memorized at {w['memorize_step']}, "
        f"grokked at {w['grok_step']}, {w['steps']} steps",
        f"Peak memory of a training process ({step_setup}): "
        f"{result['memory']['peak_rss_mb']:.0f} MB RSS"
        + (f", CUDA {result['memory']['cuda_max_allocated_mb']:.0f} MB" if "cuda_max_allocated_mb" in result["memory"] else ""),
    ]
    sweep = result.get("sweep", {})
    sizes = [size for size in ("small", "quick") if size in sweep]
    if sizes:
        lines += ["", "Sweeps: 64 members as one stacked ensemble vs one after another (medians)"]
        for size in sizes:
            f = sweep[size]
            lines.append(f"  {size:<6} {f['speedup_vs_sequential']:6.2f}x sequential, {f['member_steps_per_s']:8.0f} member steps/s, "
                         f"{100 * f['share_of_matmul_peak']:5.1f}% of the matmul peak")
    if "wall_s" in result:
        lines += ["", f"bench wall time {result['wall_s']:.0f} s ({result['cpu_s']:.0f} CPU seconds)"]
    return "\n".join(lines)


def main(quick: bool, device: str, max_steps: int | None, json_path: str | None, rounds: int | None = None,
         setup: BenchSetup = BenchSetup()) -> int:
    """`lab bench`: the table on standard output and the JSON in `json_path`; `json_path` "-": the JSON on
    standard output and the table on standard error (progress lines always go to standard error)."""
    result = run_bench(quick=quick, device=device, max_steps=max_steps, rounds=rounds, setup=setup)
    if json_path == "-":
        print(format_table(result), file=sys.stderr)
        print(json.dumps(result, indent=2))
        return 0
    print(format_table(result))
    if json_path:
        atomic_write_json(Path(json_path), result)
    return 0
