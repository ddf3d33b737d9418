"""A sweep's statistics, computed once: phases (Liu et al. 2022), the cells of a two-axis grid, and an
outcome's median and spread over seeds (Power et al. 2022), from a members table as
`lab.Sweep.members` gives it (one row per member: one column per axis, seed, member, status, step,
steps, memorize_step, grok_step, ..., t_train, t_test, phase).

`lab.Sweep.outcome_by` / `table`, the Sweeps page and `lab.plot_*` all call these functions, so a
number on the page is the number the API returns.

Censored outcomes. A step outcome (grok_step, memorize_step, t_train, t_test) that a finished member
never reached is *censored* at the step the member ran to: all we know is that it is later than that.
Such a member is never counted as if it had reached the outcome at its budget. Statistics are
computed with censored members placed after every member that reached it (as survival analysis
orders them), and a statistic is *exact* only when it does not depend on a censored value; otherwise
the table gives its lower bound in `<stat>_above` (e.g. `median_above = 600`: "the median is > 600",
when more than half of the members never grokked within 600 steps) and leaves `<stat>` empty (NaN).
Members that have not finished (phase "unfinished") are left out of every statistic and counted in
`n_unfinished`: their outcome is not known yet, neither reached nor censored.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable

import numpy as np
import pandas as pd

from lab.errors import RunError

# Liu et al. 2022, Table 1, in the order the dashboard colours them (ties in a cell go to the earlier one)
PHASES = ("comprehension", "grokking", "memorization", "confusion")
UNFINISHED = "unfinished"
PHASE_ACC = 0.9  # "train / validation accuracy > 90% within the budget"
PHASE_GAP = 1000  # comprehension when step(test > 90%) - step(train > 90%) < 10^3
STEP_OUTCOMES = ("memorize_step", "grok_step", "t_train", "t_test")  # outcomes that are steps (None: never reached)
STATISTICS = ("median", "q25", "q75", "min", "max", "mean")
# columns of a members table that are not axes
MEMBER_COLUMNS = ("member", "run", "status", "phase", "step", "steps", "budget", "wall_time_s", *STEP_OUTCOMES)
PHASE_STEPS = ("t_train", "t_test")  # looked for only up to the phases' budget, when one is set (column "budget")


# --- phases (Liu et al. 2022, Table 1) ---------------------------------------------------------------


def phase_of(t_train: int | None, t_test: int | None, gap: float = PHASE_GAP) -> str:
    """Liu et al. 2022, Table 1, from the first steps with train / test accuracy above the threshold.

    comprehension: both cross, test less than `gap` steps after train; grokking: both, test `gap` or
    more steps later; memorization: only train; confusion: neither. A run whose test accuracy
    crosses but whose train accuracy does not (Table 1 has no such row) counts as confusion."""
    if t_train is None:
        return "confusion"
    if t_test is None:
        return "memorization"
    return "comprehension" if t_test - t_train < gap else "grokking"


def _missing(value) -> bool:
    return value is None or (not isinstance(value, str) and bool(pd.isna(value)))


def phase_reason(t_train, t_test, gap: float = PHASE_GAP, train_acc: float = PHASE_ACC, test_acc: float = PHASE_ACC,
                 phase: str | None = None) -> str:
    """Why a member has its phase, in one line: the crossing steps and the rule that decided it
    ("> 90%: train at 100, test at 350: 250 steps later (< 1000) → comprehension")."""
    if phase == UNFINISHED:
        return "still training: no phase yet"
    t_train = None if _missing(t_train) else int(t_train)
    t_test = None if _missing(t_test) else int(t_test)
    decided = phase_of(t_train, t_test, gap)
    if train_acc == test_acc:  # one threshold: said once
        head, train, test = f"> {train_acc:.0%}: ", "train", "test"
    else:
        head, train, test = "", f"train > {train_acc:.0%}", f"test > {test_acc:.0%}"
    if t_train is None:
        return f"{head}{train} never" + (f" (test at {t_test})" if t_test is not None else "") + f" → {decided}"
    if t_test is None:
        return f"{head}{train} at {t_train}, {test} never → {decided}"
    later = t_test - t_train
    rule = f"< {gap:g}" if later < gap else f"≥ {gap:g}"
    return f"{head}{train} at {t_train}, {test} at {t_test}: {later} steps later ({rule}) → {decided}"


def phase_thresholds_text(train_acc: float = PHASE_ACC, test_acc: float = PHASE_ACC, gap: float = PHASE_GAP,
                          budget: int | None = None) -> str:
    """Liu et al. 2022's Table 1 at these thresholds, in one line: the rule beside every phase label."""
    within = f"within {budget:,} steps" if budget else "within the run"
    return (f"train acc > {train_acc:.0%}, test acc > {test_acc:.0%} {within}; comprehension: test crosses "
            f"< {gap:g} steps after train, grokking: later; memorization: train only; confusion: neither")


def majority_phase(phases: list[str]) -> tuple[str, int]:
    """The most common phase of the finished members (ties go to the earlier phase in PHASES), and its
    count; "unfinished" (with the number of members) only when no member has finished."""
    done = [p for p in phases if p != UNFINISHED]
    if not done:
        return UNFINISHED, len(phases)
    counts = {p: done.count(p) for p in (*PHASES, *sorted(set(done) - set(PHASES))) if p in done}
    best = max(counts, key=lambda p: counts[p])  # max keeps the first of equals: PHASES' order breaks ties
    return best, counts[best]


# --- censored statistics -----------------------------------------------------------------------------


def censored_statistics(values, censored) -> dict[str, tuple[float, bool]]:
    """Median, quartiles, min, max and mean of `values` where `censored[i]` means "the true value is
    later than values[i]" (a member that never reached the outcome within values[i] steps).

    Returns {statistic: (number, exact)}: exact -> the statistic itself; not exact -> a lower bound
    (the true statistic is above it). A quantile (linear interpolation, numpy's and pandas' default)
    is exact when, with censored values placed last, it reads only observed values that no censored
    member can come before (each at most the smallest censored bound); its bound is the quantile with
    every censored value at its bound, which can only be lower. NaN for no values."""
    values = np.asarray(values, dtype=float)
    censored = np.asarray(censored, dtype=bool)
    if values.size == 0:
        return {s: (math.nan, True) for s in STATISTICS}
    observed = np.sort(values[~censored])
    floor = values[censored].min() if censored.any() else math.inf  # no censored member's true value is below this
    n = values.size
    out: dict[str, tuple[float, bool]] = {}
    for stat, q in (("min", 0.0), ("q25", 0.25), ("median", 0.5), ("q75", 0.75), ("max", 1.0)):
        position = (n - 1) * q
        lo, hi = math.floor(position), math.ceil(position)
        if hi < observed.size and observed[hi] <= floor:
            out[stat] = (float(observed[lo] + (observed[hi] - observed[lo]) * (position - lo)), True)
        else:
            out[stat] = (float(np.quantile(values, q)), False)
    out["mean"] = (float(values.mean()), not censored.any())
    return {s: out[s] for s in STATISTICS}


def stat_value(row, stat: str = "median") -> tuple[float, bool]:
    """(number, exact) of a statistic of an `outcome_table` / `cells` row: the statistic itself, or its
    lower bound when censored (exact False); (NaN, True) when there is none."""
    value, above = row.get(stat), row.get(f"{stat}_above")
    if value is not None and not pd.isna(value):
        return float(value), True
    if above is not None and not pd.isna(above):
        return float(above), False
    return math.nan, True


def stat_text(row, stat: str = "median", fmt: Callable[[float], str] = lambda v: f"{v:.6g}") -> str:
    """A statistic of an `outcome_table` / `cells` row as it reads: "3000", "> 600" (censored), "—" (none)."""
    value, exact = stat_value(row, stat)
    if math.isnan(value):
        return "—"
    return fmt(value) if exact else f"> {fmt(value)}"


def members_text(members: pd.DataFrame) -> pd.DataFrame:
    """The members table as it reads in a table: each step outcome as its step ("350"), "> 600" where a
    finished member never reached it within the 600 steps it ran (censored, never a number), "not yet"
    where an unfinished member has not reached it so far."""
    frame = members.copy()
    finished = _finished(members)
    for column in STEP_OUTCOMES:
        if column not in frame:
            continue
        frame[column] = [str(int(value)) if not _missing(value) else
                         ("not yet" if not done else (f"> {int(steps)}" if not _missing(steps) else "never"))
                         for value, done, steps in zip(members[column], finished, _ran(members, column))]
    return frame


# --- the members table: axes and outcomes ------------------------------------------------------------


def axes_of(members: pd.DataFrame) -> list[str]:
    """The axis columns of a members table (seed included)."""
    return [c for c in members.columns if c not in MEMBER_COLUMNS and not str(c).startswith(("final_", "best_"))]


def check_axes(members: pd.DataFrame, *keys: str, sweep: str | None = None) -> None:
    """One line for a key that is no axis of these members, or the same axis twice."""
    axes = axes_of(members)
    for key in keys:
        if key not in axes:
            owner = f"sweep {sweep!r}" if sweep else "the sweep"
            raise RunError(f"{owner} has no axis {key!r}; its axes: {', '.join(map(str, axes)) or 'none'}")
    if len(keys) == 2 and keys[0] == keys[1]:
        raise RunError(f"x and y are both {keys[0]!r}; pick two different axes")


def outcomes_of(members: pd.DataFrame) -> list[str]:
    """The numeric outcome columns of a members table."""
    axes = set(axes_of(members))
    return [c for c in members.columns if c not in axes and c not in ("member", "run", "status", "phase")]


def value_text(value) -> str:
    """An axis value as a label: 0.3, 1e-05, add, (0.9, 0.98)."""
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(value_text(v) for v in value) + ")"
    return str(value)


def axis_values(members: pd.DataFrame, key: str) -> list:
    """The distinct values of one axis column, sorted (numbers ascending; mixed kinds in order of appearance)."""
    values = list(dict.fromkeys(v for v in members[key] if not _missing(v)))
    try:
        return sorted(values)
    except TypeError:
        return values


def _ran(members: pd.DataFrame, outcome: str | None = None) -> pd.Series:
    """How far each member was searched for `outcome`: its last step (`step`), else its budget (`steps`),
    and for t_train / t_test at most the phases' budget; NA when none is known."""
    ran = members["step"].astype("Float64") if "step" in members else pd.Series(pd.NA, index=members.index, dtype="Float64")
    if "steps" in members:
        ran = ran.fillna(members["steps"].astype("Float64"))
    if outcome in PHASE_STEPS and "budget" in members:
        budget = members["budget"].astype("Float64")
        ran = ran.where(budget.isna() | (ran <= budget), budget)
    return ran


def _reached(members: pd.DataFrame, outcome: str) -> tuple[np.ndarray, np.ndarray]:
    """(values, censored) of one outcome over these (finished) members: a step outcome never reached is
    censored at the last step the member ran (`step`, else its budget `steps`)."""
    values = members[outcome].astype("Float64")
    censored = values.isna().to_numpy(dtype=bool).copy()
    if outcome in STEP_OUTCOMES:
        values = values.fillna(_ran(members, outcome))
        censored &= values.notna().to_numpy(dtype=bool)
    else:
        censored[:] = False  # a missing number that is not a step is no outcome at all: left out
    keep = values.notna().to_numpy(dtype=bool)
    return values.to_numpy(dtype=float, na_value=np.nan)[keep], censored[keep]


def _finished(members: pd.DataFrame) -> pd.Series:
    if "phase" in members:
        return members["phase"] != UNFINISHED
    if "status" in members:
        return members["status"] == "finished"
    return pd.Series(True, index=members.index)


def _summary(members: pd.DataFrame, outcome: str, missing: str) -> dict:
    done = members[_finished(members)]
    values, censored = _reached(done, outcome)
    if missing == "drop":
        values, censored_kept = values[~censored], censored[~censored]
    else:
        censored_kept = censored
    row: dict = {"n": int(values.size), "n_censored": int(censored.sum()), "n_unfinished": int(len(members) - len(done))}
    for stat, (value, exact) in censored_statistics(values, censored_kept).items():
        row[stat] = value if exact else math.nan
        row[f"{stat}_above"] = math.nan if exact else value
    return row


OUTCOME_COLUMNS = ["n", "n_censored", "n_unfinished", *(c for s in STATISTICS for c in (s, f"{s}_above"))]


def outcome_table(members: pd.DataFrame, axis: str, outcome: str = "grok_step", *, by: str | list[str] | None = None,
                  missing: str = "censor", sweep: str | None = None) -> pd.DataFrame:
    """An outcome's median and spread over the members at each value of `axis` (and of each `by` axis),
    seeds and every other axis pooled: Power et al.'s Figure 1 (median steps to 99% test accuracy
    against the training fraction) and Figure 2 (best test accuracy, one line per operator).

    One row per value, in the axes' sorted order: n (finished members counted), n_censored (finished
    members that never reached a step outcome), n_unfinished (left out), and median, q25, q75, min,
    max, mean, each exact or NaN with its lower bound in `<stat>_above` (see the module docstring).
    `missing="censor"` (the default) keeps members that never reached a step outcome as censored;
    `missing="drop"` leaves them out (statistics of the members that reached it, all exact)."""
    by = [by] if isinstance(by, str) else list(by or [])
    keys = [axis, *by]
    check_axes(members, *keys, sweep=sweep)
    if len(set(keys)) < len(keys):
        raise RunError(f"axis {axis!r} and by {by} repeat an axis; give each axis once")
    numeric = outcomes_of(members)
    if outcome not in numeric:
        raise RunError(f"no outcome {outcome!r}; choose one of {', '.join(numeric)}")
    if missing not in ("censor", "drop"):
        raise RunError(f"missing={missing!r}: use 'censor' (never reached: later than the member's steps) or 'drop'")
    grids = [axis_values(members, k) for k in keys]
    rows = []
    for point in itertools.product(*grids):
        mask = np.ones(len(members), dtype=bool)
        for key, value in zip(keys, point):
            mask &= np.asarray([_same(v, value) for v in members[key]], dtype=bool)
        if mask.any():
            rows.append({**dict(zip(keys, point)), **_summary(members[mask], outcome, missing)})
    return pd.DataFrame(rows, columns=[*keys, *OUTCOME_COLUMNS])


def _same(a, b) -> bool:
    return (not _missing(a)) and a == b


# --- the cells of a two-axis grid --------------------------------------------------------------------

CELL_COLUMNS = ["x", "y", "ix", "iy", "n", "members", "phase", "count", "finished", "phases", "grok_median",
                "grok_median_above", "never", "steps"]


def cells(members: pd.DataFrame, x: str, y: str, *, sweep: str | None = None) -> pd.DataFrame:
    """One row per (x, y) cell that has members: x, y (values), ix, iy (positions on the sorted axes),
    n (members), members (their names), phase (majority of the finished ones), count (members in
    that phase), finished, phases ({phase: count}), grok_median / grok_median_above (the censored-aware
    median grok step of the finished members, as `outcome_table`), never (finished members that never
    grokked), steps (the most steps any member has)."""
    check_axes(members, x, y, sweep=sweep)
    xs, ys = axis_values(members, x), axis_values(members, y)
    rows = []
    for iy, yv in enumerate(ys):
        for ix, xv in enumerate(xs):
            mask = np.asarray([_same(a, xv) and _same(b, yv) for a, b in zip(members[x], members[y])], dtype=bool)
            cell = members[mask]
            if cell.empty:
                continue
            phases = [str(p) for p in cell["phase"]]
            phase, count = majority_phase(phases)
            grok = _summary(cell, "grok_step", "censor") if "grok_step" in cell else {}
            rows.append({
                "x": xv, "y": yv, "ix": ix, "iy": iy, "n": len(cell), "members": list(cell["member"]),
                "phase": phase, "count": count, "finished": int(_finished(cell).sum()),
                "phases": {p: phases.count(p) for p in (*PHASES, UNFINISHED) if p in phases},
                "grok_median": grok.get("median", math.nan), "grok_median_above": grok.get("median_above", math.nan),
                "never": grok.get("n_censored", 0),
                "steps": int(cell["steps"].max()) if "steps" in cell and cell["steps"].notna().any() else None,
            })
    return pd.DataFrame(rows, columns=CELL_COLUMNS)


def grid(members: pd.DataFrame, x: str, y: str, outcome: str = "phase", stat: str = "median", *,
         sweep: str | None = None) -> pd.DataFrame:
    """A (y values × x values) grid of one outcome: the majority phase of each cell for "phase"
    (as `cells`), else one statistic of `outcome_table` (NaN where it is censored: see `outcome_table`
    for its bound)."""
    if outcome == "phase":
        found = cells(members, x, y, sweep=sweep)
        values = found["phase"]
    else:
        if stat not in STATISTICS:
            raise RunError(f"stat {stat!r}: use one of {', '.join(STATISTICS)}")
        found = outcome_table(members, x, outcome, by=y, sweep=sweep).rename(columns={x: "x", y: "y"})
        values = found[stat]
    table = pd.DataFrame({"x": found["x"], "y": found["y"], "value": values})
    frame = table.pivot(index="y", columns="x", values="value") if len(table) else pd.DataFrame()
    return frame.rename_axis(index=y, columns=x)
