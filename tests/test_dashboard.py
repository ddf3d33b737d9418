"""The dashboard under Streamlit's AppTest, against real small runs: every page renders without an
exception, draws the charts it should (read from the plotly spec in each element's proto), and its
widgets change what is drawn; damaged, half-written and removed runs give a line, not a traceback.
Also: the figure builders, and `lab dashboard`'s port check."""

from __future__ import annotations

import json
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the dashboard/ folder sits next to lab/, outside the package
sys.path.insert(0, str(Path(__file__).resolve().parent))

import dashboard_runs  # noqa: E402
from dashboard import figures  # noqa: E402

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


def test_run_colours_are_stable_and_distinct():
    a = figures.run_colors(["x", "y", "z"])
    b = figures.run_colors(["z", "x", "y", "w"])
    assert a["x"] == figures.run_colors(["y", "x", "z"])["x"]
    assert len(set(a.values())) == 3 and len(set(b.values())) == 4
    assert figures.run_color("x") == figures.run_color("x")


def test_attention_grid_keeps_repeated_tokens_and_fixes_the_scale():
    import torch

    pattern = torch.softmax(torch.randn(2, 3, 4, 4), dim=-1)
    fig = figures.attention_grid_figure(pattern, ["<cls>", "a", "a", "b"])
    heatmaps = [t for t in fig.data if t.type == "heatmap"]
    assert len(heatmaps) == 6
    assert all(t.zmin == 0 and t.zmax == 1 for t in heatmaps)
    assert list(fig.layout.xaxis.ticktext) == ["<cls>", "a", "a", "b"]  # numeric axis: both "a" kept
    assert np.allclose(np.array(heatmaps[4].z), pattern[1, 1].numpy())


def test_curves_figure_log_axes_and_markers():
    df = pd.DataFrame({"step": [0, 10, 20, 30], "train_loss": [3.0, 1.0, 0.1, 0.01], "test_loss": [3.0, 3.5, 2.0, 0.1],
                       "train_acc": [0.0, 0.5, 1.0, 1.0], "test_acc": [0.0, 0.0, 0.5, 1.0]})
    fig = figures.curves_figure({"r": df}, "loss", log_x=True, events={"r": {"memorize_step": 20, "grok_step": 30}})
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    assert list(fig.data[0].x) == [10, 20, 30]  # step 0 left out on a log axis
    assert {"r memorized", "r grokked"} <= {t.name for t in fig.data}
    lin = figures.curves_figure({"r": df}, "accuracy", log_x=False, log_y=False)
    assert lin.layout.xaxis.type == "linear" and list(lin.data[0].x) == [0, 10, 20, 30]


# --- pages ----------------------------------------------------------------------------------------


def test_runs_page_lists_runs_and_draws_their_curves(runs, app):
    folder, made = runs
    at = app(folder).run()
    no_exception(at)
    table = at.dataframe[0].value
    assert set(table["name"]) == {"mod23", "ab"}
    mod = table.set_index("name").loc["mod23"]
    assert mod["p"] == 23 and mod["operator"] == "add" and mod["heads"] == 4 and mod["status"] == "finished"
    assert set(at.sidebar.multiselect(key="selected_runs").value) == {"mod23", "ab"}
    (spec,) = specs(at)
    assert {"mod23 train", "mod23 test", "ab train", "ab test"} <= set(trace_names(spec))
    assert spec["layout"]["xaxis"]["type"] == "log"

    at.text_input(key="runs_filter").set_value("mod").run()
    assert list(at.dataframe[0].value["name"]) == ["mod23"]

    select_runs(at, ["ab"]).run()
    (spec,) = specs(at)
    assert not any(name.startswith("mod23") for name in trace_names(spec))


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
    return next(s for s in specs(at) if s["data"][0]["type"] == "heatmap")


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

    at.text_input(key="attn_text").set_value("cab").run()
    assert _attention_spec(at)["layout"]["xaxis"]["ticktext"] == ["<cls>", "c", "a", "b"]

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


def test_progress_measures_page(runs, app):
    folder, _ = runs
    at = app(folder).run()
    at = goto(at, "progress")
    no_exception(at)
    assert not errors(at)
    titles = [s["layout"]["title"]["text"] for s in specs(at)]
    assert any("Restricted" in t for t in titles) and any("Gini" in t for t in titles)
    assert any("Fourier norms" in t for t in titles)
    losses = next(s for s in specs(at) if "Restricted" in s["layout"]["title"]["text"])
    assert {"restricted loss", "excluded loss", "test loss"} <= set(trace_names(losses))
    steps = arr(losses["data"][0]["x"])
    assert list(steps) == lab_checkpoint_steps(folder / "mod23")


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
    from lab.dashboard_server import APP as SERVER_APP, command

    assert SERVER_APP == ROOT / "dashboard" / "app.py" and SERVER_APP.is_file()
    cmd = command("127.0.0.1", 8599, headless=True)
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert main(["dashboard", "--port", str(port), "--headless"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"port {port}" in err and "already in use" in err


def test_downloads_html_offline_and_png(tmp_path):
    import zipfile

    from dashboard import common

    df = pd.DataFrame({"step": [0, 10], "train_loss": [2.0, 1.0], "test_loss": [2.0, 1.5],
                       "train_acc": [0.1, 0.9], "test_acc": [0.0, 0.2], "weight_norm": [3.0, 3.1]})
    figs = {"loss": figures.curves_figure({"r": df}, "loss"), "weight norm": figures.weight_norm_figure({"r": df})}
    page = figures.figures_html(figs, "Curves <test>")
    assert page.count("<h2>") == 2 and "Curves &lt;test&gt;" in page
    assert "<script src=" not in page and len(page) > 1_000_000  # plotly.js embedded once: works offline
    if not common.png_export_available():
        pytest.skip("PNG export needs kaleido and Chromium")
    archive = zipfile.ZipFile(__import__("io").BytesIO(common._png_zip({"loss": figs["loss"]})))
    (name,) = archive.namelist()
    assert name == "00_loss.png" and archive.read(name)[:8] == b"\x89PNG\r\n\x1a\n"
