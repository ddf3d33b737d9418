"""Training reuses its freed activation memory (lab/training/allocator.py) instead of page-faulting fresh
pages in at every step."""

import subprocess
import sys

import pytest

PROBE = r"""
import resource, sys, tempfile, torch
torch.set_num_threads(1)
import lab.training.trainer
from lab.config import load_experiment
if sys.argv[1] == "default":  # glibc's own thresholds: what the Trainer would get without keep_freed_memory
    lab.training.trainer.keep_freed_memory = lambda: False
trainer = lab.training.trainer.Trainer(load_experiment("nanda_2023"), tempfile.mkdtemp() + "/run", progress=False)
for _ in range(3):
    trainer.update()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    trainer.update()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4)
"""


def faults_per_step(mode: str) -> float:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return float(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_training_steps_reuse_freed_memory_instead_of_faulting_it_in_again():
    from lab.training.allocator import keep_freed_memory

    assert keep_freed_memory() and keep_freed_memory()  # in force, and idempotent
    default, kept = faults_per_step("default"), faults_per_step("keep")
    # the Nanda step frees and reallocates ~8 MB activations: glibc's default hands them back to the kernel
    assert default > 400, default
    assert kept < default / 3, (default, kept)
