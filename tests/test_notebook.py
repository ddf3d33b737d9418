"""experiments/tour.ipynb runs top to bottom (with `nbclient`, in a fresh kernel), so it can never go stale.

It analyses the session's small trained runs (copied, since the tour writes analysis caches into them),
passed through $LAB_TOUR_RUNS; without that variable the notebook trains its own."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from runs_for_tests import trained_run

NOTEBOOK = Path(__file__).resolve().parent.parent / "experiments" / "tour.ipynb"


def test_tour_notebook_runs_top_to_bottom(tmp_path_factory, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="the dev extra's nbformat runs the notebook")
    nbclient = pytest.importorskip("nbclient", reason="the dev extra's nbclient runs the notebook")
    runs = tmp_path / "runs"
    for name in ("modadd_quick", "a_and_b"):
        shutil.copytree(trained_run(name, tmp_path_factory), runs / name)
    monkeypatch.setenv("LAB_TOUR_RUNS", str(runs))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [o for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(figures) >= 10  # every plot_* cell rendered a plotly figure
    texts = "\n".join(o.get("data", {}).get("text/plain", "") for o in outputs)
    assert "AttentionResult('<cls> g r a b ␣ a ␣ c a b' -> 'yes'" in texts
    assert "PatchingResult('a cab' -> 'yes' vs 'a cac' -> 'no'" in texts
    assert (runs / "a_and_b" / "analysis" / "heads").is_dir()  # the history was cached in the run folder
