"""The dashboard under Streamlit's AppTest, against real small runs: every page renders without an
exception, draws the charts it should (read from the plotly spec in each element's proto), and its
widgets change what is drawn; damaged, half-written and removed runs give a line, not a traceback.
Also: the figure builders in lab.plots (and that a page's figure is the one `lab.plot_*` returns),
the background prefetcher, and `lab dashboard` as a user starts it (empty home, no standard input)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import dashboard_runs
import lab
from lab import plots as figures

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "dashboard" / "app.py")
TIMEOUT = 120  # AppTest's default 3 s is far too short for torch on a shared CPU


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    return dashboard_runs.shared_runs(tmp_path_factory)


@pytest.fixture
def app(monkeypatch):
    """A factory of AppTests on a given runs folder, with Streamlit's caches cleared."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    def make(folder) -> AppTest:
        monkeypatch.setenv("LAB_RUNS_DIR", str(folder))
        st.cache_data.clear()
        st.cache_resource.clear()
        return AppTest.from_file(APP, default_timeout=TIMEOUT)

    yield make
    from dashboard import background

    background.stop_all()  # a page's background thread must not write into runs a later test copies
    st.cache_data.clear()
    st.cache_resource.clear()


def specs(at) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


def arr(value) -> np.ndarray:
    """A plotly spec array: a list, or (plotly 6+) a base64 typed array {"dtype", "bdata", "shape"}."""
    if isinstance(value, dict) and "bdata" in value:
        import base64

        out = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        if "shape" in value:
            shape = value["shape"]
            out = out.reshape([int(n) for n in (shape.split(",") if isinstance(shape, str) else shape)])
        return out
    return np.asarray(value)


def trace_names(spec: dict) -> list[str]:
    return [trace.get("name") for trace in spec["data"]]


def no_exception(at) -> None:
    assert not at.exception, [e.value for e in at.exception]


def errors(at) -> list[str]:
    return [e.value for e in at.error]


def select_runs(at, names: list[str]):
    at.sidebar.multiselect(key="selected_runs").set_value(names)
    return at


def goto(at, page: str):
    return at.switch_page(f"views/{page}.py").run()


# --- figure builders ------------------------------------------------------------------------------


def test_ema_smooth_is_debiased_tensorboard_ema():
    values = [4.0, 2.0, 8.0, 1.0]
    w = 0.6
    smoothed = figures.ema_smooth(values, w)
    last, expected = 0.0, []
    for n, v in enumerate(values, start=1):
        last = last * w + (1 - w) * v
        expected.append(last / (1 - w**n))
    assert np.allclose(smoothed, expected)
    assert smoothed[0] == values[0]  # debiasing: the first point is not pulled towards 0
    assert np.allclose(figures.ema_smooth([3.0] * 5, 0.9), 3.0)
    assert np.array_equal(figures.ema_smooth(values, 0.0), values)
    with pytest.raises(ValueError):
        figures.ema_smooth(values, 1.0)


def test_run_colours_follow_the_name_and_stay_distinct():
    a = figures.run_colors(["x", "y", "z"])
    b = figures.run_colors(["z", "x", "y", "w"])
    assert a == figures.run_colors(["y", "x", "z"])  # the order the runs were picked in does not matter
    assert len(set(a.values())) == 3 and len(set(b.values())) == 4
    collide = next(n for n in (f"run{i}" for i in range(100)) if figures.run_color(n) == figures.run_color("x"))
    both = figures.run_colors(["x", collide])
    assert both["x"] != both[collide]  # same hashed colour: the second gets the next free one


def test_attention_grid_keeps_repeated_tokens_and_fixes_the_scale():
    import torch

    pattern = torch.softmax(torch.randn(2, 3, 4, 4), dim=-1)
    fig = figures.attention_grid_figure(pattern, ["<cls>", "a", "a", "b"])
    heatmaps = [t for t in fig.data if t.type == "heatmap"]
    assert len(heatmaps) == 6
    assert all(t.zmin == 0 and t.zmax == 1 for t in heatmaps)
    assert list(fig.layout.xaxis.ticktext) == ["<cls>", "a", "a", "b"]  # numeric axis: both "a" kept (wide columns)
    assert list(fig.layout.yaxis.ticktext) == ["<cls>", "a", "a", "b"]
    assert np.allclose(np.array(heatmaps[4].z), pattern[1, 1].numpy())
    assert fig.layout.yaxis.scaleanchor == "x" and fig.layout.yaxis6.scaleanchor == "x6"  # square cells


def test_attention_labels_never_overlap_and_every_query_row_is_labelled():
    from types import SimpleNamespace

    import torch
    from lab.plots.attention import CHAR_PX, PLOT_WIDTH_PX

    for tokens, angle, every in ((["<cls>", *"cab"], 0, 1), (["<cls>", *"grab a cab"], -45, 1),
                                 (["<cls>", *"grab a cab and a cab"], -90, 1), (["<cls>", *("x" * 40)], -90, 2)):
        fig = figures.attention_grid_figure(torch.rand(2, 2, len(tokens), len(tokens)), tokens)
        axis = fig.layout.xaxis
        assert axis.tickangle == angle and list(axis.ticktext) == tokens[::every]
        column_px = PLOT_WIDTH_PX / 2 / len(tokens)
        if angle == 0:  # level: each label fits its column
            assert all(len(t) * CHAR_PX <= column_px for t in tokens)
        else:  # slanted or upright: neighbouring 12 px lines of labels lie far enough apart not to touch
            assert every * column_px * abs(np.sin(np.radians(angle))) >= 12
    # the read-position strip's narrow columns: a wide label drops below its neighbours instead
    strip = figures.read_attention_figure(SimpleNamespace(pattern=torch.rand(1, 1, 60, 60), tokens=["<cls>", *"x" * 59],
                                                          step=1), 0, "r")
    assert list(strip.layout.xaxis.ticktext) == ["<br><cls>", *"x" * 59]
    assert all(len(t) * CHAR_PX <= PLOT_WIDTH_PX / 60 for t in strip.layout.xaxis.ticktext[1:])
    # a long input: every query row carries its label, each row tall enough for it
    n = 120
    tokens = ["<cls>", *("x" * (n - 1))]
    fig = figures.attention_grid_figure(torch.rand(1, 2, n, n), tokens)
    assert list(fig.layout.yaxis.ticktext) == tokens and list(fig.layout.yaxis2.ticktext) == tokens
    assert (fig.layout.height - 120) / 2 >= n * figures.MIN_CELL_PX >= n * 12  # 12 px: the labels' font size


def test_long_input_gets_a_readable_strip_and_a_grid_with_a_minimum_cell_size():
    import torch
    from types import SimpleNamespace

    n = 301  # <cls> and a 300-character sentence
    tokens = ["<cls>"] + list(("x" * 150) + "a" + ("y" * 149))
    pattern = torch.softmax(torch.randn(1, 2, n, n), dim=-1)
    grid = figures.attention_grid_figure(pattern, tokens)
    per_head = (grid.layout.height - 120) / 2  # one head per row
    assert per_head >= n * figures.MIN_CELL_PX  # each query row gets at least MIN_CELL_PX pixels
    assert grid.layout.xaxis.domain == grid.layout.xaxis2.domain  # stacked, not squeezed side by side
    assert len(grid.layout.yaxis.ticktext) == n  # every row labelled

    result = SimpleNamespace(pattern=pattern, tokens=tokens, step=7)
    strip = figures.read_attention_figure(result, 0, "ab")
    (heat,) = strip.data
    assert np.array(heat.z).shape == (2, n) and list(heat.y) == ["L0H0", "L0H1"]
    assert np.allclose(np.array(heat.z)[1], pattern[0, 1, 0].numpy())  # the <cls> row of each head
    assert list(strip.layout.xaxis.ticktext) == ["<br><cls>", *tokens[1:]]  # every character labelled, the lone "a" too
    pattern[0, 1, 0] = 0.0
    pattern[0, 1, 0, 151] = 1.0  # head 1 reads only the "a"
    strip = figures.read_attention_figure(result, 0, "ab")
    low, high = strip.layout.xaxis.range
    assert high - low == figures.STRIP_WINDOW and low < 151 < high  # the window opens on what <cls> reads
    assert strip.layout.xaxis.rangeslider.visible  # pan along the rest
    assert "what <cls> reads" in strip.layout.title.text and "step 7" in strip.layout.title.text


def _curves(steps):
    n = len(steps)
    return pd.DataFrame({"step": steps, "train_loss": np.linspace(3, 0.01, n), "test_loss": np.linspace(3, 0.1, n),
                         "train_acc": np.linspace(0, 1, n), "test_acc": np.linspace(0, 1, n),
                         "weight_norm": np.linspace(10, 5, n)})


def test_curves_figure_log_axes_and_markers():
    df = pd.DataFrame({"step": [0, 10, 20, 30], "train_loss": [3.0, 1.0, 0.1, 0.01], "test_loss": [3.0, 3.5, 2.0, 0.1],
                       "train_acc": [0.0, 0.5, 1.0, 1.0], "test_acc": [0.0, 0.0, 0.5, 1.0]})
    fig = figures.curves_figure({"r": df}, "loss", log_x=True, events={"r": {"memorize_step": 20, "grok_step": 30}})
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    assert list(fig.data[0].x) == [10, 20, 30]  # step 0 left out on a log axis
    assert {"r memorized", "r grokked"} <= {t.name for t in fig.data}
    lin = figures.curves_figure({"r": df}, "accuracy", log_x=False, log_y=False)
    assert lin.layout.xaxis.type == "linear" and list(lin.data[0].x) == [0, 10, 20, 30]


@pytest.mark.parametrize("last, labels", [
    (850, ["10", "20", "50", "100", "200", "500", "1000"]),  # the case: 1000 was missing
    (3000, ["10", "20", "50", "100", "200", "500", "1000", "2000", "5000"]),
    (40_000, ["10", "100", "1000", "10k"]),  # more than three decades: decades only
])
def test_log_step_axes_label_every_decade(last, labels):
    steps = [0, *np.unique(np.geomspace(10, last, 40).round().astype(int))]
    for fig in (figures.curves_figure({"r": _curves(steps)}, "loss"), figures.weight_norm_figure({"r": _curves(steps)}),
                figures.progress_losses_figure(_curves(steps), log_x=True)):
        axis = fig.layout.xaxis
        assert axis.type == "log" and list(axis.ticktext) == labels
        start, end = 10 ** np.array(axis.range)
        assert start == pytest.approx(10) and last <= end * (1 + 1e-9) <= 2.5 * last  # the last step is inside
        assert all(axis.range[0] - 1e-9 <= np.log10(v) <= axis.range[1] + 1e-9 for v in axis.tickvals)


def test_markers_sit_on_the_raw_value_when_smoothed():
    steps = list(range(0, 500, 10))
    df = _curves(steps)
    df.loc[df["step"] >= 200, "train_acc"] = 1.0  # memorised at 200: a jump the smoothed curve lags behind
    fig = figures.curves_figure({"r": df}, "accuracy", log_y=False, smoothing=0.9,
                                events={"r": {"memorize_step": 200, "grok_step": 490}})
    marker = next(t for t in fig.data if t.name == "r memorized")
    smoothed = next(t for t in fig.data if t.name == "r train")
    assert marker.y[0] == 1.0  # the value that crossed 99%, not the smoothed curve's
    assert smoothed.y[list(smoothed.x).index(200)] < 0.9  # (the smoothed curve is well below it there)


def _progress(steps, sum_sq=(940.0, 1630.0)):
    n = len(steps)
    return pd.DataFrame({"step": steps, "train_loss": np.geomspace(4, 1e-3, n), "test_loss": np.geomspace(4, 0.5, n),
                         "restricted_loss": np.geomspace(4, 0.2, n), "excluded_loss": np.geomspace(4, 6, n),
                         "gini_embed": np.linspace(0.2, 0.8, n), "gini_neuron_logit": np.linspace(0.1, 0.6, n),
                         "sum_sq_weights": np.linspace(*sum_sq, n)})


def test_log_y_axes_write_every_decade_alike():
    df = _progress(list(range(0, 1000, 100)))
    for fig, axis in ((figures.progress_losses_figure(df), "yaxis"), (figures.progress_figure(df), "yaxis"),
                      (figures.curves_figure({"r": _curves([0, 10, 100])}, "loss"), "yaxis")):
        layout = fig.layout[axis]
        assert layout.type == "log" and len(layout.ticktext) >= 2
        # 10⁻³ ... 10⁰ ... 10¹, never "1" beside "10⁻¹"
        assert all(label.startswith("10") and len(label) >= 3 for label in layout.ticktext), layout.ticktext
        assert [10 ** round(np.log10(v)) for v in layout.tickvals] == pytest.approx(list(layout.tickvals))
    assert list(figures.progress_losses_figure(df).layout.yaxis.ticktext) == ["10⁻³", "10⁻²", "10⁻¹", "10⁰", "10¹"]


def test_sum_of_squared_weights_ticks_are_round_numbers():
    for fig in (figures.progress_measures_figure(_progress(list(range(0, 1000, 100)))),
                figures.progress_figure(_progress(list(range(0, 1000, 100))))):
        axis = next(a for name, a in fig.layout.to_plotly_json().items()
                    if name.startswith("yaxis") and (a.get("title") or {}).get("text") == "Σθ²")
        ticks = axis["tickvals"]
        assert ticks == [800, 1000, 1200, 1400, 1600, 1800]  # not 940, 1170, 1401, ...
        assert axis["range"] == [ticks[0], ticks[-1]] and len(ticks) >= 3


def test_the_progress_figure_shares_one_step_axis_over_both_panels():
    fig = figures.progress_figure(_progress([0, 10, 100, 1000]), log_x=True)
    assert {t.name for t in fig.data} >= {"restricted loss", "excluded loss", "Gini of W_E Fourier norms",
                                          "sum of squared weights Σθ²"}
    top, bottom = fig.layout.xaxis, fig.layout.xaxis2
    assert top.matches == "x2" and top.anchor == "y" and bottom.title.text == "step (log)"  # zoom one, both follow
    assert top.type == bottom.type == "log" and list(top.ticktext) == list(bottom.ticktext) == ["10", "20", "50", "100",
                                                                                                  "200", "500", "1000"]


def test_heads_bars_have_y_titles_and_pair_grids_are_square():
    table = pd.DataFrame({"component": ["none", "L0H0", "L0H1"], "loss": [0.1, 0.5, 0.2], "accuracy": [1.0, 0.6, 0.9],
                          "delta_loss": [0.0, 0.4, 0.1], "delta_accuracy": [0.0, -0.4, -0.1]})
    fig = figures.ablation_figure(table)
    assert fig.layout.yaxis.title.text.startswith("Δ loss") and fig.layout.yaxis2.title.text.startswith("Δ accuracy")
    grid = figures.modular_grid_figure(np.random.default_rng(0).random((2, 2, 7, 7)))
    anchors = [grid.layout[f"yaxis{i if i > 1 else ''}"].scaleanchor for i in range(1, 5)]
    assert anchors == ["x", "x2", "x3", "x4"] and grid.layout.yaxis.scaleratio == 1


def test_grok_step_colour_bar_has_several_ticks_on_a_narrow_range():
    from test_sweep_view import members_table

    narrow = members_table([(1e-3, 0.1, 0, "grokking", 200), (1e-3, 1.0, 0, "grokking", 400),
                            (1e-2, 0.1, 0, "grokking", 300), (1e-2, 1.0, 0, "grokking", 350)])
    bar = figures.grok_steps_figure(narrow, "train.weight_decay", "train.lr").data[1].colorbar
    assert list(bar.ticktext) == ["200", "300", "400", "500"]


def test_prefetcher_computes_ahead_in_order_and_keeps_errors():
    from dashboard.background import Prefetcher, by_distance

    order = by_distance([0, 10, 20, 30, 40], 40)
    assert order == [40, 30, 20, 10, 0]
    calls = []

    def compute(step):
        calls.append(step)
        if step == 20:
            raise ValueError("damaged checkpoint 20")
        return step * 2

    prefetcher = Prefetcher(compute, order)
    deadline = time.monotonic() + 30
    while prefetcher.done < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert calls == order and prefetcher.get(10) == 20
    with pytest.raises(ValueError, match="damaged checkpoint 20"):
        prefetcher.get(20)
    late = Prefetcher(lambda step: time.sleep(0.2) or step, [1, 2, 3])
    assert late.get(3) is None  # not reached yet: the page computes it and hands it over
    late.put(3, "from the page")
    assert late.get(3) == "from the page"


# --- pages ----------------------------------------------------------------------------------------


def test_runs_page_lists_runs_and_draws_their_curves(runs, app):
    folder, made = runs
    at = app(folder).run()
    no_exception(at)
    table = at.dataframe[0].value
    assert set(table["name"]) == {"mod23", "ab"}
    mod = table.set_index("name").loc["mod23"]
    assert mod["p"] == 23 and mod["operator"] == "add" and mod["heads"] == 4 and mod["status"] == "finished"
    ab = table.set_index("name").loc["ab"]
    assert pd.isna(ab["p"]) and pd.isna(ab["operator"]) and pd.isna(ab["train_frac"])  # a_and_b has none
    assert at.dataframe[0].proto.placeholder == "—"  # ... and the table shows a dash there, not "None"
    updated = json.loads(at.dataframe[0].proto.columns)["updated_at"]
    assert updated["label"] == "updated" and updated["type_config"]["format"] == "distance"  # "3 minutes ago"
    assert set(at.sidebar.multiselect(key="selected_runs").value) == {"mod23", "ab"}
    (spec,) = specs(at)
    assert {"mod23 train", "mod23 test", "ab train", "ab test"} <= set(trace_names(spec))
    assert spec["layout"]["xaxis"]["type"] == "log"

    at.text_input(key="runs_filter").set_value("mod").run()
    assert list(at.dataframe[0].value["name"]) == ["mod23"]

    select_runs(at, ["ab"]).run()
    (spec,) = specs(at)
    assert not any(name.startswith("mod23") for name in trace_names(spec))


def ticked(at, sent: bool = False) -> list[str]:
    """The runs whose rows the Runs table ticks: its selection (as the browser also has it); with `sent`, the
    selection the page sent the browser in this run (to tick rows the user did not tick: sidebar, filter)."""
    table = at.dataframe[0]
    if sent:
        rows = json.loads(table.proto.selection_state)["selection"]["rows"] if table.proto.selection_state else None
        assert rows is not None, "the page sent the table no selection"
    else:
        rows = at.session_state["runs_table"]["selection"]["rows"]
    return [table.value["name"][i] for i in rows]


def tick(at, names: list[str]):
    """Tick exactly these rows, as the browser does: the table's selection sent with the next rerun (a widget
    state of JSON rows; AppTest has no call for a table's ticks, so the state is built here)."""
    from streamlit.proto.WidgetStates_pb2 import WidgetState

    table = at.dataframe[0]
    rows = [i for i, name in enumerate(table.value["name"]) if name in names]
    states = at._tree.get_widget_states()
    states.widgets.append(WidgetState(id=table.proto.id, string_value=json.dumps({"selection": {"rows": rows, "columns": []}})))
    return at._run(states)


def test_runs_table_ticks_and_the_sidebar_are_one_selection(runs, app, tmp_path):
    """Ticking rows sets the sidebar's selection (and so every page's); the sidebar's runs show ticked; a
    filter hides rows without dropping their runs from the selection; a sweep member's row names it."""
    folder, _ = runs
    shutil.copytree(folder, tmp_path / "runs")
    members = tmp_path / "runs" / "wd-sweep"
    (members / "weight_decay0.1-seed0").parent.mkdir()
    (members / "sweep.json").write_text("{}")
    for member in ("weight_decay0.1-seed0", "weight_decay1.0-seed0"):
        shutil.copytree(folder / "mod23", members / member)
    at = app(tmp_path / "runs").run()
    no_exception(at)
    table = at.dataframe[0].value.set_index("name")
    assert table.loc["wd-sweep/weight_decay1.0-seed0", "run"] == "weight_decay1.0-seed0"
    assert table.loc["wd-sweep/weight_decay1.0-seed0", "sweep"] == "wd-sweep" and pd.isna(table.loc["ab", "sweep"])
    columns = json.loads(at.dataframe[0].proto.columns)
    assert columns["name"]["hidden"] and not columns["run"].get("hidden") and columns["run"]["width"] >= 220
    assert sorted(ticked(at, sent=True)) == sorted(at.sidebar.multiselect(key="selected_runs").value)
    assert "4 of 4 runs shown" in " ".join(c.value for c in at.caption)

    tick(at, ["mod23", "wd-sweep/weight_decay0.1-seed0"])
    no_exception(at)
    assert at.sidebar.multiselect(key="selected_runs").value == ["mod23", "wd-sweep/weight_decay0.1-seed0"]
    assert sorted(ticked(at)) == ["mod23", "wd-sweep/weight_decay0.1-seed0"]
    (spec,) = specs(at)
    assert {n.rsplit(" ", 1)[0] for n in trace_names(spec)} == {"mod23", "wd-sweep/weight_decay0.1-seed0"}
    at = goto(at, "curves")
    assert {n.rsplit(" ", 1)[0] for n in trace_names(specs(at)[0])} == {"mod23", "wd-sweep/weight_decay0.1-seed0"}

    at = goto(at, "runs")
    select_runs(at, ["ab", "mod23"]).run()
    assert sorted(ticked(at, sent=True)) == ["ab", "mod23"]  # the sidebar's runs show ticked
    at.text_input(key="runs_filter").set_value("sweep").run()
    assert ticked(at, sent=True) == []  # neither selected run is shown ...
    tick(at, ["wd-sweep/weight_decay1.0-seed0"])
    assert at.sidebar.multiselect(key="selected_runs").value == ["ab", "mod23", "wd-sweep/weight_decay1.0-seed0"]  # ... nor dropped
    tick(at, [])
    assert at.sidebar.multiselect(key="selected_runs").value == ["ab", "mod23"]
    at.text_input(key="runs_filter").set_value("").run()
    assert sorted(ticked(at, sent=True)) == ["ab", "mod23"]


def same_figure(spec: dict, fig) -> None:
    """A chart drawn by a page is the figure a lab.plot_* call returns: same traces, data and titles."""
    expected = json.loads(fig.to_json())
    assert spec["layout"]["title"] == expected["layout"]["title"]
    assert [t["type"] for t in spec["data"]] == [t["type"] for t in expected["data"]]
    for got, want in zip(spec["data"], expected["data"]):
        assert got.get("name") == want.get("name")
        for field in ("x", "y", "z"):
            if field in want:
                a, b = arr(got[field]), arr(want[field])
                assert a.shape == b.shape and (np.allclose(a, b, equal_nan=True) if a.dtype.kind in "fiu"
                                               else list(a.ravel()) == list(b.ravel()))
    for axis in ("xaxis", "yaxis"):
        for field in ("type", "ticktext", "range"):
            assert spec["layout"][axis].get(field) == expected["layout"][axis].get(field), (axis, field)


def test_runs_page_without_runs_says_how_to_start_one(tmp_path, app):
    at = app(tmp_path / "empty").run()
    no_exception(at)
    assert any("lab train modadd_quick" in i.value for i in at.info)
    assert not at.get("plotly_chart")


def test_curves_page_toggles_and_smoothing_change_the_figure(runs, app):
    folder, _ = runs
    at = app(folder).run()
    at = goto(at, "curves")
    no_exception(at)
    loss, acc, norm = specs(at)
    assert loss["layout"]["xaxis"]["type"] == "log" and loss["layout"]["yaxis"]["type"] == "log"
    assert "mod23 memorized" in trace_names(loss)
    assert set(trace_names(norm)) == {"mod23", "ab"}
    shown = [lab.load_run(folder / name) for name in at.sidebar.multiselect(key="selected_runs").value]
    same_figure(loss, lab.plot_curves(shown, "loss"))
    same_figure(acc, lab.plot_curves(shown, "accuracy"))
    same_figure(norm, lab.plot_weight_norm(shown))

    at.toggle(key="curves_log_x").set_value(False).run()
    loss, acc, norm = specs(at)
    assert loss["layout"]["xaxis"]["type"] == "linear"
    assert arr(loss["data"][0]["x"])[0] == 0  # step 0 is back on a linear axis

    at.toggle(key="curves_log_y_loss").set_value(False).run()
    assert specs(at)[0]["layout"]["yaxis"]["type"] == "linear"

    raw = arr(next(t for t in specs(at)[0]["data"] if t["name"] == "mod23 test")["y"])
    at.slider(key="curves_smoothing").set_value(0.8).run()
    smoothed = arr(next(t for t in specs(at)[0]["data"] if t["name"] == "mod23 test")["y"])
    assert smoothed[0] == pytest.approx(raw[0]) and not np.allclose(smoothed, raw)
    no_exception(at)


def _attention_spec(at) -> dict:
    return next(s for s in specs(at) if "attention per head" in s["layout"]["title"]["text"])


def test_attention_page_a_and_b_sentence_and_checkpoint(runs, app):
    folder, made = runs
    at = app(folder).run()
    at = goto(at, "attention")
    at.selectbox(key="attn_run").set_value("ab").run()
    no_exception(at)
    assert not errors(at)
    spec = _attention_spec(at)
    assert len([t for t in spec["data"] if t["type"] == "heatmap"]) == 4  # 2 layers x 2 heads
    assert spec["layout"]["xaxis"]["ticktext"] == ["<cls>", *"grab␣a␣cab"]
    assert all(t["zmin"] == 0 and t["zmax"] == 1 for t in spec["data"])
    assert any("L0H0" in m.value for m in at.markdown)  # the <cls> highlight per head
    assert {m.label for m in at.metric} >= {"Prediction", "Probability"}

    same_figure(spec, lab.plot_attention(lab.load_run(made["ab"]), "grab a cab"))

    at.text_input(key="attn_text").set_value("cab").run()
    assert _attention_spec(at)["layout"]["xaxis"]["ticktext"] == ["<cls>", "c", "a", "b"]

    long = "x" * 30 + "a" + "y" * 17  # 48 characters (this run's max_len): 49 positions with <cls>
    at.text_input(key="attn_text").set_value(long).run()
    no_exception(at)
    strip = next(s for s in specs(at) if "reads" in s["layout"]["title"]["text"])
    assert strip["layout"]["xaxis"]["ticktext"] == ["<br><cls>", *long] and arr(strip["data"][0]["z"]).shape == (4, 49)
    same_figure(strip, lab.plot_read_attention(lab.load_run(made["ab"]), long))
    grid = _attention_spec(at)
    assert grid["layout"]["height"] >= 4 * 49 * figures.MIN_CELL_PX  # one head per row, cells >= MIN_CELL_PX

    slider = at.select_slider(key="attn_step:ab")
    last = arr(_attention_spec(at)["data"][0]["z"])
    slider.set_value(0).run()
    first = arr(_attention_spec(at)["data"][0]["z"])
    assert not np.allclose(first, last)  # scrubbing to step 0 shows the untrained model's pattern
    assert "step 0" in _attention_spec(at)["layout"]["title"]["text"]

    at.text_input(key="attn_text").set_value("abc!").run()
    no_exception(at)
    assert any("'!'" in e and "alphabet" in e for e in errors(at))
    at.text_input(key="attn_text").set_value("ab" * 40).run()
    no_exception(at)
    assert any("max_len" in e for e in errors(at))


def test_attention_page_modular_pair_and_grid(runs, app):
    folder, _ = runs
    at = app(folder).run()
    at = goto(at, "attention")
    at.selectbox(key="attn_run").set_value("mod23").run()
    no_exception(at)
    assert not errors(at)
    heat = _attention_spec(at)
    assert heat["layout"]["yaxis"]["ticktext"] == ["5", "7", "="]
    grid = next(s for s in specs(at) if "over all" in s["layout"]["title"]["text"] or "= → a" in s["layout"]["title"]["text"])
    z = arr(grid["data"][0]["z"])
    assert z.shape == (23, 23) and len(grid["data"]) == 4
    at.number_input(key="attn_a").set_value(11).run()
    assert _attention_spec(at)["layout"]["yaxis"]["ticktext"] == ["11", "7", "="]


def computing(at) -> bool:
    return any("in the background" in i.value for i in at.info)


def when_computed(at, timeout_s: float = TIMEOUT):
    """Rerun the page until its background work is done (the browser's page polls by itself; AppTest does not)."""
    deadline = time.monotonic() + timeout_s
    while computing(at) and time.monotonic() < deadline:
        time.sleep(0.5)
        at.run()
    assert not computing(at), "the background work did not finish"
    return at


def test_a_page_answers_at_once_for_a_run_nobody_analysed(runs, app, tmp_path):
    """The Progress page does not compute every checkpoint's measures before drawing: it says they are being
    computed in the background, and draws them (the same as lab.plot_progress) once they are."""
    from lab.analysis.progress import CACHE_FILE

    folder, _ = runs
    shutil.copytree(folder / "mod23", tmp_path / "mod23")
    (tmp_path / "mod23" / CACHE_FILE).unlink(missing_ok=True)
    at = goto(app(tmp_path).run(), "progress")
    no_exception(at)
    assert computing(at) and not errors(at)
    assert not any("restricted" in s["layout"]["title"]["text"] for s in specs(at))
    at = when_computed(at)
    no_exception(at)
    assert (tmp_path / "mod23" / CACHE_FILE).is_file()  # kept for the next visit
    assert any("restricted" in s["layout"]["title"]["text"] for s in specs(at))


def test_progress_measures_page(runs, app):
    folder, _ = runs
    at = app(folder).run()
    at = when_computed(goto(at, "progress"))
    no_exception(at)
    assert not errors(at)
    titles = [s["layout"]["title"]["text"] for s in specs(at)]
    assert any("Fourier norms" in t for t in titles)
    # one figure over training, both panels (losses; Gini and Σθ²): the one lab.plot_progress returns
    measures = next(s for s in specs(at) if "restricted and excluded loss" in s["layout"]["title"]["text"])
    assert {"restricted loss", "excluded loss", "test loss", "Gini of W_E Fourier norms",
            "sum of squared weights Σθ²"} <= set(trace_names(measures))
    steps = arr(measures["data"][0]["x"])
    assert list(steps) == lab_checkpoint_steps(folder / "mod23")
    same_figure(measures, lab.plot_progress(lab.load_run(folder / "mod23")))
    fourier = next(s for s in specs(at) if "Fourier norms" in s["layout"]["title"]["text"])
    same_figure(fourier, lab.plot_fourier_norms(lab.load_run(folder / "mod23")))


def test_progress_page_switches_to_the_transformer_lens_demo_definition(runs, app):
    folder, _ = runs
    at = when_computed(goto(app(folder).run(), "progress"))
    assert at.radio(key="progress_definition").value == "paper"
    at = when_computed(at.radio(key="progress_definition").set_value("tl_demo").run())
    no_exception(at)
    measures = next(s for s in specs(at) if "restricted and excluded loss" in s["layout"]["title"]["text"])
    restricted = next(trace for trace in measures["data"] if trace.get("name") == "restricted loss")
    demo = lab.progress_measures(lab.load_run(folder / "mod23"), definition="tl_demo")
    paper = lab.progress_measures(lab.load_run(folder / "mod23"))
    assert np.allclose(arr(restricted["y"]), demo["restricted_loss"])
    assert not np.allclose(arr(restricted["y"]), paper["restricted_loss"])


def lab_checkpoint_steps(path):
    import lab

    return lab.load_run(path).checkpoint_steps


def test_heads_page(runs, app):
    folder, _ = runs
    at = app(folder).run()
    at = goto(at, "heads")
    at.selectbox(key="heads_run").set_value("ab").run()
    no_exception(at)
    assert not errors(at)
    ablation, letters = specs(at)
    assert ablation["data"][0]["x"] == ["L0H0", "L0H1", "L1H0", "L1H1"]
    assert set(trace_names(letters)) == {"mass on a", "mass on b"}
    ab = lab.load_run(folder / "ab")
    same_figure(ablation, lab.plot_ablation(ab))
    same_figure(letters, lab.plot_letter_attention(ab))
    at.selectbox(key="heads_run").set_value("mod23").run()
    no_exception(at)
    (ablation,) = specs(at)
    assert len(ablation["data"][0]["x"]) == 4


# --- runs that are half-written, damaged, or removed while the page is open --------------------------


@pytest.fixture
def messy(runs, tmp_path):
    """A runs folder with a good run, a half-written one, and damaged ones."""
    folder, made = runs
    messy = tmp_path / "messy"
    messy.mkdir()
    shutil.copytree(made["ab"], messy / "good")
    half = messy / "half"  # training just started: a config, nothing else yet
    half.mkdir()
    shutil.copy(made["ab"] / "config.json", half / "config.json")
    bad_json = messy / "bad_json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    (bad_json / "summary.json").write_text("{")
    torn = messy / "torn"  # a damaged checkpoint and a metrics line torn mid-way in the middle
    shutil.copytree(made["ab"], torn)
    last = max((torn / "checkpoints").iterdir())
    last.write_bytes(last.read_bytes()[:100])
    lines = (torn / "metrics.jsonl").read_text().splitlines()
    (torn / "metrics.jsonl").write_text("\n".join([lines[0], lines[1][:20], *lines[2:]]) + "\n")
    return messy


def test_pages_survive_half_written_and_damaged_runs(messy, app):
    at = app(messy).run()
    no_exception(at)
    table = at.dataframe[0].value.set_index("name")
    assert table.loc["bad_json", "status"] == "damaged"
    select_runs(at, ["good", "half", "torn"]).run()
    for page in ("curves", "attention", "heads", "progress", "runs"):
        goto(at, page)
        no_exception(at)
    goto(at, "curves")
    assert any("half: no metrics yet" in i.value for i in at.info)
    assert any("torn" in e and "line 2" in e for e in errors(at))
    goto(at, "attention")
    at.selectbox(key="attn_run").set_value("half").run()
    no_exception(at)
    assert any("no checkpoint yet" in i.value for i in at.info)
    at.selectbox(key="attn_run").set_value("torn").run()
    no_exception(at)
    assert any("safetensors" in e for e in errors(at))  # the last (damaged) checkpoint is the default
    at.select_slider(key="attn_step:torn").set_value(0).run()
    no_exception(at)
    assert not errors(at) and _attention_spec(at)


def test_pages_survive_a_run_removed_while_open(runs, app, tmp_path):
    folder, made = runs
    live = tmp_path / "live"
    live.mkdir()
    shutil.copytree(made["ab"], live / "doomed")
    shutil.copytree(made["mod"], live / "kept")
    at = app(live).run()
    select_runs(at, ["doomed", "kept"]).run()
    goto(at, "attention")
    at.selectbox(key="attn_run").set_value("doomed").run()
    assert _attention_spec(at)
    shutil.rmtree(live / "doomed")
    for page in ("attention", "curves", "heads", "runs"):
        goto(at, page)
        no_exception(at)
    assert at.sidebar.multiselect(key="selected_runs").value == ["kept"]
    assert list(at.dataframe[0].value["name"]) == ["kept"]


# --- lab dashboard --------------------------------------------------------------------------------


def test_dashboard_command_refuses_a_busy_port_in_one_line(capsys):
    from lab.cli import main
    from lab.dashboard_server import app_path, command

    assert app_path() == ROOT / "dashboard" / "app.py"  # found as the installed `dashboard` package
    cmd = command("127.0.0.1", 8599)
    flags = dict(zip(cmd[5::2], cmd[6::2]))
    assert flags["--server.address"] == "127.0.0.1" and flags["--server.port"] == "8599"
    assert flags["--server.headless"] == "true" and flags["--browser.gatherUsageStats"] == "false"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert main(["dashboard", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"port {port}" in err and "already in use" in err


def test_a_port_whose_server_just_stopped_is_free_again():
    """A dashboard stopped a moment ago leaves its closed connections in TIME_WAIT for a minute; restarting
    it on the same port must not be refused (the server itself binds with SO_REUSEADDR)."""
    from lab.dashboard_server import check_port_free

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Streamlit's server (uvicorn) binds
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        served, _ = listener.accept()
        served.close()  # the server's side closes first: its port keeps a TIME_WAIT connection
        client.close()
    time.sleep(0.2)
    check_port_free("127.0.0.1", port)  # raises DashboardError("port ... already in use") without SO_REUSEADDR


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_dashboard_starts_for_a_new_user_with_no_home_config_and_no_terminal(runs, tmp_path):
    """`lab dashboard` as a newcomer meets it: a fresh empty HOME (no ~/.streamlit), no standard input.
    A non-headless Streamlit would stop at its "Email:" prompt and exit 255 without answering."""
    folder, _ = runs
    home = tmp_path / "home"
    home.mkdir()
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLIT_")}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), PYTHONUNBUFFERED="1")
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "lab.cli", "dashboard", "--runs-dir", str(folder),
                                    "--port", str(port)], stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as response:
                        assert response.status == 200
                        break
                except OSError:
                    pass
                assert process.poll() is None, f"lab dashboard exited with {process.returncode}:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"no answer on port {port}:\n{log.read_text()}"
                time.sleep(0.5)
            time.sleep(1)  # Streamlit prints its URL just after it starts answering
        finally:
            process.terminate()
            process.wait(timeout=30)
    output = log.read_text()
    assert f"http://127.0.0.1:{port}" in output  # the URL to open is printed
    for unwanted in ("Email", "Collecting usage statistics", "skills", "Welcome to Streamlit"):
        assert unwanted not in output, f"{unwanted!r} in:\n{output}"


def test_timing_script_measures_a_page(runs, capsys):
    from lab import dashboard_timing

    folder, _ = runs
    assert dashboard_timing.main(["--runs-dir", str(folder), "--repeat", "1", "--pages", "curves"]) == 0
    out = capsys.readouterr().out
    assert "curves: first visit" in out and "curves: smoothing 0.8" in out and " ms " in out
    with pytest.raises(SystemExit):
        dashboard_timing.main(["--runs-dir", str(folder), "--pages", "curvez"])
    assert "curvez" in capsys.readouterr().err


def test_downloads_html_offline_and_png(tmp_path):
    import zipfile

    from dashboard import downloads

    df = pd.DataFrame({"step": [0, 10], "train_loss": [2.0, 1.0], "test_loss": [2.0, 1.5],
                       "train_acc": [0.1, 0.9], "test_acc": [0.0, 0.2], "weight_norm": [3.0, 3.1]})
    figs = {"loss": figures.curves_figure({"r": df}, "loss"), "weight norm": figures.weight_norm_figure({"r": df})}
    page = figures.figures_html(figs, "Curves <test>")
    assert page.count("<h2>") == 2 and "Curves &lt;test&gt;" in page
    assert "<script src=" not in page and len(page) > 1_000_000  # plotly.js embedded once: works offline
    if not downloads.png_export_available():
        pytest.skip("PNG export needs kaleido and Chromium")
    archive = zipfile.ZipFile(__import__("io").BytesIO(downloads.png_zip({"loss": figs["loss"]})))
    (name,) = archive.namelist()
    assert name == "00_loss.png" and archive.read(name)[:8] == b"\x89PNG\r\n\x1a\n"
