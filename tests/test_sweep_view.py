"""Issue 8, points 4 and 5: the S5 tasks, model.init_scale (Omnigrok), the sweep figures in lab.plots
(phase diagram, grok steps, an outcome against one axis) and the Sweeps page under AppTest, against a
small real sweep (tests/sweep_runs.py) and members tables built by hand for the phase rules."""

from __future__ import annotations

import itertools
import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

import lab
import sweep_runs
from lab import plots
from lab.config import validate_experiment
from lab.errors import ConfigError
from lab.sweeps import stats
from lab.tasks import make_task
from lab.tasks.s5 import PERMUTATIONS
from test_dashboard import app, arr, errors, no_exception, same_figure, specs, trace_names  # noqa: F401  (app: a fixture)

IDENTITY = 0  # token of "01234": permutations are numbered lexicographically


# --- the S5 tasks ---------------------------------------------------------------------------------


def s5(name="s5", **config):
    return make_task({"name": name, **config})


def full_table(task) -> torch.Tensor:
    """(a, b) -> label token, from the task's own splits (train and test together)."""
    table = torch.full((120, 120), -1, dtype=torch.long)
    for split in ("train", "test"):
        data = task.split(split)
        table[data.tokens[:, 0], data.tokens[:, 1]] = data.labels
    return table


def test_s5_tokens_are_openai_grok_permutations_in_array_form():
    task = s5()
    assert task.d_vocab == 121 and task.d_vocab_out == 120 and task.n_ctx == 3 and task.causal and task.read_position == -1
    assert task.vocab[0] == "01234" and task.vocab[119] == "43210" and task.vocab[120] == "="
    assert [tuple(int(c) for c in word) for word in task.label_names] == list(itertools.permutations(range(5)))
    config = validate_experiment({"task": {"name": "s5_conj", "train_frac": 0.3}}).resolve()
    assert (config.model.d_vocab, config.model.d_vocab_out, config.model.n_ctx, config.model.causal) == (121, 120, 3, True)


def test_s5_product_applies_a_then_b():
    task = s5()
    # a = 20143 (0->2, 1->0, 2->1, 3->4, 4->3), b = 10234 (swaps 0 and 1): c[i] = b[a[i]] = 21043
    assert task.label_names[task.label(task.encode("20143 * 10234 ="))] == "21043"
    # ... and the other order, b then a: c[i] = a[b[i]] = 02143
    assert task.label_names[task.label(task.encode("10234 * 20143 ="))] == "02143"
    conj = s5("s5_conj")
    # a·b·a⁻¹ with a = 20143, b = 10234: the swap (0 1) relabelled by a is the swap (a[0] a[1]) = (2 0)
    assert conj.label_names[conj.label(conj.encode("20143 ^ 10234 ="))] == "21034"


@pytest.mark.parametrize("train_frac, n_train", [(0.3, 4320), (0.5, 7200), (0.95, 13680)])
def test_s5_split_sizes_determinism_and_disjointness(train_frac, n_train):
    a, b = s5(train_frac=train_frac), s5(train_frac=train_frac)
    assert len(a.split("train")) == n_train and len(a.split("test")) == 14_400 - n_train
    assert torch.equal(a.split("train").tokens, b.split("train").tokens)
    assert torch.equal(a.split("test").labels, b.split("test").labels)
    assert not torch.equal(a.split("train").tokens, s5(train_frac=train_frac, data_seed=1).split("train").tokens)
    train = {tuple(t) for t in a.split("train").tokens.tolist()}
    test = {tuple(t) for t in a.split("test").tokens.tolist()}
    assert not train & test and len(train | test) == 14_400
    assert all(t[2] == 120 for t in train)


def test_s5_product_labels_obey_the_group_laws():
    table = full_table(s5(train_frac=0.3))
    assert (table >= 0).all()
    n = torch.arange(120)
    assert torch.equal(table[IDENTITY], n) and torch.equal(table[:, IDENTITY], n)  # identity
    for row in (table, table.T):  # a Latin square: every a has one inverse, cancellation both sides
        assert all(sorted(r.tolist()) == list(range(120)) for r in row)
    a, b, c = torch.meshgrid(n, n, n, indexing="ij")
    assert torch.equal(table[table[a, b], c], table[a, table[b, c]])  # associative (all 1.7M triples)
    assert (table != table.T).any()  # and not commutative
    # against composition computed here: c[i] = b[a[i]]
    for a_, b_ in itertools.islice(itertools.product(range(120), repeat=2), 0, None, 97):
        pa, pb = PERMUTATIONS[a_], PERMUTATIONS[b_]
        assert PERMUTATIONS[table[a_, b_]] == tuple(pb[pa[i]] for i in range(5))


def _order(perm) -> int:
    k, p = 1, perm
    while p != tuple(range(5)):
        p, k = tuple(perm[p[i]] for i in range(5)), k + 1
    return k


def test_s5_conjugation_labels_obey_the_group_laws():
    conj, product = full_table(s5("s5_conj")), full_table(s5())
    n = torch.arange(120)
    assert torch.equal(conj[IDENTITY], n)  # e·b·e⁻¹ = b
    assert (conj[:, IDENTITY] == IDENTITY).all()  # a·e·a⁻¹ = e
    # a·(b·c·b⁻¹)·a⁻¹ = (a·b)·c·(a·b)⁻¹, where a·b as functions (b first) is product[b, a] (apply b, then a)
    a, b, c = torch.meshgrid(n, n, n, indexing="ij")
    assert torch.equal(conj[a, conj[b, c]], conj[product[b, a], c])
    # conjugation by a is a bijection that keeps the cycle type (here: the order)
    assert all(sorted(row.tolist()) == list(range(120)) for row in conj)
    orders = [_order(p) for p in PERMUTATIONS]
    assert all(orders[int(conj[x, y])] == orders[y] for x in range(0, 120, 7) for y in range(120))
    # the definition itself: c[i] = a[b[a⁻¹[i]]]
    for x, y in [(5, 77), (119, 3), (42, 42)]:
        pa, pb = PERMUTATIONS[x], PERMUTATIONS[y]
        inverse = tuple(pa.index(i) for i in range(5))
        assert PERMUTATIONS[conj[x, y]] == tuple(pa[pb[inverse[i]]] for i in range(5))


def test_s5_encode_decode_round_trip():
    for name, symbol in (("s5", "*"), ("s5_conj", "^")):
        task = s5(name)
        for tokens in task.split("train").tokens[:50].tolist():
            text = task.decode(tokens)
            assert text.split() [1] == symbol and text.endswith(" =")
            assert task.encode(text) == tokens
        assert task.encode_batch(["01234 " + symbol + " 43210 ="]).tolist() == [[0, 119, 120]]


@pytest.mark.parametrize("text, message", [
    ("20143*10234 =", "write two permutations of 01234 as 'PPPPP \\* QQQQQ ='"),
    ("20143 * 10234", "write two permutations"),
    (" 20143 * 10234 =", "write two permutations"),
    ("20143 * 10234 = ", "write two permutations"),
    ("20143  * 10234 =", "write two permutations"),
    ("20143 ^ 10234 =", "write two permutations"),  # the conjugation task's symbol
    ("2014 * 10234 =", "write two permutations"),
    ("201435 * 10234 =", "write two permutations"),
    ("2014٣ * 10234 =", "write two permutations"),  # a non-ASCII digit
    ("20113 * 10234 =", "'20113' .* is not a permutation of 01234"),
    ("20143 * 56789 =", "'56789' .* is not a permutation of 01234"),
    ("", "write two permutations"),
])
def test_s5_parser_is_strict_and_says_what_it_expects(text, message):
    with pytest.raises(ValueError, match=message) as err:
        s5().encode(text)
    assert "\n" not in str(err.value)


def test_s5_config_errors_are_one_line():
    with pytest.raises(ConfigError, match=r"task.train_frac = 1.5"):
        validate_experiment({"task": {"name": "s5", "train_frac": 1.5}})
    with pytest.raises(ConfigError, match=r"unknown key 'task.p'"):
        validate_experiment({"task": {"name": "s5", "p": 97}})


def test_s5_trains_standalone(tmp_path):
    from lab.training.trainer import Trainer

    config = validate_experiment({
        "task": {"name": "s5", "train_frac": 0.1},
        "model": {"d_model": 16, "n_heads": 2, "d_head": 8, "d_mlp": 32},
        "train": {"steps": 4, "eval_every": 2, "checkpoint_every": 4, "log_checkpoints": 0, "device": "cpu"},
    }).resolve()
    summary = Trainer(config, tmp_path / "run", progress=False).run()
    assert summary["status"] == "finished" and summary["final"]["train_acc"] >= 0
    run = lab.load_run(tmp_path / "run")
    assert run.model()(run.task.encode_batch(["01234 * 43210 ="])).shape == (1, 3, 120)


# --- model.init_scale (Omnigrok) ------------------------------------------------------------------


def test_init_scale_multiplies_every_weight_matrix_and_defaults_to_the_standard_init():
    from lab.models.transformer import Transformer

    base = validate_experiment({"task": {"name": "modular", "p": 11}, "model": {"d_model": 16, "d_head": 8, "n_heads": 2,
                                                                                 "d_mlp": 32}}).resolve()
    standard = Transformer(base.model)
    # the standard init, written out: every W_ ~ N(0, (0.8 / sqrt(d_model))^2) from one generator, in order
    generator = torch.Generator().manual_seed(0)
    for name, param in standard.named_parameters():
        if name.rsplit(".", 1)[-1].startswith("W_"):
            assert torch.equal(param, torch.randn(param.shape, generator=generator) * (0.8 / math.sqrt(16))), name
    scaled = Transformer(base.model.model_copy(update={"init_scale": 3.0}))
    for (name, a), (_, b) in zip(standard.named_parameters(), scaled.named_parameters()):
        assert torch.allclose(b, a * 3.0 if name.rsplit(".", 1)[-1].startswith("W_") else a, rtol=1e-6, atol=0), name
    with pytest.raises(ConfigError, match="init_scale is applied by the transformer only"):
        validate_experiment({"task": {"name": "modular", "p": 11}, "model": {"arch": "mlp", "init_scale": 2.0}})
    with pytest.raises(ConfigError, match="model.init_scale = 0"):
        validate_experiment({"task": {"name": "modular", "p": 11}, "model": {"init_scale": 0}})


# --- the sweep figures, from members tables built by hand --------------------------------------------


def members_table(rows: list[tuple]) -> pd.DataFrame:
    """(lr, wd, seed, phase, grok_step) rows -> a members table as lab.Sweep.members has it."""
    frame = pd.DataFrame(rows, columns=["train.lr", "train.weight_decay", "seed", "phase", "grok_step"])
    frame["member"] = [f"lr{r[0]}-wd{r[1]}-s{r[2]}" for r in rows]
    frame["run"] = frame["member"]
    frame["status"] = ["running" if p == "unfinished" else "finished" for p in frame["phase"]]
    frame["steps"] = 10_000
    frame["t_train"] = pd.array([100] * len(rows), dtype="Int64")
    frame["t_test"] = pd.array([None] * len(rows), dtype="Int64")
    frame["grok_step"] = frame["grok_step"].astype("Int64")
    frame["best_test_acc"] = [0.5 + 0.1 * r[2] for r in rows]
    return frame


HAND = members_table([
    (1e-3, 0.1, 0, "memorization", None), (1e-3, 0.1, 1, "memorization", None), (1e-3, 0.1, 2, "grokking", 9000),
    (1e-3, 1.0, 0, "grokking", 2000), (1e-3, 1.0, 1, "grokking", 4000), (1e-3, 1.0, 2, "unfinished", None),
    (1e-2, 0.1, 0, "confusion", None), (1e-2, 0.1, 1, "comprehension", 300), (1e-2, 0.1, 2, "grokking", 500),
    (1e-2, 1.0, 0, "unfinished", None), (1e-2, 1.0, 1, "unfinished", None), (1e-2, 1.0, 2, "unfinished", None),
])


def test_cells_take_the_majority_phase_of_finished_members_with_the_count():
    cells = plots.sweep_cells(HAND, "train.weight_decay", "train.lr").set_index(["x", "y"])
    assert (cells.loc[(0.1, 1e-3), "phase"], cells.loc[(0.1, 1e-3), "count"]) == ("memorization", 2)
    assert cells.loc[(1.0, 1e-3), ["phase", "count", "finished", "n"]].tolist() == ["grokking", 2, 2, 3]
    # a 1-1-1 tie goes to the phase listed first in PHASE_COLORS (comprehension, then grokking, ...)
    assert cells.loc[(0.1, 1e-2), ["phase", "count"]].tolist() == ["comprehension", 1]
    assert cells.loc[(0.1, 1e-2), "phases"] == {"comprehension": 1, "grokking": 1, "confusion": 1}
    assert cells.loc[(1.0, 1e-2), ["phase", "finished"]].tolist() == ["unfinished", 0]
    # the median grok step: a member that never grokked is later than its 10k steps, never a number;
    # two of three never grokked, so the median is censored: no value, and "> 10000" as its bound
    assert np.isnan(cells.loc[(0.1, 1e-3), "grok_median"]) and cells.loc[(0.1, 1e-3), "grok_median_above"] == 10_000
    assert cells.loc[(0.1, 1e-3), "never"] == 2
    assert cells.loc[(1.0, 1e-3), "grok_median"] == 3000 and cells.loc[(1.0, 1e-3), "never"] == 0
    assert np.isnan(cells.loc[(1.0, 1e-3), "grok_median_above"])
    # the hover names each member's phase with the rule that gave it, and its grok step or its bound
    hover = cells.loc[(0.1, 1e-3), "hover"]
    assert "lr0.001-wd0.1-s0: memorization (> 90%: train at 100, test never → memorization); grok step > 10000" in hover
    assert "lr0.001-wd0.1-s2: grokking" in hover and "grokked at 9000" in hover


def test_phase_diagram_colours_cells_by_phase_and_labels_them():
    fig = plots.phase_diagram_figure(HAND, "train.weight_decay", "train.lr", thresholds="THRESHOLDS")
    heat = fig.data[0]
    codes = {p: i for i, p in enumerate(plots.PHASE_COLORS)}
    z = np.asarray(heat.z)
    assert z.shape == (2, 2)  # rows: lr, columns: wd
    assert z[0, 0] == codes["memorization"] and z[0, 1] == codes["grokking"]
    assert z[1, 0] == codes["comprehension"] and z[1, 1] == codes["unfinished"]
    assert heat.text[0][0] == "memo 2/3" and heat.text[1][0] == "compr. 1/3" and heat.text[0][1] == "grok 2/2<br>+1 running" and heat.text[1][1] == "running 3/3"
    # the colour scale maps each code onto its phase's colour
    # the stepped colour scale: code i (at (i + 0.5) / n between zmin -0.5 and zmax n - 0.5) is its phase's colour
    assert (heat.zmin, heat.zmax) == (-0.5, len(codes) - 0.5)
    assert [color for _, color in heat.colorscale][::2] == list(plots.PHASE_COLORS.values())
    assert [v for v, _ in heat.colorscale][::2] == [i / len(codes) for i in range(len(codes))]
    assert fig.layout.title.subtitle.text == "THRESHOLDS"
    assert list(fig.layout.xaxis.ticktext) == ["0.1", "1"] and list(fig.layout.yaxis.ticktext) == ["0.001", "0.01"]
    legend = [t.name for t in fig.data if t.showlegend is not False and t.type == "scatter" and t.name != "cells"]
    assert legend == ["comprehension", "grokking", "memorization", "unfinished"]
    picker = fig.data[-1]
    assert picker.name == "cells" and len(picker.x) == 4 and fig.layout.hoverdistance == -1


def test_grok_steps_heatmap_is_log_scaled_and_marks_never_grokked_cells():
    fig = plots.grok_steps_figure(HAND, "train.weight_decay", "train.lr")
    never, steps = fig.data[0], fig.data[1]
    z = np.asarray(steps.z, dtype=float)
    assert z[0, 1] == pytest.approx(math.log10(3000)) and z[1, 0] == pytest.approx(math.log10(500))
    assert np.isnan(z[0, 0]) and np.asarray(never.z, dtype=float)[0, 0] == 0  # median member never grokked: grey
    labels = dict(zip(zip(fig.data[3].x, fig.data[3].y), fig.data[3].text))
    assert labels[(0, 0)] == "> 10k" and labels[(1, 0)] == "3000" and labels[(1, 1)] == "running"
    assert labels[(0, 1)] == "500 (1 ✗)"  # one of its three finished members (the confused one) never grokked
    assert "10k" not in steps.colorbar.ticktext and steps.colorbar.ticktext[0] == "500"


def test_outcome_table_and_figure_median_and_spread_over_seeds():
    table = plots.sweep_outcome_table(HAND, "train.weight_decay", "grok_step", by="train.lr")
    rows = table.set_index(["train.weight_decay", "train.lr"])
    # wd 0.1, lr 1e-3: 9000 and two members that never grokked within 10k steps: the median and the
    # max are censored (no number, their bound in *_above), the min is 9000
    row = rows.loc[(0.1, 1e-3)]
    assert (row["n"], row["n_censored"], row["n_unfinished"], row["min"]) == (3, 2, 0, 9000)
    assert np.isnan(row["median"]) and row["median_above"] == 10_000 and np.isnan(row["max"]) and row["max_above"] == 10_000
    # wd 0.1, lr 1e-2: 300, 500 and one that never grokked: the median 500 is exact (it cannot move)
    row = rows.loc[(0.1, 1e-2)]
    assert (row["median"], row["min"], row["q25"], row["n_censored"]) == (500, 300, 400, 1) and np.isnan(row["median_above"])
    # wd 1.0, lr 1e-3: 2000 and 4000 (the third is still training: left out, counted)
    row = rows.loc[(1.0, 1e-3)]
    assert (row["median"], row["mean"], row["n"], row["n_unfinished"]) == (3000, 3000, 2, 1)
    assert rows.loc[(1.0, 1e-2), ["n", "n_unfinished"]].tolist() == [0, 3] and np.isnan(rows.loc[(1.0, 1e-2), "median"])
    dropped = plots.sweep_outcome_table(HAND, "train.weight_decay", "grok_step", missing="drop")
    assert dropped.set_index("train.weight_decay").loc[0.1, "median"] == pytest.approx(np.median([9000, 300, 500]))

    fig = plots.sweep_outcome_figure(table, "train.weight_decay", "grok_step", by="train.lr", spread="minmax")
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert [t.name for t in lines] == ["train.lr = 0.001", "train.lr = 0.01"]
    # the censored median is drawn at its bound as an open triangle, and reads "> 10k", never "10000"
    assert list(lines[0].y) == [10_000, 3000] and list(lines[0].marker.symbol) == ["triangle-up-open", "circle"]
    assert "median > 10k" in lines[0].hovertext[0] and "2 never reached it" in lines[0].hovertext[0]
    assert "median 3000" in lines[0].hovertext[1] and "1 still training (left out)" in lines[0].hovertext[1]
    assert list(lines[0].marker.color) == ["#1f77b4", "#1f77b4"]  # the open ▲ outlined in the line's colour
    assert list(lines[1].marker.color) == ["white", "#d62728"]  # hollow: the median is exact, one never reached it
    assert list(fig.layout.xaxis.ticktext) == ["0.1", "1"]  # the swept values
    assert "median later than this (censored)" in [t.name for t in fig.data]
    band = fig.data[0]
    assert band.fill == "toself" and list(band.y) == [10_000, 4000, 2000, 9000]  # max forwards, min back
    assert fig.layout.yaxis.type == "log" and list(fig.layout.yaxis.ticktext) == ["200", "500", "1000", "2000", "5000", "10k"]
    acc = plots.sweep_outcome_figure(plots.sweep_outcome_table(HAND, "train.lr", "best_test_acc"), "train.lr",
                                     "best_test_acc")
    assert acc.layout.yaxis.type == "linear" and list(acc.layout.xaxis.ticktext) == ["0.001", "0.01"]


def test_censored_statistics_are_exact_or_a_lower_bound():
    from lab.sweeps.stats import censored_statistics

    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 9))
        budget = np.where(rng.random(n) < 0.5, 600.0, 1000.0)
        truth = rng.uniform(10, 2000, n)  # when each member would have reached it, given enough steps
        censored = truth > budget
        seen = np.where(censored, budget, truth)
        stats_ = censored_statistics(seen, censored)
        for stat, value in (("min", truth.min()), ("q25", np.quantile(truth, 0.25)), ("median", np.median(truth)),
                            ("q75", np.quantile(truth, 0.75)), ("max", truth.max()), ("mean", truth.mean())):
            got, exact = stats_[stat]
            if exact:  # exact: the statistic of the true values, whatever the censored members would have done
                assert got == pytest.approx(value), (stat, truth, budget)
            else:  # else a lower bound of it
                assert got <= value + 1e-9, (stat, truth, budget)
        if not censored.any():
            assert all(exact for _, exact in stats_.values())
    # the case: no member grokked within 600 steps: every statistic is "> 600", none is 600
    assert censored_statistics([600, 600], [True, True]) == {s: (600.0, False) for s in
                                                             ("median", "q25", "q75", "min", "max", "mean")}
    # one of two: the median is above (300 + 600) / 2, not 450
    assert censored_statistics([300, 600], [False, True])["median"] == (450.0, False)
    assert censored_statistics([300, 600], [False, True])["min"] == (300.0, True)


def hand_sweep(members: pd.DataFrame):
    """A lab.Sweep whose members table is `members` (its statistics are computed from that table alone)."""
    from lab.sweeps.sweep import Sweep

    sweep = Sweep.__new__(Sweep)
    sweep.name, sweep.axes, sweep.__dict__["members"] = "hand", {"train.lr": [], "train.weight_decay": []}, members
    return sweep


def test_sweep_outcome_by_table_and_the_pages_figures_give_the_same_numbers():
    """The issue's case: on this table the median grok step at weight decay 1.0 was 10,000 from
    outcome_by (unfinished members counted at the budget) and 3,000 from the page's table."""
    sweep = hand_sweep(HAND)
    by_wd = sweep.outcome_by("train.weight_decay", "grok_step").set_index("train.weight_decay")
    assert by_wd.loc[1.0, "median"] == 3000 and by_wd.loc[1.0, "n_unfinished"] == 4
    figure_table = plots.sweep_outcome_table(HAND, "train.weight_decay", "grok_step")
    pd.testing.assert_frame_equal(sweep.outcome_by("train.weight_decay", "grok_step"), figure_table)
    line = next(t for t in plots.sweep_outcome_figure(figure_table, "train.weight_decay", "grok_step").data
                if t.mode == "lines+markers")
    assert list(line.y) == [by_wd.loc[0.1, "median_above"], 3000]
    # the grid of Sweep.table is the heatmaps' cells: majority phase, and the censored-aware median grok step
    cells = plots.sweep_cells(HAND, "train.weight_decay", "train.lr")
    phases = sweep.table("train.weight_decay", "train.lr", "phase")
    assert all(phases.loc[c.y, c.x] == c.phase for c in cells.itertuples())
    groks = sweep.table("train.weight_decay", "train.lr", "grok_step")
    assert groks.loc[1e-3, 1.0] == 3000 and groks.loc[1e-2, 0.1] == 500
    assert np.isnan(groks.loc[1e-3, 0.1])  # censored: no number (outcome_by gives its bound)
    heat = plots.grok_steps_figure(HAND, "train.weight_decay", "train.lr")
    assert np.allclose(10 ** np.asarray(heat.data[1].z, dtype=float), groks.to_numpy(dtype=float), equal_nan=True)


def test_censored_steps_read_as_censored_in_member_tables():
    from lab.sweeps.stats import members_text

    frame = HAND.assign(step=[10_000] * 12)
    shown = members_text(frame).set_index("member")
    assert shown.loc["lr0.001-wd0.1-s0", "grok_step"] == "> 10000"  # finished, never grokked
    assert shown.loc["lr0.001-wd0.1-s2", "grok_step"] == "9000"
    assert shown.loc["lr0.001-wd1.0-s2", "grok_step"] == "not yet"  # still training
    assert shown.loc["lr0.001-wd0.1-s0", "t_test"] == "> 10000"
    assert not shown[["grok_step", "t_train", "t_test"]].isin([None, "None", "nan"]).any().any()
    # phases looked for within a budget: t_test is censored at the budget, the grok step at the run's end
    within = members_text(frame.assign(budget=4000)).set_index("member")
    assert within.loc["lr0.001-wd0.1-s0", ["t_test", "grok_step"]].tolist() == ["> 4000", "> 10000"]


def test_phase_reason_states_the_rule():
    from lab.sweeps.stats import phase_reason

    assert phase_reason(100, 350) == "> 90%: train at 100, test at 350: 250 steps later (< 1000) → comprehension"
    assert phase_reason(100, 1100).endswith("1000 steps later (≥ 1000) → grokking")
    assert phase_reason(100, None) == "> 90%: train at 100, test never → memorization"
    assert phase_reason(None, None, train_acc=0.5) == "train > 50% never → confusion"
    assert phase_reason(100, 200, train_acc=0.5, test_acc=0.8, gap=50).endswith("test > 80% at 200: 100 steps later (≥ 50) → grokking")
    assert phase_reason(100, None, phase="unfinished") == "still training: no phase yet"


def test_figure_builders_refuse_bad_axes_in_one_line():
    with pytest.raises(ValueError, match=r"no axis 'train.betas'; its axes: train.lr, train.weight_decay, seed"):
        plots.phase_diagram_figure(HAND, "train.betas", "train.lr")
    with pytest.raises(ValueError, match="x and y are both 'train.lr'"):
        plots.grok_steps_figure(HAND, "train.lr", "train.lr")
    with pytest.raises(ValueError, match="no outcome 'speed'"):
        plots.sweep_outcome_table(HAND, "train.lr", "speed")
    with pytest.raises(ValueError, match="spread must be one of 'iqr', 'minmax'"):
        plots.sweep_outcome_figure(plots.sweep_outcome_table(HAND, "train.lr", "grok_step"), "train.lr", "grok_step",
                                   spread="std")


# --- on a real sweep ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return sweep_runs.shared_sweep(tmp_path_factory)


def test_init_scale_members_train_together_from_scaled_weights(sweep):
    s = lab.load_sweep(sweep)
    first = {m: s.metrics(m)[0] for m in s.member_names}
    for seed in (0, 1):
        for wd in ("0.1", "1.0"):
            one = first[f"init_scale1.0-weight_decay{wd}-seed{seed}"]["weight_norm"]
            two = first[f"init_scale2.0-weight_decay{wd}-seed{seed}"]["weight_norm"]
            assert two == pytest.approx(2 * one, rel=1e-5)  # biases start at 0: the norm scales with alpha
    assert json.loads((sweep / "init_scale2.0-weight_decay0.1-seed0" / "config.json").read_text())["model"]["init_scale"] == 2.0


def test_repl_figures_match_the_sweep_and_its_thresholds(sweep):
    s = lab.load_sweep(sweep)
    fig = lab.plot_phase_diagram(s, "model.init_scale", "train.weight_decay")
    cells = plots.sweep_cells(s.members, "model.init_scale", "train.weight_decay")
    codes = {p: i for i, p in enumerate(plots.PHASE_COLORS)}
    z = np.asarray(fig.data[0].z)
    assert all(z[c.iy, c.ix] == codes[c.phase] for c in cells.itertuples())
    assert "train acc > 90%, test acc > 90% within the run" in fig.layout.title.subtitle.text
    # other thresholds: the phases of Sweep.phases at those thresholds
    loose = plots.sweep_members(s, train_acc=0.05, test_acc=0.05, gap=10, budget=40)
    expected = s.phases(train_acc=0.05, test_acc=0.05, gap=10, budget=40).set_index("member")["phase"]
    assert list(loose["phase"]) == list(expected[loose["member"]])
    assert list(loose["phase"]) != list(s.members["phase"])
    # the numbers: lab.Sweep.outcome_by is the very table the figures draw, and its statistics are the
    # finished members' own (the unfinished one left out and counted)
    finished = lab.load_sweep(sweep)
    for outcome in ("memorize_step", "grok_step", "best_test_acc"):
        pd.testing.assert_frame_equal(s.outcome_by("train.weight_decay", outcome),
                                      plots.sweep_outcome_table(plots.sweep_members(s), "train.weight_decay", outcome))
    members = s.members
    done = members[members["phase"] != "unfinished"]
    for wd, row in s.outcome_by("train.weight_decay", "best_test_acc").set_index("train.weight_decay").iterrows():
        values = done[done["train.weight_decay"] == wd]["best_test_acc"]
        assert (row["median"], row["q25"], row["max"]) == pytest.approx((values.median(), values.quantile(0.25), values.max()))
        assert row["n"] == len(values) and row["n_unfinished"] == (members["train.weight_decay"] == wd).sum() - len(values)
    assert s.outcome_by("train.weight_decay", "best_test_acc")["n_unfinished"].tolist() == [0, 1]
    assert lab.plot_sweep_outcome(sweep, "train.weight_decay", "best_test_acc").data
    assert lab.plot_grok_steps(str(sweep), where={"seed": 0}).data[0].z is not None
    with pytest.raises(ValueError, match="sweep 'grid' has no axis 'task.p'; its axes: model.init_scale, train.weight_decay, seed"):
        lab.plot_phase_diagram(finished, "task.p", "seed")


def test_the_cli_lists_phases_with_their_rule_and_censored_steps_as_censored(sweep):
    import subprocess
    import sys

    def lab_cli(*args):
        done = subprocess.run([sys.executable, "-m", "lab.cli", *args, "--runs-dir", str(sweep.parent)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout

    listing = lab_cli("sweeps")
    assert "phases (Liu et al. 2022, Table 1): train acc > 90%, test acc > 90% within the run; comprehension: " \
           "test crosses < 1000 steps after train" in listing
    members = lab.load_sweep(sweep).members.set_index("member")
    header, *rows = lab_cli("runs").strip().splitlines()
    columns, checked = header.split(), 0
    for row in rows:
        cells = dict(zip(columns, row.split()))
        member = cells["name"].removeprefix(f"{sweep.name}/")
        if member not in members.index:
            continue
        grok, ran = members.loc[member, "grok_step"], members.loc[member, "step"]
        assert cells["grok_step"] == (str(grok) if not pd.isna(grok) else f">{ran}")
        checked += 1
    assert checked == len(members) and members["grok_step"].isna().any()  # some never grokked: "> 80", not "-"


def sweeps_page(at):
    return at.switch_page("views/sweeps.py").run()


def chart(at, title_part: str) -> dict:
    found = [s for s in specs(at) if title_part in s["layout"]["title"]["text"]]
    assert len(found) == 1, [s["layout"]["title"]["text"] for s in specs(at)]
    return found[0]


def test_sweeps_page_draws_the_repl_figures_and_follows_its_widgets(sweep, app):
    at = sweeps_page(app(sweep.parent).run())
    no_exception(at)
    assert not errors(at)
    assert at.selectbox(key="sweeps_name").value == "grid"
    same_figure(chart(at, "phases over"), lab.plot_phase_diagram(sweep, "model.init_scale", "train.weight_decay"))
    same_figure(chart(at, "median grok step"), lab.plot_grok_steps(sweep, "model.init_scale", "train.weight_decay"))
    outcome = chart(at, "against")
    assert outcome["layout"]["yaxis"]["type"] == "log"  # grok step by default

    # other axes: seed on y, the weight decay fixed to one value
    at.selectbox(key="sweeps_y:grid").set_value("seed").run()
    at.selectbox(key="sweeps_fix:grid:train.weight_decay").set_value("1").run()
    no_exception(at)
    same_figure(chart(at, "phases over"), lab.plot_phase_diagram(sweep, "model.init_scale", "seed",
                                                                 where={"train.weight_decay": 1.0}))

    # thresholds change the phases (and are written above the diagram)
    before = arr(chart(at, "phases over")["data"][0]["z"])
    at.number_input(key="sweeps_train_acc").set_value(5.0).run()
    at.number_input(key="sweeps_test_acc").set_value(5.0).run()
    at.number_input(key="sweeps_gap").set_value(10).run()
    at.number_input(key="sweeps_budget").set_value(40).run()
    no_exception(at)
    spec = chart(at, "phases over")
    assert "train acc > 5%, test acc > 5% within 40 steps" in spec["layout"]["title"]["subtitle"]["text"]
    expected = lab.plot_phase_diagram(sweep, "model.init_scale", "seed", train_acc=0.05, test_acc=0.05, gap=10,
                                      budget=40, where={"train.weight_decay": 1.0})
    assert np.array_equal(arr(spec["data"][0]["z"]), np.asarray(expected.data[0].z), equal_nan=True)
    assert not np.array_equal(arr(spec["data"][0]["z"]), before, equal_nan=True)

    # the outcome plot: another outcome, one line per weight decay, min-max band
    at.selectbox(key="sweeps_fix:grid:train.weight_decay").set_value("(all)").run()
    at.selectbox(key="sweeps_axis:grid").set_value("model.init_scale").run()
    at.selectbox(key="sweeps_outcome").set_value("best_test_acc").run()
    at.selectbox(key="sweeps_by:grid").set_value("train.weight_decay").run()
    at.radio(key="sweeps_spread").set_value("minmax").run()
    no_exception(at)
    spec = chart(at, "against")
    assert spec["layout"]["yaxis"]["type"] == "linear"
    assert [n for n in trace_names(spec) if "(" not in n] == ["train.weight_decay = 0.1", "train.weight_decay = 1"]
    table = lab.load_sweep(sweep).outcome_by("model.init_scale", "best_test_acc", by="train.weight_decay")
    lines = [t for t in spec["data"] if t.get("mode") == "lines+markers"]
    assert np.allclose(arr(lines[0]["y"]), table[table["train.weight_decay"] == 0.1]["median"])
    assert np.allclose(arr(lines[1]["y"]), table[table["train.weight_decay"] == 1.0]["median"])

    # the grok step (the default outcome): the page's line is outcome_by's median, or its bound where censored
    at.selectbox(key="sweeps_outcome").set_value("grok_step").run()
    spec = chart(at, "against")
    table = lab.load_sweep(sweep).outcome_by("model.init_scale", "grok_step", by="train.weight_decay")
    for line, wd in zip([t for t in spec["data"] if t.get("mode") == "lines+markers"], (0.1, 1.0)):
        rows = table[table["train.weight_decay"] == wd].to_dict("records")
        assert np.allclose(arr(line["y"]), [stats.stat_value(r)[0] for r in rows], equal_nan=True)
        for text, r in zip(line["hovertext"], rows):
            assert f"median {stats.stat_text(r, 'median', plots.step_label)}<" in text
            assert ("median > " in text) == (not stats.stat_value(r)[1])


def test_sweeps_page_opens_a_cells_members_and_selects_them(sweep, app):
    at = sweeps_page(app(sweep.parent).run())
    cells = at.selectbox(key="sweeps_cell")
    phase = lab.load_sweep(sweep).members.set_index("member").loc["init_scale2.0-weight_decay1.0-seed0", "phase"]
    assert f"model.init_scale = 2, train.weight_decay = 1: {phase} 1/1" in cells.options  # shown with its phase
    cells.set_value("model.init_scale = 2, train.weight_decay = 1").run()
    no_exception(at)
    at.number_input(key="sweeps_train_acc").set_value(5.0).run()  # the phases change; the picked cell stays
    assert at.selectbox(key="sweeps_cell").value == "model.init_scale = 2, train.weight_decay = 1"
    table = at.dataframe[0].value
    assert set(table["member"]) == {"init_scale2.0-weight_decay1.0-seed0", sweep_runs.UNFINISHED}
    # no None and no censored step as a number: a step, "> N" (never within the N steps run) or "not yet"
    assert not table.isna().any().any() and not table.isin(["None", "nan"]).any().any()
    member = lab.load_sweep(sweep).members.set_index("member").loc["init_scale2.0-weight_decay1.0-seed0"]
    shown = table.set_index("member")
    for column in ("memorize_step", "grok_step"):
        value = member[column]
        assert shown.loc["init_scale2.0-weight_decay1.0-seed0", column] == (str(value) if not pd.isna(value) else "> 80")
        assert shown.loc[sweep_runs.UNFINISHED, column] in ("not yet",) or shown.loc[sweep_runs.UNFINISHED, column].isdigit()
    assert "→ " in shown.loc["init_scale2.0-weight_decay1.0-seed0", "why"]  # the rule that gave the phase
    assert shown.loc[sweep_runs.UNFINISHED, "why"] == "still training: no phase yet"
    for title in ("phases over", "median grok step"):  # both heatmaps outline the picked cell
        (shape,) = chart(at, title)["layout"]["shapes"]
        assert (shape["x0"], shape["x1"], shape["y0"], shape["y1"]) == (0.5, 1.5, 0.5, 1.5)
    assert dict(zip(table["member"], table["phase"]))[sweep_runs.UNFINISHED] == "unfinished"
    names = set(trace_names(chart(at, "Accuracy")))
    assert {"init_scale2.0-weight_decay1.0-seed0 test", f"{sweep_runs.UNFINISHED} train"} <= names
    at.button(key="sweeps_select_members").click().run()
    assert set(at.sidebar.multiselect(key="selected_runs").value) == {f"grid/{m}" for m in table["member"]}


def test_sweeps_page_without_sweeps_and_with_a_damaged_one(sweep, app, tmp_path, monkeypatch):
    at = sweeps_page(app(tmp_path / "empty").run())
    no_exception(at)
    (message,) = [i.value for i in at.info if "lab sweep modadd_quick" in i.value]
    command = message.split("```")[1].strip()
    assert f"--runs-dir {tmp_path / 'empty'}" in command  # not ./runs: the command says where
    # one argument a line: nothing cut off in the box
    assert all(len(line) <= 60 for line in command.splitlines() if "--runs-dir" not in line)
    assert not at.get("plotly_chart")
    monkeypatch.chdir(tmp_path)  # the default folder, ./runs: no --runs-dir to type
    at = sweeps_page(app("runs").run())
    (message,) = [i.value for i in at.info if "lab sweep modadd_quick" in i.value]
    assert "--runs-dir" not in message and "--seeds 2" in message

    broken = tmp_path / "runs"
    shutil.copytree(sweep, broken / "grid")
    shutil.copytree(sweep, broken / "zdamaged")
    (broken / "zdamaged" / "sweep.json").write_text("{ not json")
    at = sweeps_page(app(broken).run())
    no_exception(at)
    at.selectbox(key="sweeps_name").set_value("zdamaged").run()
    no_exception(at)
    assert any("zdamaged" in e for e in errors(at))
    at.selectbox(key="sweeps_name").set_value("grid").run()
    no_exception(at)
    assert len(at.get("plotly_chart")) >= 3


# --- the reproductions shipped as experiments ---------------------------------------------------------


@pytest.mark.parametrize("experiment, axes, members", [
    ("power_2022_fractions", {"task.train_frac"}, 10),
    ("power_2022_fractions_paper", {"task.train_frac"}, 27),
    ("power_2022_operators", {"task.operator", "task.train_frac"}, 56),
    ("power_2022_operators_paper", {"task.operator", "task.train_frac"}, 189),
    ("liu_2022_phase", {"train.weight_decay", "train.lr"}, 20),
    ("liu_2022_phase_paper", {"train.weight_decay", "train.lr"}, 36),
    ("liu_2022_omnigrok", {"model.init_scale", "train.weight_decay"}, 12),
    ("liu_2022_omnigrok_paper", {"model.init_scale", "train.weight_decay"}, 54),
])
def test_reproductions_are_valid_sweeps_and_say_how_they_differ_from_the_paper(experiment, axes, members):
    from lab.config import experiment_path, load_experiment
    from lab.sweeps.sweep import SweepSpec

    spec = SweepSpec.build(experiment)
    assert set(spec.axes) == axes and len(spec.members()) == members
    text = experiment_path(experiment).read_text()
    config = load_experiment(experiment)
    if experiment.endswith("_paper"):
        assert config.train.steps == 100_000  # the papers' budget (Power: 10^5 updates; Liu: 10^5 steps)
        assert "scaled version" in text.lower() and experiment_path(experiment.removesuffix("_paper"))
    else:
        assert "SCALED" in text and f"{experiment}_paper.toml" in text and "differs" in text
        assert config.train.steps <= 8000
    if experiment.startswith("power_2022_fractions"):
        assert config.task.name == "s5" and config.train.batch_size == 512 and config.train.weight_decay == 1.0
