"""Typed experiment configuration: task, model and training settings, loaded from TOML.

An experiment is three sections, validated by pydantic:

    [task]   name = "modular", p = 113, operator = "add", train_frac = 0.3, data_seed = 0
    [model]  n_layers = 1, d_model = 128, n_heads = 4, d_head = 32, d_mlp = 512, ...
    [train]  steps = 40000, lr = 1e-3, weight_decay = 1.0, betas = [0.9, 0.98], ...

The `[task]` table is validated by the config class the named task registers (see `lab.tasks`,
which sits below this module: tasks know nothing of experiments).
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

from pydantic import BaseModel, Field, SerializeAsAny, ValidationError, field_validator

from lab.errors import ConfigError
from lab.schema import StrictModel
from lab.tasks import TaskConfig, make_task, task_class

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"


class ModelConfig(StrictModel):
    # Which model (lab/models/architectures.py): the transformer of lab/models/transformer.py, or one rung below it on the
    # ladder perceptron -> MLP -> CNN -> transformer. d_model is every architecture's embedding width;
    # each keeps its own width fields, so one TOML holds them all and a sweep over `arch` alone
    # compares matched budgets.
    arch: Literal["transformer", "mlp", "cnn", "linear", "lstm"] = Field("transformer", description="model architecture")
    mlp_width: int = Field(256, ge=1, description="arch mlp: units per hidden layer")
    mlp_layers: int = Field(1, ge=1, description="arch mlp: hidden layers")
    mlp_input: Literal["auto", "concat", "mean"] = Field(
        "auto", description="arch mlp: embeddings concatenated (auto for fixed-length tasks) or averaged (auto with padding)")
    cnn_channels: int = Field(64, ge=1, description="arch cnn: channels of every convolution")
    cnn_kernel: int = Field(3, ge=1, description="arch cnn: kernel width, in characters")
    cnn_layers: int = Field(2, ge=1, description="arch cnn: convolution layers")
    linear_width: int = Field(0, ge=0, description="arch linear: 0 = a plain perceptron; N = the same linear function "
                                                   "factorised through N units without activation (to match a budget)")
    lstm_hidden: int = Field(128, ge=1, description="arch lstm: hidden units per layer")
    lstm_layers: int = Field(1, ge=1, description="arch lstm: stacked LSTM layers")
    n_layers: int = Field(1, ge=1)
    d_model: int = Field(128, ge=1)
    n_heads: int = Field(4, ge=1)
    d_head: int = Field(32, ge=1)
    d_mlp: int = Field(512, ge=1)
    act_fn: Literal["relu", "gelu"] = "relu"
    attn_only: bool = False
    normalization: Literal["none", "LN"] = Field("none", description="LayerNorm before attention, MLP and unembed")
    positional: Literal["learned", "sinusoidal", "none"] = Field(
        "learned", description="learned W_pos; fixed sinusoids (Vaswani et al. 2017); 'none' lets a model run on any length")
    attn_score: Literal["scaled_dot", "dot", "general", "additive"] = Field(
        "scaled_dot", description="how a query and a key give a score: q.k/sqrt(d_head), q.k, q W k (bilinear), w.tanh(q + k) (additive)")
    shared_blocks: bool = Field(False, description="one block's parameters at every layer (Universal Transformer style)")
    residual: bool = Field(True, description="false: no skip connections (each block's output replaces its input)")
    seed: int = Field(0, description="seed of the weight initialisation")
    init_scale: float = Field(1.0, gt=0, description="transformer: every weight matrix starts at this times the standard "
                                                     "init (Omnigrok's alpha, Liu et al. 2022b); 1.0 is the standard init")
    # Decided by the task; filled in by `ExperimentConfig.resolve()`.
    d_vocab: int | None = None
    d_vocab_out: int | None = None
    n_ctx: int | None = None
    causal: bool | None = None
    pad_token_id: int | None = None

    @field_validator("init_scale")
    @classmethod
    def _init_scale_is_for_the_transformer(cls, init_scale: float, info) -> float:
        if init_scale != 1.0 and info.data.get("arch", "transformer") != "transformer":
            raise ValueError(f"init_scale is applied by the transformer only (arch = 'transformer'), not arch = {info.data['arch']!r}; leave it at 1.0")
        return init_scale

    @field_validator("positional", "attn_score", "shared_blocks", "residual")
    @classmethod
    def _variants_are_for_the_transformer(cls, value, info):
        # positional = "none" predates the other archs' own fields: ladder experiments set it beside them
        default = cls.model_fields[info.field_name].default
        arch = info.data.get("arch", "transformer")
        if arch != "transformer" and value != default and (info.field_name, value) != ("positional", "none"):
            raise ValueError(f"{info.field_name} = {value!r} is a transformer setting (arch = 'transformer'), not arch = {arch!r}; "
                             f"leave it at {default!r}")
        return value


class GradFilterConfig(StrictModel):
    """Grokfast gradient filters (Lee et al. 2024); see `lab.training.recipes`."""

    kind: Literal["none", "ema", "ma"] = "none"
    alpha: float = Field(0.98, ge=0.0, lt=1.0, description="EMA momentum")
    lamb: float = Field(2.0, description="amplification of the slow gradient")
    window: int = Field(100, ge=1, description="MA window, in steps")


# What one run may ask for, checked when the config is validated (before anything is allocated): the
# trainer keeps every evaluation row in memory and plans every checkpoint step up front, so a typo such
# as steps = 1e12 must be one line, not a MemoryError.
MAX_STEPS = 10**9
MAX_EVALUATIONS = 10**6  # metrics.jsonl rows (steps / eval_every), about 1 KiB each in memory
MAX_CHECKPOINTS = 10**5  # checkpoint files (steps / checkpoint_every + log_checkpoints)


class TrainConfig(StrictModel):
    steps: int = Field(1000, ge=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = Field(10, ge=0, description="linear learning-rate warm-up")
    batch_size: int | None = Field(None, ge=1, description="None: full batch")
    eval_every: int = Field(100, ge=1)
    checkpoint_every: int = Field(1000, ge=1)
    log_checkpoints: int = Field(24, ge=0, le=MAX_CHECKPOINTS, description="extra checkpoints at log-spaced steps")
    train_eval_rows: int | None = Field(
        None, ge=1, description="score at most this many rows of the training split at each evaluation, evenly spaced "
                                "(None: every row; the test split is always scored whole): for a large corpus, whose "
                                "whole training split costs more to score than hundreds of steps")
    loss_dtype: Literal["float32", "float64"] = Field("float32", description="precision of the log-softmax")
    loss: Literal["softmax", "stablemax"] = Field("softmax", description="StableMax: Prieto et al. 2025")
    orthograd: bool = Field(False, description="⊥Grad: Prieto et al. 2025")
    grad_filter: GradFilterConfig = GradFilterConfig()
    stop_after_grok: int | None = Field(
        None, ge=0, description="end the run at the first evaluation this many steps after test acc >= 0.99 "
                                "(false or \"off\": run all steps)"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("stop_after_grok", mode="before")
    @classmethod
    def _stop_after_grok_off(cls, value):
        # TOML has no null: `--set train.stop_after_grok=false` (or "off") turns an experiment's early stop off
        return None if value is False or (isinstance(value, str) and value.strip().lower() in ("off", "none")) else value

    @field_validator("steps")
    @classmethod
    def _steps_within_limit(cls, steps: int) -> int:
        if steps > MAX_STEPS:
            raise ValueError(f"more than the {MAX_STEPS:,} steps a run may have")
        return steps

    @field_validator("eval_every", "checkpoint_every")
    @classmethod
    def _files_within_limit(cls, every: int, info) -> int:
        what, most, verb = {"eval_every": ("evaluations", MAX_EVALUATIONS, "log"),
                            "checkpoint_every": ("checkpoints", MAX_CHECKPOINTS, "keep")}[info.field_name]
        steps = info.data.get("steps")
        if steps is not None and steps // every + 1 > most:
            raise ValueError(f"with train.steps = {steps} that is {steps // every + 1:,} {what}, more than the {most:,} "
                             f"a run may {verb}; use {info.field_name} >= {-(-steps // (most - 1))}")
        return every

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
        return task_class(value["name"]).Config.model_validate(value)

    def resolve(self) -> "ExperimentConfig":
        """Return a copy with the task-decided model fields filled in (and checked)."""
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
        if task.read_position is None and self.model.arch in ("mlp", "cnn", "linear"):
            raise ConfigError(f"model.arch = {self.model.arch!r} gives one answer per input, but task {task.name!r} has a target "
                              "at every position (a next-token task); valid there: 'transformer', 'lstm'")
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


MAX_NESTING = 32  # an experiment is [section] tables of values (lists of lists at most); deeper is not an experiment


def loads_toml(text: str, where: str) -> dict:
    """`tomllib.loads`, refusing (one ConfigError line naming `where`) data nested deeper than MAX_NESTING,
    which would otherwise end in a RecursionError here or in any code that walks it."""
    # dotted keys nest too, and tomllib takes quadratic time over them (50k dots: a minute): count them first
    dotted = max((line.split("=", 1)[0].count(".") for line in text.splitlines()), default=0)
    try:
        data = tomllib.loads(text) if dotted <= MAX_NESTING else None
    except RecursionError:
        data = None
    if data is None or nesting_depth(data) > MAX_NESTING:
        raise ConfigError(f"{where}: nested more than {MAX_NESTING} levels deep; an experiment is [section] tables of values")
    return data


def nesting_depth(value: Any) -> int:
    """How deeply tables and lists nest in `value` (0 for a plain value), without recursion; stops past MAX_NESTING."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            if depth > MAX_NESTING:
                break
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def parse_override(assignment: str) -> tuple[list[str], Any]:
    """`train.lr=3e-3` -> (["train", "lr"], 0.003). Values are TOML literals; bare words are strings."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r} is not of the form section.key=value (e.g. train.steps=500)")
    try:
        value = loads_toml(f"v = {raw.strip()}", f"--set {key}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    if len(key.split(".")) > MAX_NESTING:
        raise ConfigError(f"--set {key}: nested more than {MAX_NESTING} levels deep; config keys look like section.key")
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


MAX_EXPERIMENT_BYTES = 1 << 20  # an experiment file is a few hundred bytes


def read_toml(path: Path) -> dict:
    """An experiment file as a dict; too large, not UTF-8 or not TOML is one ConfigError line naming the file."""
    from lab.errors import LabError
    from lab.files import read_text

    try:
        return loads_toml(read_text(path, limit=MAX_EXPERIMENT_BYTES), str(path))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
    except LabError as err:  # missing, a folder, too large, not UTF-8
        raise ConfigError(str(err)) from None


def load_experiment(experiment: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load, override and validate an experiment; raises `ConfigError` with one clear line."""
    path = experiment_path(experiment)
    data = read_toml(path)
    data.setdefault("name", path.stem)
    data.pop("sweep", None)  # the [sweep] table is for `lab sweep` (see `load_sweep_table`); `lab train` trains the base point
    apply_overrides(data, overrides or [])
    return validate_experiment(data, source=str(path), overrides=overrides or [])


def load_experiment_data(experiment: str | Path, overrides: list[str] | None = None) -> tuple[dict, dict, Path]:
    """(the experiment as a dict with `overrides` applied and no [sweep] table, its [sweep] table ({} if none), its path).

    For sweeps, which build one config per point from the dict; `load_experiment` is the usual way in."""
    path = experiment_path(experiment)
    data = read_toml(path)
    data.setdefault("name", path.stem)
    table = data.pop("sweep", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: 'sweep' must be a table ([sweep]), got {table!r}")
    apply_overrides(data, overrides or [])
    return data, table, path


def load_sweep_table(experiment: str | Path) -> dict:
    """The experiment's [sweep] table ({} if it has none), its keys checked: `seeds` a positive integer,
    every other key a dotted config key (checked against the experiment) mapped to a non-empty list."""
    data, table, path = load_experiment_data(experiment)
    for key, value in table.items():
        if key == "seeds":
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{path}: [sweep] seeds = {value!r}: must be a positive integer (model.seed = 0..seeds-1)")
            continue
        check_config_key(key, data, where=f"{path}: [sweep]")
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{path}: [sweep] {key!r} = {value!r}: an axis needs a non-empty list of values, e.g. [0.3, 1.0]")
    return table


def check_config_key(key: str, data: dict, where: str = "config") -> None:
    """Raise one ConfigError line unless `key` (e.g. "train.weight_decay") names a value of the experiment's config."""
    parts = key.split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"{where} key {key!r} is not a dotted config key such as train.weight_decay or task.train_frac")
    model: type[BaseModel] | None = ExperimentConfig
    for depth, part in enumerate(parts):
        if model is None:
            raise ConfigError(f"{where} key {key!r}: {'.'.join(parts[:depth])!r} is a value, not a section")
        valid = _valid_keys(parts[:depth], data)
        if part not in valid:
            close = difflib.get_close_matches(part, valid, n=1)
            hint = f"; did you mean {'.'.join([*parts[:depth], close[0]])!r}?" if close else ""
            raise ConfigError(f"{where} unknown key {key!r}{hint} (valid keys in {'.'.join(parts[:depth]) or 'the top level'}: {', '.join(valid)})")
        if depth == 0 and part == "task":
            model = TaskConfig  # any BaseModel: _valid_keys looks up the task's own class
            continue
        annotation = model.model_fields[part].annotation if model is not TaskConfig else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def validate_experiment(data: dict, source: str = "config", overrides: list[str] = ()) -> ExperimentConfig:
    """Validate; the one-line error names `source` (the TOML file), or the `--set` that gave the bad key."""
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{error_source(err, source, overrides)}: {describe_validation_error(err, data)}") from None


def error_source(err: ValidationError, source: str, overrides: list[str]) -> str:
    """`--set 'train.lr=-1'` when the first error's key (or a section above it) was set on the command line, else `source`."""
    loc = [str(part) for part in err.errors()[0]["loc"]]
    for assignment in reversed(overrides):  # the last --set of a key is the one that counts
        path, _ = parse_override(assignment)
        if loc[:len(path)] == path:
            return f"--set {assignment!r}"
    return source


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
            try:
                model = task_class(data.get("task", {}).get("name", "")).Config
            except ConfigError:
                model = TaskConfig
            continue
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else model
    return sorted(model.model_fields)


def is_config_of(saved: dict, config: ExperimentConfig) -> bool:
    """Does a run folder's saved config.json describe exactly `config`? Compared as validated configs, so
    a field added to the lab since the folder was written (at its default) does not count as a difference."""
    try:
        return ExperimentConfig.model_validate(saved) == config
    except (ValidationError, ValueError):
        return False
