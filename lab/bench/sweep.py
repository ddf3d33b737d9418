"""How much faster a sweep trains as one stacked ensemble (lab/sweeps/ensemble.py: each model's own forward,
vmapped over the members) than member after member.

Two sizes, each a 64-member sweep: 4 weight decays x 4 training fractions x 4 model seeds, full batch:

- small: the phase-diagram regime, p = 23, d_model 32, 4 heads of 8, d_mlp 128. One such model's step
  is mostly per-step overhead and small kernels, which stacking shares out.
- quick: modadd_quick's model (p = 59, d_model 128, d_mlp 512), already compute-bound on a CPU.

Method: one process, interleaved rounds (`lab.bench.measure.interleaved_medians`): each round times one
ensemble step of all 64 members, one `Trainer.update` of each sampled member (one per training
fraction, each with another weight decay; a step's cost depends on the fraction, not on the weight
decay or the seed), and an n^3 fp32 matmul that measures the machine's peak under the same load.
The sequential time of the sweep is 16 x the sampled members' median step times; the speed-up is
that over the ensemble's median step time. Steps only: evaluation and checkpoints are the same
work either way and are not timed.

`bench_sweep()` returns, per size: speedup_vs_sequential, member_steps_per_s (member updates per
second in the ensemble), the two step times, and share_of_matmul_peak (the FLOPs the 64 steps must
do, counted as `lab.bench.measure.step_flops` counts a standalone step, over the ensemble's step time,
over the measured peak); buckets (batched forwards per step: members of equal rows per step); plus
restack_ms (dropping one finished member from the stack) and how
many steps of the dead member's compute that copy costs (why finished members are re-stacked,
not masked).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lab.bench.measure import interleaved_medians, matmul_n, matmul_sample, step_flops, sync
from lab.config import ExperimentConfig, load_experiment, validate_experiment
from lab.sweeps.ensemble import StackedEnsemble
from lab.training.trainer import Trainer, resolve_device

WEIGHT_DECAYS = (0.1, 0.3, 1.0, 3.0)
TRAIN_FRACS = (0.3, 0.4, 0.5, 0.6)
SEEDS = (0, 1, 2, 3)
SIZES = ("small", "quick")


def sweep_configs(size: str, device: str = "cpu") -> list[ExperimentConfig]:
    """The 64 members of a size: weight decay x training fraction x model seed, seeds varying fastest."""
    if size == "small":
        base = validate_experiment({
            "name": "sweep_small",
            "task": {"name": "modular", "p": 23, "train_frac": 0.3},
            "model": {"n_layers": 1, "d_model": 32, "n_heads": 4, "d_head": 8, "d_mlp": 128},
            "train": {"steps": 1000, "lr": 1e-3, "betas": [0.9, 0.98]},
        })
    elif size == "quick":
        base = load_experiment("modadd_quick")
    else:
        raise ValueError(f"unknown sweep size {size!r}; valid: {', '.join(map(repr, SIZES))}")
    configs = []
    for weight_decay in WEIGHT_DECAYS:
        for frac in TRAIN_FRACS:
            for seed in SEEDS:
                data = base.model_dump()
                data["name"] = base.name
                data["task"]["train_frac"] = frac
                data["model"]["seed"] = seed
                data["train"].update(weight_decay=weight_decay, device=device, batch_size=None)
                configs.append(validate_experiment(data))
    return configs


def bench_size(size: str, rounds: int, device: torch.device, peak_probe: tuple[int, Callable[[], object]],
               log: Callable[[str], None] = print) -> dict:
    """Time one size: the ensemble's step against the sampled members' standalone steps, interleaved."""
    configs = sweep_configs(size, device.type)
    log(f"sweep {size}: building the 64-member ensemble and {len(TRAIN_FRACS)} standalone trainers ...")
    ensemble = StackedEnsemble(configs)
    # one member per training fraction, each with another weight decay and seed
    sample = [configs[w * 16 + f * 4 + f] for f, w in zip(range(len(TRAIN_FRACS)), range(len(WEIGHT_DECAYS)))]
    with tempfile.TemporaryDirectory() as tmp:
        trainers = [Trainer(c, Path(tmp) / f"m{i}", progress=False) for i, c in enumerate(sample)]
    peak_flops, matmul = peak_probe
    fns: dict[str, Callable[[], object]] = {"ensemble": ensemble.update, "matmul": matmul}
    fns.update({f"member{i}": t.update for i, t in enumerate(trainers)})
    log(f"sweep {size}: {rounds} interleaved rounds of the ensemble step, {len(trainers)} standalone steps and a matmul ...")
    times = interleaved_medians(fns, rounds=rounds, warmup=3, device=device)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    members = len(configs)
    per_fraction = members // len(trainers)
    sequential = per_fraction * sum(med[f"member{i}"] for i in range(len(trainers)))
    cfg = configs[0].resolve().model
    n_pos = cfg.n_ctx
    flops = per_fraction * sum(step_flops(cfg, len(t.train_split), n_pos) for t in trainers)
    peak = peak_flops / med["matmul"]
    restack = _restack_ms(ensemble, device)
    return {
        "members": members,
        "speedup_vs_sequential": sequential / med["ensemble"],
        "member_steps_per_s": members / med["ensemble"],
        "ensemble_step_ms": 1e3 * med["ensemble"],
        "sequential_step_ms": 1e3 * sequential,
        "member_step_ms": {f"train_frac={c.task.train_frac}": 1e3 * med[f"member{i}"] for i, c in enumerate(sample)},
        "buckets": len(ensemble.buckets),
        "flops_per_sweep_step": flops,
        "gflops_per_s": flops / med["ensemble"] / 1e9,
        "share_of_matmul_peak": flops / med["ensemble"] / peak,
        "matmul_peak_gflops_per_s": peak / 1e9,
        "restack_ms": restack,
        "restack_cost_in_member_steps": restack / (1e3 * med["ensemble"] / members),
        "rounds": rounds,
    }


def _restack_ms(ensemble: StackedEnsemble, device: torch.device) -> float:
    """Wall time of dropping one member (the stack rebuilt without it); the ensemble keeps the rest."""
    sync(device)
    began = time.perf_counter()
    ensemble.keep(range(1, ensemble.members))
    sync(device)
    return 1e3 * (time.perf_counter() - began)


def bench_sweep(device: str = "cpu", rounds: int | None = None, sizes=SIZES, log: Callable[[str], None] = print) -> dict:
    """`sweep` figures of `lab bench`: per size (small, quick) speedup_vs_sequential, member_steps_per_s,
    share_of_matmul_peak and the step times they come from (see the module docstring)."""
    dev = resolve_device(device)
    n = matmul_n(dev)
    peak_probe = matmul_sample(n, dev)
    result: dict = {"device": str(dev), "threads": torch.get_num_threads(), "matmul_n": n}
    for size in sizes:
        size_rounds = rounds or (40 if size == "small" else 8)
        result[size] = bench_size(size, size_rounds, dev, peak_probe, log)
        figures = result[size]
        log(f"sweep {size}: {figures['speedup_vs_sequential']:.2f}x sequential, {figures['member_steps_per_s']:.0f} member "
            f"steps/s, {100 * figures['share_of_matmul_peak']:.0f}% of the matmul peak")
    return result


if __name__ == "__main__":  # python -m lab.bench.sweep: the figures alone, as JSON
    import json
    import sys

    progress = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731  (stdout is the JSON alone)
    print(json.dumps(bench_sweep(sys.argv[1] if len(sys.argv) > 1 else "cpu", log=progress), indent=2))
