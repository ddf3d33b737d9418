"""Training: AdamW with linear warm-up, periodic evaluation, checkpoints, and exact resume.

One run loop (`train_members`) trains one or many models, each into its own run folder: the
`Trainer` is its one-member case, a sweep's stacked ensemble (lab/sweeps/ensemble.py) its many-member
case. The loop owns everything a run folder holds (rows, checkpoints, resume state, summary,
stop-after-grok, divergence, Ctrl-C); an *engine* owns the tensors: the `Trainer` one model and its
torch AdamW, `StackedEnsemble` many models stacked on a member axis. An engine has

    device, n_params, full_batch(slot), evaluate(slots, reuse) -> metrics per slot,
    update() (one step of every member), resume_state(slot, elapsed_s), keep(slots)

The step counter means "updates done": the metrics row and the checkpoint at step s both describe
the model after s updates. Rows are written at step 0, every `eval_every` steps and at the last
step; checkpoints at step 0, at `log_checkpoints` log-spaced steps, every `checkpoint_every` steps
and at the last step. A checkpoint also rewrites `resume.safetensors` (weights, AdamW moments and
gradient-filter state), from which `--resume` continues so that the metrics equal those of an
uninterrupted run bit for bit on CPU (only `elapsed_s` differs): full-batch training has no
randomness after initialisation, and a mini-batch is drawn from a generator seeded by its step
(`lab.training.batching.minibatch_index`). Across processes this relies on MKL's strict
reproducibility mode, which `import lab` switches on (`MKL_CBWR=AUTO,STRICT`) before torch loads.
A finished run continues the same way when its config asks for more steps (`lab train --resume RUN
--set train.steps=N`).

With `stop_after_grok = N`, a run ends at the first evaluation at least N steps after the first
one with test accuracy >= 0.99 (a row and a checkpoint are written there); None runs every step.

Speed (see `lab bench`): the loss reads one position, so training and evaluation use the model's
`forward_at`, which computes the last block, the MLP and the unembedding only there; with
full-batch training the forward pass of the update at step s is also the train evaluation of the
row at step s (the model after s updates), so a row costs only the test forward pass; AdamW runs
fused where PyTorch has a fused kernel for the device.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lab.config import ExperimentConfig, apply_overrides, is_config_of, parse_override, validate_experiment
from lab.errors import ConfigError, RunError
from lab.models.architectures import build_model, count_params
from lab.models.limits import check_fits
from lab.runs import storage
from lab.runs.outcomes import grok_step, memorize_step
from lab.runs.storage import ResumeState
from lab.tasks import Split, Task, make_task
from lab.training.allocator import keep_freed_memory
from lab.training.batching import batches, evaluation_rows, minibatch_index, rows_per_step
from lab.training.losses import right_and_targets, task_loss
from lab.training.recipes import GradFilter, orthogonalize_gradients


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


def loss_dtype(config: ExperimentConfig) -> torch.dtype:
    return torch.float64 if config.train.loss_dtype == "float64" else torch.float32


def score(logits: torch.Tensor, labels: torch.Tensor, config: ExperimentConfig) -> tuple[float, int, int]:
    """(summed loss, number right, number of targets) of logits (batch, vocab) against labels (batch,), or
    (batch, pos, vocab) against (batch, pos): one chunk of an evaluation, summed so chunks add up."""
    right, targets = right_and_targets(logits, labels)
    # a chunk with no target (every label IGNORE_INDEX) adds nothing; its mean loss would be 0 / 0
    loss = task_loss(logits, labels, config.train.loss, loss_dtype(config)).item() * int(targets) if targets else 0.0
    return loss, int(right), int(targets)


@torch.no_grad()
def evaluate(model, split: Split, task: Task, config: ExperimentConfig) -> tuple[float, float]:
    """(mean loss, accuracy) per target of the model on a split (a target per input for a classifier, per
    labelled position for a language model), in chunks to bound memory (see `lab.training.batching`)."""
    total_loss, correct, targets = 0.0, 0, 0
    for start, tokens in batches(split.tokens, config.model.n_heads):
        loss, right, n = score(model.forward_at(tokens, task.read_position), split.labels[start : start + len(tokens)], config)
        total_loss, correct, targets = total_loss + loss, correct + right, targets + n
    return total_loss / max(targets, 1), correct / max(targets, 1)


def evaluated_rows(split: Split, most: int | None) -> Split:
    """The part of a split an evaluation scores: all of it, or `most` rows (`train.train_eval_rows`) spread evenly over it."""
    index = evaluation_rows(len(split), most)
    return split if index is None else Split(split.tokens[index.to(split.tokens.device)], split.labels[index.to(split.tokens.device)])


def make_adamw(params, tc) -> torch.optim.AdamW:
    """AdamW as configured; fused (one kernel for all parameters) where PyTorch has it, else foreach."""
    params = list(params)
    kwargs = dict(lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(params, foreach=True, **kwargs)


def weight_norm(params) -> float:
    """sqrt of the sum of squares of every weight (a model, or its parameters in `named_parameters` order)."""
    params = params.parameters() if isinstance(params, torch.nn.Module) else params
    return math.sqrt(sum(p.detach().double().pow(2).sum().item() for p in params))


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


def progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, mininterval=0.5)


# --- a run folder ------------------------------------------------------------------------------------


_DONE = ("finished", "diverged")  # a run in one of these states has nothing left to train at its step count


@dataclass
class RunFolder:
    """One run's folder and its bookkeeping in the loop: rows, step, times, schedule, where it starts from."""

    config: ExperimentConfig
    run_dir: Path
    state: ResumeState | None = None  # where its tensors start from (None: the seeded init); the engine takes it
    rows: list[dict] = field(default_factory=list)
    step: int = 0
    elapsed_before: float = 0.0  # wall time of earlier sessions of a resumed run
    started_at: float = 0.0
    diverged_at: int | None = None  # the step whose evaluation found a non-finite loss
    schedule: set[int] = field(default_factory=set)

    def __post_init__(self):
        tc = self.config.train
        self.schedule = checkpoint_schedule(tc.steps, tc.checkpoint_every, tc.log_checkpoints)

    @classmethod
    def open(cls, config: ExperimentConfig, run_dir: Path, resume: bool, shapes: dict[str, tuple[int, ...]]) -> RunFolder:
        """A fresh folder (config.json written, no rows), or one continued from its resume state: weights,
        optimiser and filter state checked against the model's parameter `shapes`, and exactly the rows up
        to that checkpoint kept (later ones will be recomputed identically). A run killed before its first
        checkpoint has no resume state and restarts from step 0. The caller holds the folder's writer lock."""
        folder = cls(config, Path(run_dir))
        if not resume:
            storage.atomic_write_json(folder.run_dir / "config.json", json.loads(config.model_dump_json()))
            storage.write_jsonl(folder.run_dir / "metrics.jsonl", [])
            folder.started_at = time.time()
            return folder
        rows = storage.read_metrics(folder.run_dir / "metrics.jsonl")  # checked before anything is changed
        if not is_config_of(storage.read_json(folder.run_dir / "config.json"), config):  # extended: `Trainer.resume(overrides=...)`
            storage.atomic_write_json(folder.run_dir / "config.json", json.loads(config.model_dump_json()))
        checkpoints = folder.run_dir / "checkpoints"
        if checkpoints.exists() and not checkpoints.is_dir():
            raise RunError(f"{checkpoints}: is a file, expected the folder of checkpoints")
        if (folder.run_dir / storage.RESUME_FILE).is_file():
            folder.state = storage.load_resume_state(folder.run_dir)
            check_state_fits(folder.state, shapes, folder.run_dir / storage.RESUME_FILE)
            folder.step, folder.elapsed_before = folder.state.step, folder.state.elapsed_s
        folder.rows = [row for row in rows if row["step"] <= folder.step]
        storage.write_jsonl(folder.run_dir / "metrics.jsonl", folder.rows)
        if folder.rows and folder.rows[-1]["step"] == folder.step:
            folder.elapsed_before = folder.rows[-1]["elapsed_s"]
        try:  # a lost or damaged summary.json is rebuilt; only its start time is kept from it
            folder.started_at = float(read_summary(folder.run_dir).get("started_at") or time.time())
        except (TypeError, ValueError):
            folder.started_at = time.time()
        return folder

    def lr_at(self, step: int) -> float:
        return warmup_lr(self.config.train, step)

    def due_eval(self) -> bool:
        tc = self.config.train
        due = self.step % tc.eval_every == 0 or self.step == tc.steps
        return due and not (self.rows and self.rows[-1]["step"] == self.step)

    def next_event(self) -> int:
        """The next step (after this one) at which something is written: a row, a checkpoint, the end."""
        tc = self.config.train
        later = [s for s in self.schedule if s > self.step]
        return min([(self.step // tc.eval_every + 1) * tc.eval_every, tc.steps, *later])

    def done(self) -> bool:
        return self.step >= self.config.train.steps or stop_after_grok_reached(self.config.train, self.rows, self.step)

    def append_row(self, metrics: dict, elapsed: float) -> dict:
        """The row of the current step (metrics: train/test loss and accuracy, weight norm), appended to metrics.jsonl."""
        row = {"step": self.step, **{k: metrics[k] for k in ("train_loss", "train_acc", "test_loss", "test_acc", "weight_norm")},
               "lr": self.lr_at(self.step), "elapsed_s": round(self.elapsed_before + elapsed, 3)}
        self.rows.append(row)
        storage.append_jsonl(self.run_dir / "metrics.jsonl", row)
        return row

    def elapsed(self) -> float:
        return self.rows[-1]["elapsed_s"] if self.rows else self.elapsed_before

    def summary(self, status: str, device, n_params: int) -> dict:
        """summary.json's contents."""
        final = self.rows[-1] if self.rows else {}
        tc = self.config.train
        return {
            "name": self.run_dir.name,
            "experiment": self.config.name,
            "task": self.config.task.name,
            "status": status,
            "step": self.step,
            "steps": tc.steps,
            "memorize_step": memorize_step(self.rows),
            "grok_step": grok_step(self.rows),
            "wall_time_s": final.get("elapsed_s", 0.0),
            "final": {k: final[k] for k in ("train_loss", "train_acc", "test_loss", "test_acc", "weight_norm") if k in final},
            "device": str(device),
            "arch": self.config.model.arch,
            "n_params": n_params,
            **({"baselines": baselines} if (baselines := task_baselines(self.config)) else {}),
            **({"diverged_at": self.diverged_at, "hint": divergence_hint(tc, self.diverged_at)} if self.diverged_at is not None else {}),
            "started_at": self.started_at,
            "updated_at": time.time(),
        }


_BASELINES: dict[str, dict[str, float]] = {}


def task_baselines(config: ExperimentConfig) -> dict[str, float]:
    """`Task.baselines()` of the run's task (e.g. a text task's unigram and bigram held-out loss), computed
    once per task config in this process: every summary of every member of a sweep carries them."""
    key = config.task.model_dump_json()
    if key not in _BASELINES:
        _BASELINES[key] = make_task(config.task).baselines()
    return _BASELINES[key]


def read_summary(run_dir: Path) -> dict:
    """A run folder's summary.json, or {} when it is missing or damaged (the run is rebuilt from its resume state)."""
    try:
        return storage.read_json(Path(run_dir) / "summary.json")
    except RunError:
        return {}


def check_state_fits(state: ResumeState, shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    """A resume state whose tensors do not fit the config's model is one RunError naming the first misfit."""
    tensors = [(f"model/{name}", t) for name, t in state.model.items()]
    tensors += [(f"optimizer/{name}/{key}", t) for name, fields in state.optimizer.items() for key, t in fields.items() if t.ndim]
    tensors += [(f"grad_filter/{key}", t) for key, t in state.grad_filter.items() if key.startswith("ema.")]
    for key, tensor in tensors:
        name = key.split("/")[1] if not key.startswith("grad_filter/") else key[len("grad_filter/ema."):]
        if name not in shapes or tuple(tensor.shape) != shapes[name]:
            want = f"a weight of shape {list(shapes[name])}" if name in shapes else "no such weight"
            raise RunError(f"{path}: does not fit this run's config.json ({key} has shape {list(tensor.shape)}; the model has {want})")
    missing = sorted(set(shapes) - set(state.model))
    if missing:
        raise RunError(f"{path}: does not fit this run's config.json (no model/{missing[0]})")


# --- the run loop --------------------------------------------------------------------------------------


class _Writes:
    """Files the members write at one step, snapshot then, written before the next update: members in
    parallel on a few threads (each file is fsync'ed; one after another, 64 members' checkpoints cost
    more than their training), each member's files in order."""

    def __init__(self, pool: ThreadPoolExecutor | None):
        self.pool = pool
        self.pending: dict[int, list[Callable[[], None]]] = {}

    def add(self, folder: RunFolder, write: Callable[[], None]) -> None:
        self.pending.setdefault(id(folder), []).append(write)

    def flush(self) -> None:
        jobs, self.pending = list(self.pending.values()), {}
        run = lambda writes: [write() for write in writes]  # noqa: E731
        for _ in (self.pool.map(run, jobs) if self.pool is not None and len(jobs) > 1 else map(run, jobs)):
            pass


_WRITER_THREADS = 8


def train_members(folders: Sequence[RunFolder], engine, progress: bool = True,
                  stop: Callable[[], bool] | None = None) -> tuple[list[dict], bool]:
    """The run loop: train every member (folders[i] is the engine's slot i) to its end, writing its rows,
    checkpoints, resume state and summary. Returns (summaries in the folders' order, whether a stop was
    requested: Ctrl-C / SIGTERM, or `stop()` returning True, checkpoints every running member as "interrupted")."""
    folders = list(folders)
    with ThreadPoolExecutor(max_workers=_WRITER_THREADS) if len(folders) > 1 else suppress() as pool:
        writes = _Writes(pool)
        try:
            result = _loop(folders, engine, progress, stop, writes)
        except BaseException:
            with suppress(Exception):  # the first error is the one to report
                writes.flush()  # what the error left unwritten: checkpoints, summaries saying "failed"
            raise
        writes.flush()
        return result


def _loop(folders: list[RunFolder], engine, progress: bool, stop, writes: _Writes) -> tuple[list[dict], bool]:
    started = time.perf_counter()
    active = list(folders)  # parallel to the engine's member axis
    summaries: dict[int, dict] = {}

    def summary(f: RunFolder, status: str) -> dict:
        result = f.summary(status, engine.device, engine.n_params)
        writes.add(f, lambda: storage.atomic_write_json(f.run_dir / "summary.json", result))
        return result

    def checkpoint(slot: int) -> None:  # weights at the member's step and its resume state, snapshot now
        f = active[slot]
        state = engine.resume_state(slot, f.elapsed())
        path, meta = storage.checkpoint_path(f.run_dir, f.step), {"step": str(f.step)}
        writes.add(f, lambda: storage.save_tensors(path, state.model, meta))
        writes.add(f, lambda: storage.save_resume_state(f.run_dir, state))

    for f in active:
        summary(f, "running")
    writes.flush()
    first = min(f.step for f in active)
    bar = progress_bar(first + max(f.config.train.steps - f.step for f in active), first, progress)
    if len(active) > 1:
        bar.set_description(f"{len(active)} members")
    stopped = False
    next_event = [f.step for f in active]  # every member has something to do at its first step
    try:
        with catch_stop_signals() as signals:
            while active:
                ended = []  # slots of members that finished or diverged at this step
                at_event = [slot for slot, f in enumerate(active) if f.step >= next_event[slot]]
                if at_event:
                    elapsed = time.perf_counter() - started
                    due = [slot for slot in at_event if active[slot].due_eval()]
                    # full batch: the forward pass of this step's update is the train evaluation of the row
                    reuse = [engine.full_batch(slot) and active[slot].step < active[slot].config.train.steps for slot in due]
                    for slot, metrics in zip(due, engine.evaluate(due, reuse) if due else []):
                        f = active[slot]
                        row = f.append_row(metrics, elapsed)
                        if len(folders) == 1:
                            bar.set_postfix(train_acc=f"{row['train_acc']:.3f}", test_acc=f"{row['test_acc']:.3f}", refresh=False)
                        if not (math.isfinite(row["train_loss"]) and math.isfinite(row["test_loss"])):
                            # diverged: stop it before checkpointing NaN weights; the row is stored with nulls
                            f.diverged_at = f.step
                            summaries[id(f)] = summary(f, "diverged")
                            ended.append(slot)
                    for slot in at_event:
                        if slot in ended:
                            continue
                        f = active[slot]
                        done = f.done()
                        if f.step in f.schedule or (done and f.step < f.config.train.steps):
                            checkpoint(slot)
                            summary(f, "running")
                        if done:
                            summaries[id(f)] = summary(f, "finished")
                            ended.append(slot)
                        else:
                            next_event[slot] = f.next_event()
                if signals.signal is not None or (stop is not None and stop()):
                    stopped = True
                    for slot, f in enumerate(active):
                        if slot not in ended:
                            checkpoint(slot)
                            summaries[id(f)] = summary(f, "interrupted")
                    break
                writes.flush()
                if ended:
                    keep = [slot for slot in range(len(active)) if slot not in ended]
                    active = [active[slot] for slot in keep]
                    next_event = [next_event[slot] for slot in keep]
                    if not active:
                        break
                    engine.keep(keep)  # re-stacked without them: they cost nothing from now on
                    bar.set_description(f"{len(active)} members")
                engine.update()
                for f in active:
                    f.step += 1
                bar.update(1)
    except BaseException as err:
        # a second Ctrl-C: every member's last checkpoint stands, and it resumes from there
        status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        for f in active:
            if id(f) not in summaries:
                summaries[id(f)] = summary(f, status)
        raise
    finally:
        if not stopped and bar.n < bar.total:  # ended early: end the bar full, and say why
            bar.total = bar.n
            bar.set_postfix_str(_why_stopped_early(folders, summaries), refresh=False)
        bar.close()
    return [summaries[id(f)] for f in folders], stopped


def _why_stopped_early(folders: list[RunFolder], summaries: dict[int, dict]) -> str:
    """The progress bar's last words when training ended before its step budget."""
    status = [summaries.get(id(f), {}).get("status", "failed") for f in folders]
    if len(folders) == 1:
        f = folders[0]
        last = f.rows[-1] if f.rows else {}
        said = f"train_acc={last.get('train_acc', 0):.3f}, test_acc={last.get('test_acc', 0):.3f}, stopped: "
        if status[0] == "finished":
            return said + f"grokked at {grok_step(f.rows)} + stop_after_grok {f.config.train.stop_after_grok}"
        return said + (f"diverged at step {f.diverged_at}" if status[0] == "diverged" else status[0])
    early = [s for f, s in zip(folders, status) if s != "finished" or f.step < f.config.train.steps]
    counts = {s: early.count(s) for s in dict.fromkeys(early)}
    named = {"finished": "grokked (stop_after_grok)"}
    return "stopped early: " + ", ".join(f"{n} {named.get(s, s)}" for s, n in counts.items())


# --- one model -------------------------------------------------------------------------------------------


class Trainer:
    """Trains one experiment into one run folder: `Trainer(config, run_dir).run()`; resume with `Trainer.resume(run_dir)`.

    Also the run loop's engine for its one member (slot 0): one model, torch's AdamW, the gradient recipes."""

    def __init__(self, config: ExperimentConfig, run_dir: Path, progress: bool = True):
        self.config = config.resolve()
        self.run_dir = Path(run_dir)
        self.progress = progress
        keep_freed_memory()  # each step reuses the last one's activation memory (lab/training/allocator.py)
        tc = self.config.train
        self.device = resolve_device(tc.device)
        self.task = make_task(self.config.task)
        self.train_split = self._to_device(self.task.split("train"))
        self.test_split = self._to_device(self.task.split("test"))
        self.train_eval = evaluated_rows(self.train_split, tc.train_eval_rows)  # what an evaluation scores of it
        # a model too large for this machine is refused here, with the estimate, before anything is allocated
        filter_copies = {"none": 0, "ema": 1, "ma": tc.grad_filter.window}[tc.grad_filter.kind]
        check_fits(self.config.model, lambda: build_model(self.config.model), self.device,
                   rows=min(len(self.train_split), tc.batch_size or len(self.train_split)),
                   optimizer_copies=3 + filter_copies, source=f"experiment {self.config.name!r}")
        self.model = build_model(self.config.model).to(self.device)  # lab/models/architectures.py: [model] arch
        self.optimizer = make_adamw(self.model.parameters(), tc)
        self.grad_filter = GradFilter(tc.grad_filter, list(self.model.named_parameters())) if tc.grad_filter.kind != "none" else None
        self.loss_dtype = loss_dtype(self.config)
        self.n_params = count_params(self.model)
        self.step = 0
        self._forward: tuple[torch.Tensor, torch.Tensor] | None = None  # this step's train forward, if already computed

    def _to_device(self, split: Split) -> Split:
        return Split(split.tokens.to(self.device), split.labels.to(self.device))

    # --- one update ---

    def lr_at(self, step: int) -> float:
        return warmup_lr(self.config.train, step)

    def batch(self, step: int) -> Split:
        if self.full_batch(0):
            return self.train_split
        index = minibatch_index(self.config.model.seed, step, len(self.train_split), self.config.train.batch_size).to(self.device)
        return Split(self.train_split.tokens[index], self.train_split.labels[index])

    def full_batch(self, slot: int = 0) -> bool:
        return rows_per_step(self.config.train.batch_size, len(self.train_split)) == len(self.train_split)

    def train_forward(self, batch: Split) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits at the read position, or at every position) of the model on a batch, with autograd."""
        logits = self.model.forward_at(batch.tokens, self.task.read_position)  # (batch, vocab) or (batch, pos, vocab)
        return task_loss(logits, batch.labels, self.config.train.loss, self.loss_dtype), logits

    def update(self) -> None:
        """One optimiser step (reusing this step's train forward if `evaluate` computed it)."""
        tc = self.config.train
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        loss, _ = self._forward if self._forward is not None else self.train_forward(self.batch(self.step))
        self._forward = None
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tc.orthograd:
            orthogonalize_gradients(self.model.parameters())
        if self.grad_filter is not None:
            self.grad_filter.apply()
        self.optimizer.step()
        self.step += 1

    # --- the engine's other duties ---

    def evaluate(self, slots: Sequence[int], reuse: Sequence[bool]) -> list[dict]:
        """The metrics of the row at the current step; train ones from this step's update forward if `reuse`."""
        (reuse,) = reuse
        reuse = reuse and self.train_eval is self.train_split  # the update's forward covers every row, not a subset
        if reuse:
            self._forward = self.train_forward(self.train_split)
            loss, logits = self._forward
            right, targets = right_and_targets(logits, self.train_split.labels)
            train = (loss.item(), right.item() / targets.item())
        self.model.eval()
        if not reuse:
            train = evaluate(self.model, self.train_eval, self.task, self.config)
        test = evaluate(self.model, self.test_split, self.task, self.config)
        self.model.train()
        return [{"train_loss": train[0], "train_acc": train[1], "test_loss": test[0], "test_acc": test[1],
                 "weight_norm": weight_norm(self.model)}]

    def resume_state(self, slot: int, elapsed_s: float) -> ResumeState:
        # the live tensors, not copies: the loop writes them before the next update changes them
        weights = self.model.state_dict()
        names = {id(p): n for n, p in self.model.named_parameters()}
        optimizer = {names[id(param)]: {key: torch.as_tensor(value) for key, value in state.items()}
                     for param, state in self.optimizer.state.items()}
        filter_state = self.grad_filter.state_tensors() if self.grad_filter is not None else {}
        return ResumeState(self.step, elapsed_s, weights, optimizer, filter_state)

    def load_state(self, state: ResumeState) -> None:
        """Weights, AdamW and filter state from a resume state (already checked to fit, `check_state_fits`)."""
        self.model.load_state_dict(state.model)
        params = dict(self.model.named_parameters())
        for name, fields in state.optimizer.items():
            for key, value in fields.items():
                # fused AdamW keeps its step count on the parameter's device (CUDA too); the others keep it on the CPU
                on_device = value.ndim or self.optimizer.defaults.get("fused")
                self.optimizer.state[params[name]][key] = value.to(self.device) if on_device else value
        if self.grad_filter is not None:
            self.grad_filter.load_state_tensors({k: v.to(self.device) for k, v in state.grad_filter.items()})
        self.step = state.step

    def keep(self, slots: Sequence[int]) -> None:
        self._forward = None

    # --- the loop ---

    def run(self, resume: bool = False) -> dict:
        """Train to `train.steps` (continuing from resume.safetensors if `resume`) and return the summary.
        Holds the run folder's writer lock throughout: a second writer is refused (`storage.acquire_writer`)."""
        with storage.run_lock(self.run_dir):
            shapes = {name: tuple(p.shape) for name, p in self.model.named_parameters()}
            folder = RunFolder.open(self.config, self.run_dir, resume, shapes)
            if folder.state is not None:
                self.load_state(folder.state)
                folder.state = None
            (summary,), _ = train_members([folder], self, self.progress)
            return summary

    @classmethod
    def resume(cls, run_dir: Path, progress: bool = True, overrides: Sequence[str] = ()) -> "Trainer":
        """The trainer of an existing run folder, from its config.json. A run killed before its first checkpoint
        (no resume.safetensors yet) restarts from step 0. `overrides` (`--set` assignments of RESUMABLE keys)
        extend a run, finished or not: `train.steps=N` trains on to step N, `train.stop_after_grok=false` past
        its early stop; the steps already trained are unchanged, so the run equals one trained to N at once."""
        from lab.runs.run import read_run_config

        run_dir = Path(run_dir)
        if not (run_dir / "config.json").is_file():
            if run_dir.is_dir() and [p.name for p in run_dir.iterdir()] == [storage.LOCK_FILE]:  # a writer started, then died
                raise RunError(f"{run_dir}: nothing to resume: the run was stopped before it wrote anything; "
                               f"start it afresh with: lab train EXPERIMENT --name {run_dir.name}")
            what = "no config.json" if run_dir.is_dir() else "no such folder"
            raise RunError(f"{run_dir}: nothing to resume ({what}); is this a run folder?")
        config = read_run_config(run_dir)
        if overrides:
            config = extended_config(config, overrides, run_dir)
        return cls(config, run_dir, progress=progress)


RESUMABLE = ("train.steps", "train.stop_after_grok")  # what `--resume RUN --set` may change: nothing before the run's step


def extended_config(config: ExperimentConfig, overrides: Sequence[str], run_dir: Path) -> ExperimentConfig:
    """A run's config with `overrides` of RESUMABLE keys applied; another key, or fewer steps than the run
    has trained, is one ConfigError."""
    for assignment in overrides:
        key = ".".join(parse_override(assignment)[0])
        if key not in RESUMABLE:
            raise ConfigError(f"--set {assignment!r}: a resumed run keeps its config; only {', '.join(RESUMABLE)} may change "
                              f"(to extend it); train another setting as a new run")
    data = apply_overrides(json.loads(config.model_dump_json()), list(overrides))
    extended = validate_experiment(data, source=str(run_dir / "config.json"), overrides=list(overrides)).resolve()
    trained = storage.resume_step(run_dir) or 0
    if extended.train.steps < trained:
        raise ConfigError(f"--set train.steps={extended.train.steps}: the run has already trained {trained} steps; "
                          f"give train.steps >= {trained}")
    return extended
