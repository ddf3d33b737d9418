"""Typed experiment configuration: task, model and training settings, loaded from TOML.

An experiment is three sections, validated by pydantic:

    [task]   name = "modular", p = 113, operator = "add", train_frac = 0.3, data_seed = 0
    [model]  n_layers = 1, d_model = 128, n_heads = 4, d_head = 32, d_mlp = 512, ...
    [train]  steps = 40000, lr = 1e-3, weight_decay = 1.0, betas = [0.9, 0.98], ...

The `[task]` table is validated by the config class the named task registers (see `lab.tasks`).
`resolve()` fills in what the task decides (vocabulary sizes, context length, causal or
bidirectional attention), so the config saved in a run folder says everything about the run.

Every validation failure becomes one `ConfigError` line naming the bad key, the bad value and
what would be valid, which the CLI prints without a traceback.
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"


class ConfigError(ValueError):
    """A config value, key, or file is wrong; the message is one line saying what and what is valid."""


class StrictModel(BaseModel):
    # Unknown keys are errors, not silently ignored: a typo in `weight_decay` must not train a different model.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TaskConfig(StrictModel):
    """Base of every task's config; each task subclasses it with its own fields (see `lab.tasks`)."""

    name: str
    data_seed: int = Field(0, description="seed of the train/test split and of generated data")


class ModelConfig(StrictModel):
    n_layers: int = Field(1, ge=1)
    d_model: int = Field(128, ge=1)
    n_heads: int = Field(4, ge=1)
    d_head: int = Field(32, ge=1)
    d_mlp: int = Field(512, ge=1)
    act_fn: Literal["relu", "gelu"] = "relu"
    attn_only: bool = False
    normalization: Literal["none", "LN"] = Field("none", description="LayerNorm before attention, MLP and unembed")
    positional: Literal["learned", "none"] = Field("learned", description="'none' lets a model run on any length")
    seed: int = Field(0, description="seed of the weight initialisation")
    # Decided by the task; filled in by `ExperimentConfig.resolve()`.
    d_vocab: int | None = None
    d_vocab_out: int | None = None
    n_ctx: int | None = None
    causal: bool | None = None
    pad_token_id: int | None = None


class GradFilterConfig(StrictModel):
    """Grokfast gradient filters (Lee et al. 2024); see `lab.recipes`."""

    kind: Literal["none", "ema", "ma"] = "none"
    alpha: float = Field(0.98, ge=0.0, lt=1.0, description="EMA momentum")
    lamb: float = Field(2.0, description="amplification of the slow gradient")
    window: int = Field(100, ge=1, description="MA window, in steps")


class TrainConfig(StrictModel):
    steps: int = Field(1000, ge=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = Field(10, ge=0, description="linear learning-rate warm-up")
    batch_size: int | None = Field(None, ge=1, description="None: full batch")
    eval_every: int = Field(100, ge=1)
    checkpoint_every: int = Field(1000, ge=1)
    log_checkpoints: int = Field(24, ge=0, description="extra checkpoints at log-spaced steps")
    loss_dtype: Literal["float32", "float64"] = Field("float32", description="precision of the log-softmax")
    loss: Literal["softmax", "stablemax"] = Field("softmax", description="StableMax: Prieto et al. 2025")
    orthograd: bool = Field(False, description="⊥Grad: Prieto et al. 2025")
    grad_filter: GradFilterConfig = GradFilterConfig()
    stop_after_grok: int | None = Field(
        None, ge=0, description="end the run at the first evaluation this many steps after test acc >= 0.99 (None: run all steps)"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must both lie in [0, 1), got {list(betas)}")
        return betas


class ExperimentConfig(StrictModel):
    name: str = Field("experiment", description="experiment name; runs default to it")
    description: str = ""
    task: SerializeAsAny[TaskConfig]
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()

    @field_validator("task", mode="before")
    @classmethod
    def _task_by_name(cls, value: Any) -> Any:
        if isinstance(value, TaskConfig):
            return value
        if not isinstance(value, dict) or "name" not in value:
            raise ValueError("the [task] table needs a name")
        from lab.tasks import task_class  # late: tasks import this module

        return task_class(value["name"]).Config.model_validate(value)

    def resolve(self) -> "ExperimentConfig":
        """Return a copy with the task-decided model fields filled in (and checked)."""
        from lab.tasks import make_task

        task = make_task(self.task)
        decided = {
            "d_vocab": task.d_vocab,
            "d_vocab_out": task.d_vocab_out,
            "n_ctx": task.n_ctx,
            "causal": task.causal,
            "pad_token_id": task.pad_token_id,
        }
        for key, value in decided.items():
            given = getattr(self.model, key)
            if given is not None and given != value:
                raise ConfigError(f"model.{key} = {given!r} disagrees with task {task.name!r}, which needs {value!r}; leave it unset")
        if self.model.n_heads * self.model.d_head <= 0:
            raise ConfigError("model.n_heads * model.d_head must be positive")
        model = self.model.model_copy(update=decided)
        return self.model_copy(update={"model": model})


# --- loading ---------------------------------------------------------------------------------


def experiment_path(experiment: str | Path) -> Path:
    """A TOML path, or the name of a file in `experiments/` (with or without `.toml`)."""
    path = Path(experiment)
    if path.is_file():
        return path
    for candidate in (EXPERIMENTS_DIR / f"{experiment}.toml", EXPERIMENTS_DIR / str(experiment)):
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.toml")))
    raise ConfigError(f"no experiment {str(experiment)!r}: not a file, and not one of experiments/ ({known})")


def parse_override(assignment: str) -> tuple[list[str], Any]:
    """`train.lr=3e-3` -> (["train", "lr"], 0.003). Values are TOML literals; bare words are strings."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r} is not of the form section.key=value (e.g. train.steps=500)")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for assignment in overrides:
        path, value = parse_override(assignment)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {assignment!r}: {part!r} is a value, not a section")
        node[path[-1]] = value
    return data


def load_experiment(experiment: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load, override and validate an experiment; raises `ConfigError` with one clear line."""
    path = experiment_path(experiment)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
    data.setdefault("name", path.stem)
    apply_overrides(data, overrides or [])
    return validate_experiment(data, source=str(path))


def validate_experiment(data: dict, source: str = "config") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: {describe_validation_error(err, data)}") from None


def describe_validation_error(err: ValidationError, data: dict) -> str:
    """One line for the first error: the dotted key, the bad value, and what is valid."""
    first = err.errors()[0]
    loc = [str(part) for part in first["loc"]]
    key = ".".join(loc)
    if first["type"] == "extra_forbidden":
        valid = _valid_keys(loc[:-1], data)
        close = difflib.get_close_matches(loc[-1], valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown key {key!r}{hint} (valid keys here: {', '.join(valid)})"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        return f"missing key {key!r}"
    return f"{key} = {first.get('input')!r}: {message}"


def _valid_keys(section: list[str], data: dict) -> list[str]:
    model: type[BaseModel] = ExperimentConfig
    for part in section:
        if part == "task":
            from lab.tasks import task_class

            try:
                model = task_class(data.get("task", {}).get("name", "")).Config
            except ConfigError:
                model = TaskConfig
            continue
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else model
    return sorted(model.model_fields)
