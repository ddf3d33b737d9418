"""Training: AdamW with linear warm-up, periodic evaluation, checkpoints, and exact resume.

The step counter means "updates done": the metrics row and the checkpoint at step s both describe
the model after s updates. Rows are written at step 0, every `eval_every` steps and at the last
step; checkpoints at step 0, at `log_checkpoints` log-spaced steps, every `checkpoint_every` steps
and at the last step. A checkpoint also rewrites `resume.safetensors` (weights, AdamW moments and
gradient-filter state), from which `--resume` continues so that the metrics equal those of an
uninterrupted run bit for bit on CPU (only `elapsed_s` differs): full-batch training has no
randomness after initialisation, and a mini-batch is drawn from a generator seeded by its step.
Across processes this relies on MKL's strict reproducibility mode, which `import lab` switches on
(`MKL_CBWR=AUTO,STRICT`) before torch loads.

With `stop_after_grok = N`, the run ends at the first evaluation at least N steps after the first
one with test accuracy >= 0.99 (a row and a checkpoint are written there).

Speed (see `lab bench`): the loss reads one position, so training and evaluation use
`Transformer.forward_at`, which computes the last block, the MLP and the unembedding only there;
with full-batch training the forward pass of the update at step s is also the train evaluation of
the row at step s (the model after s updates), so a row costs only the test forward pass; AdamW
runs fused where PyTorch has a fused kernel for the device.
"""

from __future__ import annotations

import json
import math
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from lab.runs import storage
from lab.training.batching import batches
from lab.config import ExperimentConfig
from lab.errors import RunError
from lab.models.limits import check_fits
from lab.training.losses import task_loss
from lab.models.architectures import build_model, count_params
from lab.models.transformer import Transformer
from lab.runs.outcomes import grok_step, memorize_step
from lab.training.recipes import GradFilter, orthogonalize_gradients
from lab.runs.storage import ResumeState
from lab.tasks import Split, Task, make_task


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


def checkpoint_schedule(steps: int, every: int, n_log: int) -> set[int]:
    """Step 0, `n_log` log-spaced steps (dense early, when memorisation happens), multiples of `every`, the last."""
    schedule = {0, steps} | set(range(every, steps + 1, every))
    if n_log and steps > 1:
        schedule |= {min(steps, round(math.exp(i * math.log(steps) / n_log))) for i in range(1, n_log + 1)}
    return {s for s in schedule if 0 <= s <= steps}


@torch.no_grad()
def evaluate(model: Transformer, split: Split, task: Task, config: ExperimentConfig) -> tuple[float, float]:
    """(mean loss, accuracy) of the model on a split, in chunks to bound memory (see `lab.training.batching`)."""
    total_loss, correct = 0.0, 0
    dtype = torch.float64 if config.train.loss_dtype == "float64" else torch.float32
    for start, tokens in batches(split.tokens, config.model.n_heads):
        labels = split.labels[start : start + len(tokens)]
        logits = model.forward_at(tokens, task.read_position)  # (batch, vocab)
        total_loss += task_loss(logits, labels, config.train.loss, dtype).item() * len(labels)
        correct += (logits.argmax(-1) == labels).sum().item()
    return total_loss / len(split), correct / len(split)


def make_adamw(params, tc) -> torch.optim.AdamW:
    """AdamW as configured; fused (one kernel for all parameters) where PyTorch has it, else foreach."""
    params = list(params)
    kwargs = dict(lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(params, foreach=True, **kwargs)


def weight_norm(model: torch.nn.Module) -> float:
    return math.sqrt(sum(p.detach().double().pow(2).sum().item() for p in model.parameters()))


class _StopRequest:
    """SIGINT/SIGTERM set a flag that the loop checks between steps, so a checkpoint is never half an update."""

    def __init__(self):
        self.signal: int | None = None

    def __call__(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: the user means it
            raise KeyboardInterrupt
        self.signal = signum


@contextmanager
def catch_stop_signals():
    stop = _StopRequest()
    try:
        previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread (e.g. inside Streamlit): no handlers, no graceful stop
        previous = {}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def warmup_lr(tc, step: int) -> float:
    """Linear warm-up as in Nanda et al.: lr * min(step / warmup_steps, 1)."""
    return tc.lr * (min(step / tc.warmup_steps, 1.0) if tc.warmup_steps else 1.0)


def stop_after_grok_reached(tc, rows: list[dict], step: int) -> bool:
    """With `stop_after_grok = N`: is `step` an evaluated step at least N steps after the first grokked row?"""
    if tc.stop_after_grok is None or not rows or rows[-1]["step"] != step:
        return False
    grok = grok_step(rows)
    return grok is not None and step >= grok + tc.stop_after_grok


def divergence_hint(tc, diverged_at: int) -> str:
    return (f"the loss became NaN or infinite by step {diverged_at}: lower train.lr (now {tc.lr:g}), "
            f"or raise train.warmup_steps (now {tc.warmup_steps})")


def run_summary(run_dir: Path, config: ExperimentConfig, status: str, step: int, rows: list[dict], device, n_params: int,
                diverged_at: int | None, started_at: float) -> dict:
    """summary.json's contents, for a run trained alone (`Trainer`) or as an ensemble member (lab/sweeps/ensemble.py)."""
    final = rows[-1] if rows else {}
    return {
        "name": Path(run_dir).name,
        "experiment": config.name,
        "task": config.task.name,
        "status": status,
        "step": step,
        "steps": config.train.steps,
        "memorize_step": memorize_step(rows),
        "grok_step": grok_step(rows),
        "wall_time_s": final.get("elapsed_s", 0.0),
        "final": {k: final[k] for k in ("train_loss", "train_acc", "test_loss", "test_acc", "weight_norm") if k in final},
        "device": str(device),
        "arch": config.model.arch,
        "n_params": n_params,
        **({"diverged_at": diverged_at, "hint": divergence_hint(config.train, diverged_at)} if diverged_at is not None else {}),
        "started_at": started_at,
        "updated_at": time.time(),
    }


class Trainer:
    """Trains one experiment into one run folder. `Trainer(config, run_dir).run()`; resume with `Trainer.resume(run_dir)`."""

    def __init__(self, config: ExperimentConfig, run_dir: Path, progress: bool = True):
        self.config = config.resolve()
        self.run_dir = Path(run_dir)
        self.progress = progress
        tc = self.config.train
        self.device = resolve_device(tc.device)
        self.task = make_task(self.config.task)
        self.train_split = self._to_device(self.task.split("train"))
        self.test_split = self._to_device(self.task.split("test"))
        # a model too large for this machine is refused here, with the estimate, before anything is allocated
        filter_copies = {"none": 0, "ema": 1, "ma": tc.grad_filter.window}[tc.grad_filter.kind]
        check_fits(self.config.model, lambda: build_model(self.config.model), self.device,
                   rows=min(len(self.train_split), tc.batch_size or len(self.train_split)),
                   optimizer_copies=3 + filter_copies, source=f"experiment {self.config.name!r}")
        self.model = build_model(self.config.model).to(self.device)  # lab/models/architectures.py: [model] arch
        self.optimizer = make_adamw(self.model.parameters(), tc)
        self.grad_filter = GradFilter(tc.grad_filter, list(self.model.named_parameters())) if tc.grad_filter.kind != "none" else None
        self.loss_dtype = torch.float64 if tc.loss_dtype == "float64" else torch.float32
        self.schedule = checkpoint_schedule(tc.steps, tc.checkpoint_every, tc.log_checkpoints)
        self.step = 0
        self.elapsed_before = 0.0  # wall time of earlier sessions of a resumed run
        self.rows: list[dict] = []
        self.diverged_at: int | None = None  # the step whose evaluation found a non-finite loss

    def _to_device(self, split: Split) -> Split:
        return Split(split.tokens.to(self.device), split.labels.to(self.device))

    # --- one update ---

    def lr_at(self, step: int) -> float:
        return warmup_lr(self.config.train, step)

    def batch(self, step: int) -> Split:
        size = self.config.train.batch_size
        if size is None or size >= len(self.train_split):
            return self.train_split
        generator = torch.Generator().manual_seed(self.config.model.seed * 1_000_003 + step)
        index = torch.randperm(len(self.train_split), generator=generator)[:size].to(self.device)
        return Split(self.train_split.tokens[index], self.train_split.labels[index])

    @property
    def full_batch(self) -> bool:
        size = self.config.train.batch_size
        return size is None or size >= len(self.train_split)

    def train_forward(self, batch: Split) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits at the read position) of the model on a batch, with autograd."""
        logits = self.model.forward_at(batch.tokens, self.task.read_position)  # (batch, vocab)
        return task_loss(logits, batch.labels, self.config.train.loss, self.loss_dtype), logits

    def update(self, forward: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """One optimiser step; `forward` is this step's `train_forward` if it was already computed."""
        tc = self.config.train
        batch = self.batch(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        loss, _ = forward if forward is not None else self.train_forward(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tc.orthograd:
            orthogonalize_gradients(self.model.parameters())
        if self.grad_filter is not None:
            self.grad_filter.apply()
        self.optimizer.step()
        self.step += 1

    # --- evaluation and storage ---

    def evaluate_row(self, started: float, train: tuple[float, float] | None = None) -> dict:
        """Evaluate and store the row of the current step; `train` = (loss, acc) if already known."""
        self.model.eval()
        train_loss, train_acc = train if train is not None else evaluate(self.model, self.train_split, self.task, self.config)
        test_loss, test_acc = evaluate(self.model, self.test_split, self.task, self.config)
        self.model.train()
        row = {
            "step": self.step,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "weight_norm": weight_norm(self.model),
            "lr": self.lr_at(self.step),
            "elapsed_s": round(self.elapsed_before + time.perf_counter() - started, 3),
        }
        self.rows.append(row)
        storage.append_jsonl(self.run_dir / "metrics.jsonl", row)
        return row

    def save_checkpoint(self) -> None:
        weights = self.model.state_dict()
        storage.save_tensors(storage.checkpoint_path(self.run_dir, self.step), weights, {"step": str(self.step)})
        names = {id(p): n for n, p in self.model.named_parameters()}
        optimizer = {names[id(param)]: {key: torch.as_tensor(value) for key, value in state.items()}
                     for param, state in self.optimizer.state.items()}
        filter_state = self.grad_filter.state_tensors() if self.grad_filter is not None else {}
        elapsed = self.rows[-1]["elapsed_s"] if self.rows else self.elapsed_before
        storage.save_resume_state(self.run_dir, ResumeState(self.step, elapsed, weights, optimizer, filter_state))

    def load_resume_state(self) -> None:
        """Restore weights, optimiser and filter state from resume.safetensors; a run killed before its first
        checkpoint has none, and restarts from step 0. A file that does not fit the config is one RunError."""
        path = self.run_dir / storage.RESUME_FILE
        rows = storage.read_metrics(self.run_dir / "metrics.jsonl")  # checked before anything is changed
        checkpoints = self.run_dir / "checkpoints"
        if checkpoints.exists() and not checkpoints.is_dir():
            raise RunError(f"{checkpoints}: is a file, expected the folder of checkpoints")
        if path.is_file():
            state = storage.load_resume_state(self.run_dir)
            try:
                self.model.load_state_dict(state.model)
                params = dict(self.model.named_parameters())
                for name, fields in state.optimizer.items():
                    for key, value in fields.items():
                        if value.ndim and value.shape != params[name].shape:
                            raise RuntimeError(f"optimizer state {name}/{key} has shape {list(value.shape)}, "
                                               f"the weight {list(params[name].shape)}")
                        self.optimizer.state[params[name]][key] = value.to(self.device) if value.ndim else value
                if self.grad_filter is not None:
                    self.grad_filter.load_state_tensors({k: v.to(self.device) for k, v in state.grad_filter.items()})
            except (RuntimeError, KeyError, ValueError) as err:
                raise RunError(f"{path}: does not fit this run's config.json ({str(err).splitlines()[0]})") from None
            self.step = state.step
            self.elapsed_before = state.elapsed_s
        # Keep exactly the rows up to the checkpoint; later ones will be recomputed identically.
        self.rows = [row for row in rows if row["step"] <= self.step]
        storage.write_jsonl(self.run_dir / "metrics.jsonl", self.rows)
        if self.rows and self.rows[-1]["step"] == self.step:
            self.elapsed_before = self.rows[-1]["elapsed_s"]

    def write_summary(self, status: str, started_at: float) -> dict:
        summary = run_summary(self.run_dir, self.config, status, self.step, self.rows, self.device,
                              count_params(self.model), self.diverged_at, started_at)
        storage.atomic_write_json(self.run_dir / "summary.json", summary)
        return summary

    # --- the loop ---

    def run(self, resume: bool = False) -> dict:
        """Train to `train.steps` (continuing from resume.safetensors if `resume`) and return the summary.
        Holds the run folder's writer lock throughout: a second writer is refused (`storage.acquire_writer`)."""
        with storage.run_lock(self.run_dir):
            return self._run(resume)

    def _run(self, resume: bool) -> dict:
        tc = self.config.train
        if resume:
            for tmp in [*self.run_dir.glob(".*.tmp"), *self.run_dir.glob("checkpoints/.*.tmp")]:
                tmp.unlink(missing_ok=True)  # half-written files of a writer that was killed (we hold the lock)
            self.load_resume_state()
            try:  # a lost or damaged summary.json is rebuilt below; only its start time is kept from it
                started_at = float(storage.read_json(self.run_dir / "summary.json").get("started_at") or time.time())
            except (RunError, TypeError, ValueError):
                started_at = time.time()
        else:
            storage.atomic_write_json(self.run_dir / "config.json", json.loads(self.config.model_dump_json()))
            started_at = time.time()
        started = time.perf_counter()
        status = "running"
        self.write_summary(status, started_at)
        bar = progress_bar(tc.steps, self.step, self.progress)
        try:
            with catch_stop_signals() as stop:
                while True:
                    forward = None
                    due_eval = self.step % tc.eval_every == 0 or self.step == tc.steps
                    if due_eval and not (self.rows and self.rows[-1]["step"] == self.step):
                        train = None
                        if self.full_batch and self.step < tc.steps:
                            # the update's forward pass is the train evaluation of this row
                            forward = self.train_forward(self.train_split)
                            correct = (forward[1].argmax(-1) == self.train_split.labels).sum().item()
                            train = (forward[0].item(), correct / len(self.train_split))
                        row = self.evaluate_row(started, train)
                        if not (math.isfinite(row["train_loss"]) and math.isfinite(row["test_loss"])):
                            # diverged: stop before checkpointing NaN weights; the row is stored with nulls
                            self.diverged_at, status = self.step, "diverged"
                            break
                        bar.set_postfix(train_acc=f"{row['train_acc']:.3f}", test_acc=f"{row['test_acc']:.3f}", refresh=False)
                    done = self.step >= tc.steps or stop_after_grok_reached(tc, self.rows, self.step)
                    if self.step in self.schedule or (done and self.step < tc.steps):
                        self.save_checkpoint()
                        self.write_summary(status, started_at)
                    if done:
                        status = "finished"
                        if self.step < tc.steps:  # stopped early: end the bar full, and say why
                            last = self.rows[-1]
                            bar.total = self.step
                            bar.set_postfix_str(f"train_acc={last['train_acc']:.3f}, test_acc={last['test_acc']:.3f}, stopped: "
                                                f"grokked at {grok_step(self.rows)} + stop_after_grok {tc.stop_after_grok}",
                                                refresh=False)
                        break
                    if stop.signal is not None:
                        self.save_checkpoint()
                        status = "interrupted"
                        break
                    self.update(forward)
                    bar.update(1)
        except BaseException as err:
            # a second Ctrl-C: the last checkpoint stands, and the run resumes from it
            stopped = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
            self.write_summary(stopped if status == "running" else status, started_at)
            raise
        finally:
            bar.close()
        return self.write_summary(status, started_at)

    @classmethod
    def resume(cls, run_dir: Path, progress: bool = True) -> "Trainer":
        """The trainer of an existing run folder, from its config.json. A run killed before its first checkpoint
        (no resume.safetensors yet) restarts from step 0."""
        from lab.runs.run import read_run_config

        run_dir = Path(run_dir)
        if not (run_dir / "config.json").is_file():
            if run_dir.is_dir() and [p.name for p in run_dir.iterdir()] == [storage.LOCK_FILE]:  # a writer started, then died
                raise RunError(f"{run_dir}: nothing to resume: the run was stopped before it wrote anything; "
                               f"start it afresh with: lab train EXPERIMENT --name {run_dir.name}")
            what = "no config.json" if run_dir.is_dir() else "no such folder"
            raise RunError(f"{run_dir}: nothing to resume ({what}); is this a run folder?")
        return cls(read_run_config(run_dir), run_dir, progress=progress)


def progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, mininterval=0.5)
