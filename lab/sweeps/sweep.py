"""Sweeps: many runs of one experiment over a grid of config values, as one thing on disk and in Python.

    lab sweep modadd_quick --grid train.weight_decay=0.3,1,3 --grid task.train_frac=0.3,0.5 --seeds 2

    runs/modadd_quick-sweep/
      sweep.json                                  the axes, the members and their points (below)
      weight_decay0.3-train_frac0.3-seed0/        an ordinary run folder per member (config.json,
      weight_decay0.3-train_frac0.3-seed1/        metrics.jsonl, summary.json, checkpoints/, ...)
      ...

The axes come from the experiment's [sweep] table (`"train.weight_decay" = [0.3, 1.0]`, `seeds = 2`)
and the command line (`--grid KEY=V1,V2,...` adds or replaces an axis, `--seeds N` replaces seeds).
Every member's config is built and validated, and every member's folder name derived and checked
for collisions, before anything trains. Members of the same model shapes train together as one
stacked ensemble (`lab.sweeps.ensemble`); members of other shapes in their own groups, one group after
another, or as Ray tasks with `--backend ray` (`lab.sweeps.ray_backend`).

Running the same command again continues the sweep: finished members are skipped, interrupted ones
resume from their checkpoint exactly as `lab train --resume` would. Ctrl-C checkpoints every
running member (rerun to continue). A rerun whose axes or base config differ is refused.

    sweep = lab.load_sweep("modadd_quick-sweep")
    sweep.members          # DataFrame: one row per member; one column per axis, seed, status, phase, ...
    sweep.phases(train_acc=0.9, test_acc=0.9, gap=1000)   # Liu et al. 2022's phases, other thresholds
    sweep.outcome_by("task.train_frac", "grok_step")      # median and spread over seeds (Power et al. Fig. 1)
    sweep.run("weight_decay1.0-train_frac0.3-seed0")      # a member as a lab.Run

sweep.json: {"name", "experiment", "experiment_file", "overrides", "axes": {key: [values]}, "seeds",
"base_config", "created_at", "updated_at", "status", "members": [{"name", "point": {key: value, ...,
"seed": s}}]}. A member's own status lives in its summary.json only.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import sys
import time
import tomllib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lab.runs import storage
from lab.config import (
    ExperimentConfig,
    check_config_key,
    describe_validation_error,
    is_config_of,
    load_experiment_data,
    loads_toml,
    parse_override,
)
from lab.errors import ConfigError, RunError

from lab.sweeps import stats
from lab.sweeps.stats import PHASE_ACC, PHASE_GAP, PHASES, STEP_OUTCOMES, UNFINISHED, phase_of  # noqa: F401  (public here too)

SWEEP_FILE = storage.SWEEP_FILE  # "sweep.json"
# A sweep's size is checked before any member is built: each member is a config in memory and a folder
# with a writer lock on disk. 10,000 is ten times the largest grid of the papers we reproduce.
MAX_SWEEP_MEMBERS = 10_000


# --- the spec: axes, seeds, members ------------------------------------------------------------------


@dataclass
class SweepMember:
    name: str  # folder name under the sweep folder
    point: dict[str, Any]  # dotted key -> value (as the validated config holds it), and "seed"
    config: ExperimentConfig  # resolved


@dataclass
class SweepSpec:
    """What a sweep is: an experiment (with fixed overrides), axes and seeds. `members()` expands it."""

    experiment: str
    name: str
    axes: dict[str, list[Any]] = field(default_factory=dict)
    seeds: int | None = None
    overrides: list[str] = field(default_factory=list)
    experiment_name: str = ""
    experiment_file: str = ""
    base: dict = field(default_factory=dict, repr=False)  # the experiment with overrides, as a dict

    @classmethod
    def build(cls, experiment: str | os.PathLike, grid: Iterable[str] = (), seeds: int | None = None,
              overrides: Iterable[str] = (), name: str | None = None) -> "SweepSpec":
        """The experiment's [sweep] table, with `--grid KEY=V1,V2` axes added or replacing and `--seeds` replacing."""
        overrides = list(overrides)
        base, table, path = load_experiment_data(experiment, overrides)
        axes: dict[str, list] = {}
        table_seeds = None
        for key, values in table.items():
            if key == "seeds":
                table_seeds = _check_seeds(values, f"{path}: [sweep] seeds")
                continue
            axes[key] = _check_axis(key, values, base, f"{path}: [sweep]")
        for assignment in grid:
            key, values = parse_grid(assignment)
            axes[key] = _check_axis(key, values, base, "--grid")
        if seeds is not None:
            table_seeds = _check_seeds(seeds, "--seeds")
        if table_seeds is not None and "model.seed" in axes:
            raise ConfigError("give the model seeds either as seeds = N (--seeds N) or as a model.seed axis, not both")
        name = name or f"{base['name']}-sweep"
        try:
            storage.check_run_name(name)
        except RunError as err:
            raise ConfigError(f"sweep name: {err}") from None
        spec = cls(str(experiment), name, axes, table_seeds, overrides, str(base["name"]), str(path), base)
        spec.check_size()
        return spec

    def members(self) -> list[SweepMember]:
        """Every point of the grid (axes in order, seeds innermost), validated and named; one line on the first problem."""
        self.check_size()
        axes = dict(self.axes)
        if self.seeds is not None:
            axes["model.seed"] = list(range(self.seeds))
        shorts = _short_keys(list(axes))
        members: list[SweepMember] = []
        taken: dict[str, dict] = {}
        for combo in itertools.product(*axes.values()):
            data = copy.deepcopy(self.base)
            for key, value in zip(axes, combo):
                _set_dotted(data, key, value)
            given = ", ".join(f"{key} = {value!r}" for key, value in zip(axes, combo)) or "the base point"
            try:
                config = ExperimentConfig.model_validate(data).resolve()
            except ConfigError as err:
                raise ConfigError(f"sweep point {given}: {err}") from None
            except Exception as err:  # pydantic's ValidationError: one line naming the key and value
                from pydantic import ValidationError

                if not isinstance(err, ValidationError):
                    raise
                raise ConfigError(f"sweep point {given}: {describe_validation_error(err, data)}") from None
            dumped = json.loads(config.model_dump_json())
            point = {key: _get_dotted(dumped, key) for key in self.axes}
            point["seed"] = config.model.seed
            parts = [f"{shorts[key]}{name_part(_get_dotted(dumped, key))}" for key in axes]
            member_name = "-".join(parts) or "base"
            try:
                storage.check_run_name(member_name)
            except RunError:
                raise ConfigError(f"sweep point {given}: its folder name {member_name!r} is not allowed (letters, digits, "
                                  f"'.', '_', '-', at most 128 characters); use fewer or shorter axis values") from None
            if member_name in taken:
                raise ConfigError(f"sweep points {taken[member_name]} and {given} would share the folder name "
                                  f"{member_name!r}; make the axis values distinct")
            taken[member_name] = given
            members.append(SweepMember(member_name, point, config))
        return members

    def size(self) -> int:
        """How many members the grid has (axes' lengths times seeds), without building any."""
        return math.prod(len(values) for values in self.axes.values()) * (self.seeds or 1)

    def check_size(self) -> None:
        """One ConfigError line when the grid has more than MAX_SWEEP_MEMBERS members, before any is built."""
        if self.size() > MAX_SWEEP_MEMBERS:
            sizes = " x ".join([*(f"{len(v)} {k}" for k, v in self.axes.items()), *([f"{self.seeds} seeds"] if self.seeds else [])])
            raise ConfigError(f"the sweep has {self.size():,} members ({sizes}), more than the {MAX_SWEEP_MEMBERS:,} a sweep "
                              f"may have; use fewer axis values or seeds, or split it into several sweeps (--name)")

    def normalised_axes(self, members: list[SweepMember]) -> dict[str, list]:
        """The axes with values as the validated configs hold them (e.g. 1 -> 1.0 for a float field)."""
        return {key: list(dict.fromkeys(_hashable(m.point[key]) for m in members)) for key in self.axes}

    def base_config(self) -> dict:
        return json.loads(ExperimentConfig.model_validate(self.base).model_dump_json())


def parse_grid(assignment: str) -> tuple[str, list]:
    """`train.weight_decay=0.3,1,3` -> ("train.weight_decay", [0.3, 1, 3]). Values are TOML literals as in --set
    (`train.betas=[0.9,0.98],[0.9,0.99]`, `task.operator=add,sub`); bare words are strings."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key or not raw.strip():
        raise ConfigError(f"--grid {assignment!r} is not of the form section.key=v1,v2,... (e.g. train.weight_decay=0.3,1,3)")
    try:
        values = loads_toml(f"v = [{raw}]", f"--grid {key}")["v"]
    except tomllib.TOMLDecodeError:
        values = [parse_override(f"{key}={part}")[1] for part in raw.split(",")]
    return key, values


def _check_axis(key: str, values: Any, base: dict, where: str) -> list:
    if key in ("seeds", "seed"):
        raise ConfigError(f"{where}: {key!r} is not a config key; use seeds = N (--seeds N) or a model.seed axis")
    check_config_key(key, base, where=where)
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where} {key!r} = {values!r}: an axis needs a non-empty list of values, e.g. [0.3, 1.0]")
    for value in values:
        if isinstance(value, dict):
            raise ConfigError(f"{where} {key!r}: value {value!r} is a table; axis values are numbers, strings, booleans or lists")
    return values


def _check_seeds(seeds: Any, where: str) -> int:
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise ConfigError(f"{where} = {seeds!r}: must be a positive integer (members get model.seed = 0 .. N-1)")
    return seeds


def _set_dotted(data: dict, key: str, value: Any) -> None:
    *sections, last = key.split(".")
    node = data
    for part in sections:
        node = node.setdefault(part, {})
    node[last] = copy.deepcopy(value)


def _get_dotted(data: dict, key: str) -> Any:
    node = data
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _short_keys(keys: list[str]) -> dict[str, str]:
    """The last dotted part of each key ("train.weight_decay" -> "weight_decay"), unless two keys share it."""
    lasts = [key.rsplit(".", 1)[-1] for key in keys]
    return {key: last if lasts.count(last) == 1 else key.replace(".", "_") for key, last in zip(keys, lasts)}


def name_part(value: Any) -> str:
    """A value as it appears in a member's folder name (`storage.safe_name_part`): 0.3 -> "0.3", True -> "true",
    "x2+y2" -> "x2plusy2", [0.9, 0.98] -> "0.9_0.98". Collisions are checked by `SweepSpec.members`."""
    return storage.safe_name_part(value)


# --- running -----------------------------------------------------------------------------------------


class MemberEntry(BaseModel):
    """One member in sweep.json: its folder name (a run name, so it stays inside the sweep folder) and its point."""

    model_config = ConfigDict(strict=True, extra="ignore")
    name: str
    point: dict[str, Any]

    @field_validator("name")
    @classmethod
    def _a_folder_inside_the_sweep(cls, name: str) -> str:
        try:
            return storage.check_run_name(name)
        except RunError:
            raise ValueError("not a member folder name (letters, digits, '.', '_', '-'; no '/')") from None


class SweepRecord(BaseModel):
    """sweep.json, checked at the boundary like every run file (see the module docstring for the fields).
    Keys a later lab adds are ignored, not damage; wrong types, a member outside the folder, or a point
    without an axis are damage."""

    model_config = ConfigDict(strict=True, extra="ignore")
    name: str
    experiment: str | None = None
    experiment_file: str | None = None
    overrides: list[str] = []
    axes: dict[str, list[Any]] = {}
    seeds: int | None = Field(None, ge=1)
    base_config: dict[str, Any] = {}
    created_at: float | None = None
    updated_at: float | None = None
    status: str = "created"
    members: list[MemberEntry] = []

    @model_validator(mode="after")
    def _members_fit_the_axes(self) -> "SweepRecord":
        names = set()
        for number, member in enumerate(self.members):
            missing = [key for key in [*self.axes, "seed"] if key not in member.point]
            if missing:
                raise ValueError(f"members.{number} ({member.name}) has no value for {missing[0]!r}")
            if member.name in names:
                raise ValueError(f"members.{number}: {member.name!r} is listed twice")
            names.add(member.name)
        return self


def read_sweep_record(path: Path) -> dict:
    """SWEEP/sweep.json as a checked dict; missing, not a file, damaged JSON or wrong fields raise one RunError line
    naming it (and how to repair it: the sweep's own command rebuilds it)."""
    hint = "rerun the sweep's command to rebuild it"
    try:
        data = storage.read_json(path)
    except RunError as err:
        raise RunError(f"{err}; {hint}") from None
    try:
        return SweepRecord.model_validate(data).model_dump()
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "the file"
        value = repr(first.get("input"))
        value = value if len(value) <= 60 else value[:57] + "..."
        raise RunError(f"{path}: damaged sweep file ({key} = {value}: {first['msg'].removeprefix('Value error, ')}); {hint}") from None


def sweep_record(spec: SweepSpec, members: list[SweepMember], created_at: float | None = None, status: str = "created") -> dict:
    now = time.time()
    return {
        "name": spec.name,
        "experiment": spec.experiment_name,
        "experiment_file": spec.experiment_file,
        "overrides": spec.overrides,
        "axes": spec.normalised_axes(members),
        "seeds": spec.seeds,
        "base_config": spec.base_config(),
        "created_at": created_at or now,
        "updated_at": now,
        "status": status,
        "members": [{"name": m.name, "point": m.point} for m in members],
    }


def prepare_sweep(spec: SweepSpec, runs_dir: str | os.PathLike | None = None) -> tuple[Path, list[SweepMember], dict]:
    """Validate every member and the sweep folder, before anything is trained or written.

    Returns (sweep folder, members, sweep.json record). A folder that holds another sweep (other
    axes, seeds or base config), or something that is not a sweep, is refused with one line."""
    members = spec.members()
    runs_dir = Path(runs_dir or storage.default_runs_dir())
    sweep_dir = runs_dir / spec.name
    record = sweep_record(spec, members)
    if os.path.lexists(sweep_dir) and not sweep_dir.is_dir():  # a file, a broken symlink or a symlink loop
        raise RunError(f"{sweep_dir} exists and is not a folder; pick another --name")
    if os.path.lexists(sweep_dir / SWEEP_FILE):
        try:
            old = read_sweep_record(sweep_dir / SWEEP_FILE)
        except RunError as err:  # damaged: rebuilt from this command, if the member folders are this command's
            _check_members_are_of(sweep_dir, members, f"its {SWEEP_FILE} is damaged ({str(err).split(': ', 1)[-1]})")
        else:
            _check_same_sweep(old, record, sweep_dir)
            record["created_at"] = old.get("created_at") or record["created_at"]
    elif sweep_dir.exists():  # sweep.json lost: the member folders of this command rebuild it; anything else is not ours
        _check_members_are_of(sweep_dir, members, f"it has no {SWEEP_FILE}")
    return sweep_dir, members, record


def _check_members_are_of(sweep_dir: Path, members: list[SweepMember], problem: str) -> None:
    """A sweep folder whose sweep.json is damaged or lost may be rebuilt by this command only if every folder in it
    is one of this command's members, holding that member's config; else one RunError line."""
    configs = {m.name: m.config for m in members}
    for entry in sorted(sweep_dir.iterdir()):
        if entry.name.startswith(".") or entry.name == SWEEP_FILE:
            continue
        ours = entry.name in configs and entry.is_dir() and not entry.is_symlink()
        if ours and os.path.lexists(entry / "config.json"):
            try:
                ours = is_config_of(storage.read_json(entry / "config.json"), configs[entry.name])
            except RunError:
                ours = False
        if not ours:
            raise RunError(f"{sweep_dir} is not a sweep of this command ({problem}, and {entry.name!r} is not one of "
                           f"this command's members); rerun it with the axes and --set values it was made with, or pick another --name")


def _set_aside_damaged_record(sweep_dir: Path, log) -> None:
    """Under the sweep's lock, before it is rewritten: a damaged sweep.json (a folder, a symlink loop, bad JSON)
    is renamed to a hidden .sweep.json.damaged-<time>, never deleted."""
    path = sweep_dir / SWEEP_FILE
    if not os.path.lexists(path):
        return
    try:
        read_sweep_record(path)
        return
    except RunError as err:
        reason = str(err)
    aside = sweep_dir / f".{SWEEP_FILE}.damaged-{time.time_ns()}"
    try:
        os.replace(path, aside)
    except OSError as err:
        raise storage.storage_error(path, err, "set aside the damaged") from None
    log(f"{reason.split('; ')[0]}; rebuilt from the member folders and this command (the old one is kept as {aside.name})")


def _record_is_current(sweep_dir: Path, record: dict) -> bool:
    """Does sweep.json already say what this command would write for a finished sweep (same members, finished)?"""
    try:
        old = read_sweep_record(sweep_dir / SWEEP_FILE)
    except RunError:
        return False
    return old["status"] == "finished" and old["members"] == json.loads(json.dumps(record["members"]))


def _check_same_sweep(old: dict, new: dict, sweep_dir: Path) -> None:
    hint = "rerun with the same axes to continue it, or pick another --name"
    old_axes = json.loads(json.dumps(old.get("axes")))
    new_axes = json.loads(json.dumps(new["axes"]))
    if old_axes != new_axes or old.get("seeds") != new["seeds"]:
        raise ConfigError(f"sweep {str(sweep_dir)!r} already exists with axes {_axes_text(old_axes, old.get('seeds'))}, "
                          f"this command gives {_axes_text(new_axes, new['seeds'])}; {hint}")
    diff = _first_difference(old.get("base_config", {}), new["base_config"])
    if diff is not None:
        key, was, now = diff
        raise ConfigError(f"sweep {str(sweep_dir)!r} was made with {key} = {was!r}, this command gives {now!r}; "
                          f"use the same experiment and --set values to continue it, or pick another --name")


def _axes_text(axes: dict, seeds: int | None) -> str:
    parts = [f"{key}={','.join(map(str, values))}" for key, values in axes.items()]
    if seeds is not None:
        parts.append(f"seeds={seeds}")
    return " ".join(parts) or "(none)"


def _first_difference(old: Any, new: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            found = _first_difference(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else key)
            if found is not None:
                return found
        return None
    return None if old == new else (prefix, old, new)


def member_finished(run_dir: Path, config: ExperimentConfig) -> bool:
    """True when the folder holds a finished run of exactly this config (a rerun leaves it alone)."""
    try:
        if not is_config_of(storage.read_json(run_dir / "config.json"), config):
            return False
        return storage.read_json(run_dir / "summary.json").get("status") == "finished"
    except RunError:
        return False


def training_groups(members: list[SweepMember]) -> list[list[SweepMember]]:
    """Members grouped into ensembles of the same model shapes, each group cut into pieces of at most
    `storage.max_writer_locks()` (a group holds every member's writer lock while it trains: one open file
    each); every architecture stacks (`lab.sweeps.ensemble.group_by_shape`)."""
    from lab.sweeps.ensemble import group_by_shape

    most = storage.max_writer_locks()
    groups = [[members[i] for i in group] for group in group_by_shape([m.config for m in members])]
    return [group[start : start + most] for group in groups for start in range(0, len(group), most)]


def train_group(group: list[SweepMember], sweep_dir: Path, progress: bool, stop=None) -> list[dict]:
    """Train one group into its members' folders (continuing unfinished ones); returns their summaries."""
    from lab.sweeps.ensemble import train_ensemble

    return train_ensemble([(m.config, sweep_dir / m.name) for m in group], progress=progress, stop=stop)


def _describe_group(group: list[SweepMember]) -> str:
    model = group[0].config.model
    arch = getattr(model, "arch", "transformer")
    return f"{len(group)} member{'s' * (len(group) != 1)}, {group[0].config.task.name}, {arch} d_model {model.d_model}" + (
        " (vectorised)" if len(group) > 1 else "")


def run_sweep(spec: SweepSpec, runs_dir: str | os.PathLike | None = None, backend: str = "local",
              address: str | None = None, progress: bool = True, log=None) -> dict:
    """Train (or continue) a sweep; returns {"sweep_dir", "status", "members", "trained", "skipped", counts by status}.

    status is "finished", or "interrupted" after Ctrl-C (every running member checkpointed)."""
    log = log or (lambda message: print(message, file=sys.stderr))
    if backend not in ("local", "ray"):
        raise ConfigError(f"--backend {backend!r}: use local or ray")
    if backend == "local" and address:
        raise ConfigError("--address is for --backend ray")
    run_ray = None
    if backend == "ray":
        from lab.sweeps.ray_backend import require_ray, run_groups_on_ray

        require_ray()  # one line naming the extra, before anything is written
        run_ray = run_groups_on_ray
    sweep_dir, members, record = prepare_sweep(spec, runs_dir)
    todo = [m for m in members if not member_finished(sweep_dir / m.name, m.config)]
    groups = training_groups(todo)
    log(f"sweep {sweep_dir}: {len(members)} members, {len(members) - len(todo)} finished, "
        f"{len(todo)} to train in {len(groups)} group{'s' * (len(groups) != 1)}")
    if not todo and _record_is_current(sweep_dir, record):  # nothing to do: touch nothing
        return _result(sweep_dir, members, "finished", 0)
    from contextlib import nullcontext

    from lab.errors import RunLockedError

    if run_ray is not None and groups:  # connect first: an unreachable --address is refused before anything is written
        from lab.sweeps.ray_backend import ray_session

        session = ray_session(address)
    else:
        session = nullcontext()
    with session:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        try:  # one writer per sweep: a second `lab sweep` of the same sweep stops here, before any member
            lock = storage.acquire_writer(sweep_dir)
        except RunLockedError:
            pid = storage.writer_pid(sweep_dir)
            raise RunLockedError(f"sweep {sweep_dir} is being trained by {f'PID {pid}' if pid else 'another process'}; "
                                 f"wait for it, or stop it (Ctrl-C) and rerun this command to continue") from None
        with lock:
            _set_aside_damaged_record(sweep_dir, log)
            return _train_sweep(sweep_dir, members, todo, groups, record, run_ray, address, progress, log)


def _train_sweep(sweep_dir, members, todo, groups, record, run_ray, address, progress, log) -> dict:
    status = "running" if todo else "finished"
    record["status"] = status
    storage.atomic_write_json(sweep_dir / SWEEP_FILE, record)
    try:
        if run_ray is not None and groups:
            stopped = run_ray(groups, sweep_dir, address=address, progress=progress, log=log)
        else:
            stopped = False
            for number, group in enumerate(groups, 1):
                log(f"group {number}/{len(groups)}: {_describe_group(group)}")
                summaries = train_group(group, sweep_dir, progress)
                if any(s.get("status") == "interrupted" for s in summaries):
                    stopped = True
                    break
        unfinished = [m for m in members if _member_status(sweep_dir / m.name) != "finished"]
        if unfinished and not stopped:  # a member that neither finished nor was stopped: say so rather than "finished"
            raise RunError(f"{len(unfinished)} sweep member(s) did not finish, e.g. {sweep_dir / unfinished[0].name}; "
                           f"see its summary.json, then rerun the command to continue")
        status = "interrupted" if unfinished else "finished"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except BaseException:
        status = "failed"
        raise
    finally:
        record["status"] = status
        record["updated_at"] = time.time()
        storage.atomic_write_json(sweep_dir / SWEEP_FILE, record)
    return _result(sweep_dir, members, status, len(todo))


def _result(sweep_dir: Path, members: list[SweepMember], status: str, trained: int) -> dict:
    counts: dict[str, int] = {}
    for m in members:
        member_status = _member_status(sweep_dir / m.name)
        counts[member_status] = counts.get(member_status, 0) + 1
    return {"sweep_dir": sweep_dir, "status": status, "members": len(members), "trained": trained,
            "skipped": len(members) - trained, "counts": counts}


def _member_status(run_dir: Path) -> str:
    """A member's status as `lab runs` derives it (`lab.runs.run.live_status`): a member whose writer is gone
    while its summary says "running" is "interrupted (resumable)"; no summary yet is "not started"."""
    return _member_summary(run_dir)["status"]


def _member_summary(run_dir: Path) -> dict:
    """summary.json with its live status; {"status": "not started"} without one, "damaged" (and "error") if unreadable."""
    from lab.runs.run import live_status, read_summary

    if not os.path.lexists(run_dir / "summary.json"):
        return {"status": live_status(run_dir, None) or "not started"}
    try:
        summary = read_summary(run_dir)
    except RunError as err:
        return {"status": "damaged", "error": str(err)}
    return {**summary, "status": live_status(run_dir, summary.get("status")) or "unknown"}


# --- reading -----------------------------------------------------------------------------------------


def _sweep_path(sweep: str | os.PathLike, runs_dir: str | os.PathLike | None = None) -> Path:
    path = Path(sweep)
    if path.is_dir() and storage.is_sweep_folder(path):  # even with a damaged or lost sweep.json: `Sweep` names it
        return path
    root = Path(runs_dir or storage.default_runs_dir())
    if not path.is_absolute() and (root / path).is_dir() and storage.is_sweep_folder(root / path):
        return root / path
    known = ", ".join(row["name"] for row in list_sweeps(runs_dir)) or "none"
    raise RunError(f"no sweep {str(sweep)!r}: not a folder holding {SWEEP_FILE}, nor a sweep name under {root} (sweeps there: {known})")


def load_sweep(sweep: str | os.PathLike, runs_dir: str | os.PathLike | None = None) -> "Sweep":
    """A sweep by path (`"runs/modadd_quick-sweep"`) or by name under the runs folder (`"modadd_quick-sweep"`)."""
    return Sweep(_sweep_path(sweep, runs_dir))


def _first_above(steps, values, threshold: float, budget: int | None) -> int | None:
    for step, value in zip(steps, values):
        if budget is not None and step > budget:
            return None
        if value > threshold:
            return int(step)
    return None


class Sweep:
    """Read-only view of a sweep folder. `.members` is read when first asked for; `reload()` re-reads."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.record = read_sweep_record(self.path / SWEEP_FILE)  # checked: a damaged one is one RunError line
        self.name = self.record["name"]
        self.axes: dict[str, list] = self.record["axes"]
        self.seeds: int | None = self.record["seeds"]
        self._metrics: dict[str, list[dict]] = {}

    def __repr__(self) -> str:
        return f"Sweep({str(self.path)!r}, members={len(self.record['members'])}, axes={list(self.axes)})"

    @property
    def status(self) -> str:
        """The sweep's status as it is now: sweep.json's, except that "running" whose writer (the `lab sweep`
        process, which holds the sweep folder's lock) has gone is "interrupted (resumable)", as for a run."""
        from lab.runs.run import live_status

        return live_status(self.path, self.record["status"])

    def member_dir(self, name: str) -> Path:
        """A member's folder; one that leads out of the sweep folder (a symlink) is refused, never read."""
        run_dir = self.path / name
        if os.path.realpath(run_dir) != os.path.join(os.path.realpath(self.path), name):
            raise RunError(f"{run_dir}: leads out of the sweep folder {self.path} (a symlink); a member is a folder inside it")
        return run_dir

    def reload(self) -> "Sweep":
        self.__init__(self.path)
        self.__dict__.pop("members", None)
        return self

    @property
    def member_names(self) -> list[str]:
        return [m["name"] for m in self.record["members"]]

    def _summary(self, name: str) -> dict:
        """The member's summary with its live status (`_member_summary`); "damaged" if its folder leads outside."""
        try:
            return _member_summary(self.member_dir(name))
        except RunError as err:
            return {"status": "damaged", "error": str(err)}

    def run(self, member: str | int):
        """A member (by folder name or row number) as a `lab.Run`."""
        from lab.runs.run import load_run

        names = self.member_names
        if isinstance(member, bool) or not isinstance(member, (int, str)):  # True is not member 1
            raise RunError(f"member={member!r}: give a member's folder name (e.g. {names[0] if names else 'none'!r}) "
                           f"or its row number 0..{len(names) - 1}")
        if isinstance(member, int):
            if not 0 <= member < len(names):
                raise RunError(f"sweep {self.name!r} has members 0..{len(names) - 1}, not {member}")
            member = names[member]
        if member not in names:
            raise RunError(f"sweep {self.name!r} has no member {member!r}; members look like {names[0] if names else 'none'!r}")
        return load_run(self.member_dir(member))

    def metrics(self, member: str) -> list[dict]:
        """A member's metrics.jsonl rows; a member whose folder or metrics are damaged has none here
        (its status says "damaged"; `run(member)` names the problem)."""
        if member not in self._metrics:
            try:
                self._metrics[member] = storage.read_jsonl(self.member_dir(member) / "metrics.jsonl")
            except RunError:
                self._metrics[member] = []
        return self._metrics[member]

    @cached_property
    def members(self):
        """One row per member: one column per axis (the dotted key), seed, member, run (its path), status,
        step, steps, memorize_step, grok_step, final_train_acc, final_test_acc, final_train_loss,
        final_test_loss, best_test_acc, wall_time_s, and Liu et al.'s t_train, t_test and phase at the
        default thresholds (`phases()` for others)."""
        import pandas as pd

        rows = []
        for entry in self.record["members"]:
            name, point = entry["name"], entry["point"]
            run_dir = self.path / name
            summary = self._summary(name)
            final = summary.get("final") or {}
            metrics = self.metrics(name)
            row = {key: _hashable(point.get(key)) for key in self.axes}
            row.update({
                "seed": point.get("seed"), "member": name, "run": str(run_dir), "status": summary["status"],
                "step": summary.get("step"), "steps": summary.get("steps"),
                "memorize_step": summary.get("memorize_step"), "grok_step": summary.get("grok_step"),
                "final_train_acc": final.get("train_acc"), "final_test_acc": final.get("test_acc"),
                "final_train_loss": final.get("train_loss"), "final_test_loss": final.get("test_loss"),
                "best_test_acc": max((r["test_acc"] for r in metrics if r.get("test_acc") is not None), default=None),
                "wall_time_s": summary.get("wall_time_s"),
            })
            rows.append(row)
        frame = pd.DataFrame(rows)
        if rows:
            phases = self.phases()
            frame[["t_train", "t_test", "phase"]] = phases[["t_train", "t_test", "phase"]].to_numpy()
            for column in (*STEP_OUTCOMES, "step", "steps"):
                frame[column] = frame[column].astype("Int64")
        return frame

    def phases(self, train_acc: float = PHASE_ACC, test_acc: float = PHASE_ACC, gap: float = PHASE_GAP,
               budget: int | None = None):
        """Liu et al. 2022's phase of every member at these thresholds: DataFrame (member, t_train, t_test, phase).

        t_train / t_test: the first evaluated step whose train / test accuracy is above the threshold,
        at or before `budget` (None: the member's whole run). Members that have not finished get
        phase "unfinished" rather than a guess."""
        import pandas as pd

        rows = []
        for entry in self.record["members"]:
            name = entry["name"]
            metrics = [r for r in self.metrics(name) if None not in (r.get("step"), r.get("train_acc"), r.get("test_acc"))]
            steps = [r["step"] for r in metrics]
            t_train = _first_above(steps, [r["train_acc"] for r in metrics], train_acc, budget)
            t_test = _first_above(steps, [r["test_acc"] for r in metrics], test_acc, budget)
            status = self._summary(name)["status"]
            phase = phase_of(t_train, t_test, gap) if status == "finished" else UNFINISHED
            rows.append({"member": name, "t_train": t_train, "t_test": t_test, "phase": phase})
        frame = pd.DataFrame(rows, columns=["member", "t_train", "t_test", "phase"])
        frame[["t_train", "t_test"]] = frame[["t_train", "t_test"]].astype("Int64")
        return frame

    def outcome_by(self, axis: str, outcome: str = "grok_step", by: str | list[str] | None = None,
                   missing: str = "censor"):
        """Median and spread over seeds (and over every axis not named) of an outcome against one axis:
        Power et al.'s Figure 1 is `outcome_by("task.train_frac", "grok_step")`, Figure 2
        `outcome_by("task.train_frac", "best_test_acc", by="task.operator")`. The numbers the Sweeps
        page and `lab.plot_sweep_outcome` draw (`lab.sweeps.stats.outcome_table`).

        One row per value of `axis` (and of each `by` axis): n, n_censored (finished members that never
        reached a step outcome), n_unfinished (left out), median, q25, q75, min, max, mean. A member
        that never grokked is censored, not counted at its budget: a statistic that depends on it is
        NaN, with its lower bound in `<stat>_above` (median_above = 600: more than half never grokked
        within 600 steps). `missing="drop"` leaves such members out instead."""
        return stats.outcome_table(self.members, axis, outcome, by=by, missing=missing, sweep=self.name)

    def table(self, x: str, y: str, outcome: str = "phase", agg: str = "median"):
        """A (y values × x values) grid of one outcome for a heatmap: the majority phase of the finished
        members for "phase" (ties to the phase listed first in PHASES), else the `agg` statistic
        ("median", "q25", "q75", "min", "max", "mean") of `outcome_by`, NaN where it is censored."""
        return stats.grid(self.members, x, y, outcome, agg, sweep=self.name)


def list_sweeps(runs_dir: str | os.PathLike | None = None) -> list[dict]:
    """One row per sweep in the runs folder (newest first): name, path, experiment, axes, seeds, members,
    members per status (finished, running, interrupted, not started, ...), and phases of the finished ones."""
    root = Path(runs_dir or storage.default_runs_dir())
    if not root.is_dir():
        return []
    rows = []
    for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and storage.is_sweep_folder(p)):
        row = {"name": path.name, "path": str(path), "experiment": None, "axes": {}, "seeds": None, "members": 0,
               "status": "damaged", "statuses": {}, "phases": {}, "updated_at": path.stat().st_mtime}
        try:
            sweep = Sweep(path)
            frame = sweep.members
            row.update({"experiment": sweep.record["experiment"], "axes": sweep.axes, "seeds": sweep.seeds,
                        "members": len(frame), "status": sweep.status,
                        "updated_at": sweep.record["updated_at"] or row["updated_at"]})
            if len(frame):
                row["statuses"] = {k: int(v) for k, v in frame["status"].value_counts().items()}
                row["phases"] = {k: int(v) for k, v in frame["phase"].value_counts().items() if k != UNFINISHED}
        except RunError as err:  # a damaged sweep.json is this one row, named; the other sweeps are unaffected
            row["error"] = str(err).splitlines()[0]
            row["members"] = len(storage.member_folders(path))  # still listed as runs by `lab runs`
        rows.append(row)
    return sorted(rows, key=lambda r: r["updated_at"], reverse=True)
