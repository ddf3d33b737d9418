"""Circuits: activation patching, direct logit attribution, the logit lens, QK / OV circuits and composition
scores at a checkpoint, and how the circuit forms over training under the run's accuracy curves.

At each checkpoint, what the task's default patching pair shows (patching, DLA, logit lens, QK preference)
is cached in the run folder by `lab.circuit_history` (`lab demo` fills it); a background thread fills the
checkpoints not cached yet, nearest the one shown first, and the over-training chart draws the ones
ready. Inputs the user types are computed on the spot (two short forwards) and kept in memory.
"""

from __future__ import annotations

import streamlit as st

import lab
from dashboard import background, display, downloads, loading, selection
from lab import plots
from lab.analysis.ablation import is_cached
from lab.analysis.circuit_history import CACHE_KEY, MEASURES, cached_summary, frame_from_dict
from lab.analysis.patching import PatchingResult
from lab.plots.circuits import MEASURE_TITLES

st.title("Circuits")
st.caption("Which heads carry the answer, read three ways (patching, direct logit attribution, the weights' QK and "
           "OV circuits), at any checkpoint and over training. Definitions as in TransformerLens.")


def _stamp(run) -> tuple:
    steps = loading.checkpoint_steps(run)
    return tuple(steps), tuple(loading.checkpoint_stamp(run, step) for step in steps)


@st.cache_resource(show_spinner=False, max_entries=8)
def prefetcher(_run, path: str, stamp) -> background.Prefetcher:
    """Every checkpoint's summary, computed in the background from the last step outwards (what is cached
    on disk is only read)."""
    steps = list(stamp[0])
    return background.Prefetcher(lambda step: cached_summary(_run, step), background.by_distance(steps, steps[-1]))


@st.cache_data(show_spinner=False, max_entries=64)
def history(_run, path: str, stamp, cached_steps: tuple):
    """The over-training rows of the checkpoints cached so far."""
    import pandas as pd

    rows = [{"step": step, **row} for step in cached_steps for row in cached_summary(_run, step)["rows"]]
    return pd.DataFrame(rows, columns=["step", "measure", "component", "value"])


def summary(run, step: int) -> dict:
    ready = prefetcher(run, str(run.path), _stamp(run)).get(step)
    if ready is not None:
        return ready
    with st.spinner(f"Computing the circuit summary at step {step}…"):
        return cached_summary(run, step)


@st.cache_data(show_spinner=False, max_entries=128)
def patching(_run, path: str, checkpoint, step: int, clean: str, corrupted: str) -> PatchingResult:
    return lab.activation_patching(_run, clean, corrupted, step=step)


@st.cache_data(show_spinner=False, max_entries=128)
def attribution(_run, path: str, checkpoint, step: int, text: str | None, split: str, neurons: bool, against: str | None):
    return lab.logit_attribution(_run, text, split=split, step=step, neurons=neurons, against=against)


@st.cache_data(show_spinner=False, max_entries=128)
def lens(_run, path: str, checkpoint, step: int, text: str | None, split: str):
    return lab.logit_lens(_run, text, split=split, step=step)


@st.cache_resource(show_spinner=False, max_entries=256)
def figure(key: tuple, _build):
    """A figure built once per `key` (everything it is drawn from): building a plotly figure costs more than
    the cached numbers behind it, so a rerun that changes nothing it shows reuses it."""
    return _build()


@st.cache_data(show_spinner=False, max_entries=64)
def weights(_run, path: str, checkpoint, step: int, fourier: bool):
    composition = lab.composition_scores(_run, step) if _run.config.model.n_layers > 1 else None
    return lab.qk_circuit(_run, step, fourier=fourier), lab.ov_circuit(_run, step, fourier=fourier), composition


run = selection.pick_run("Run", key="circuits_run")
if run is None:
    st.stop()
figs: dict = {}
with display.guard(run.name):
    display.classification_only(run, "Circuits")
    if run.config.model.arch != "transformer":
        raise display.PageError(f"circuits read attention heads, and this run's arch {run.config.model.arch!r} has none")
    step = selection.pick_step(run, key="circuits_step")
    if step is None:
        st.stop()
    checkpoint = loading.checkpoint_stamp(run, step)
    entry = summary(run, step)
    default_clean, default_corrupted = entry["pair"]

    st.subheader("Over training")
    stamp = _stamp(run)
    ready = tuple(s for s in stamp[0] if is_cached(run, s, CACHE_KEY))
    measures = [m for m in MEASURES if any(row["measure"] == m for row in entry["rows"])]
    cols = st.columns([2, 1])
    measure = cols[0].selectbox("Summary per checkpoint", measures, key="circuits_measure",
                                format_func=lambda m: MEASURE_TITLES.get(m, m))
    log_x = cols[1].toggle("log x", value=True, key="circuits_log_x")
    events = {key: loading.summary(run).get(key) for key in ("memorize_step", "grok_step")}
    figs["over training"] = figure(
        ("history", str(run.path), stamp, ready, measure, log_x, tuple(events.items()),
         loading.file_stamp(run.path / "metrics.jsonl")),
        lambda: plots.circuit_history_figure(history(run, str(run.path), stamp, ready), loading.get_metrics(run.path),
                                             measure, run.name, events=events, log_x=log_x))
    display.chart(figs["over training"], key="circuits_history")
    if len(ready) < len(stamp[0]):
        st.caption(f"{len(ready)} of {len(stamp[0])} checkpoints computed so far (the rest fill in the background; "
                   "`lab demo` computes them all before the dashboard opens).")
    st.caption(f"On the task's default pair {default_clean!r} vs {default_corrupted!r}.")

    st.subheader("Activation patching")
    cols = st.columns(2)
    clean = cols[0].text_input("Clean input", value=default_clean, key=f"circuits_clean:{run.name}")
    corrupted = cols[1].text_input("Corrupted input", value=default_corrupted, key=f"circuits_corrupted:{run.name}")
    default_pair = (clean, corrupted) == (default_clean, default_corrupted)
    result = None
    with display.guard("patching"):
        if default_pair:
            result = PatchingResult.from_dict(entry["patching"])
        else:
            result = patching(run, str(run.path), checkpoint, step, clean, corrupted)
        figs["activation patching"] = figure(("patching", str(run.path), checkpoint, step, clean, corrupted),
                                             lambda: plots.patching_figure(result))
        display.chart(figs["activation patching"], key="circuits_patching")
        with st.expander("Patching tables"):
            st.dataframe(result.heads, hide_index=True)
            st.dataframe(result.positions, hide_index=True)

    st.subheader("Direct logit attribution and logit lens")
    with display.guard("attribution"):
        cols = st.columns([2, 1])
        scope = cols[0].radio("Inputs", ["the clean input", "test split", "train split"], horizontal=True,
                              key="circuits_scope", help="A split averages over every input of it (slower for long inputs).")
        neurons = cols[1].checkbox("MLP neurons", value=False, key="circuits_neurons")
        text = clean if scope == "the clean input" else None
        split = "test" if scope != "train split" else "train"
        # towards the clean answer against the corrupted one, when the pair is valid
        against = result.wrong if text is not None and result is not None else None
        key = (str(run.path), checkpoint, step, text, split, neurons, against)
        if default_pair and text is not None and not neurons:  # what the run folder's cache holds
            dla, readings = frame_from_dict(entry["dla"]), frame_from_dict(entry["lens"])
        else:
            with st.spinner("Computing…"):
                dla = attribution(run, *key[:2], step, text, split, neurons, against)
                readings = lens(run, *key[:2], step, text, split)
        figs["direct logit attribution"] = figure(("dla", *key), lambda: plots.attribution_figure(dla))
        figs["logit lens"] = figure(("lens", *key), lambda: plots.logit_lens_figure(readings))
        cols = st.columns([3, 2])
        with cols[0]:
            display.chart(figs["direct logit attribution"], key="circuits_dla")
        with cols[1]:
            display.chart(figs["logit lens"], key="circuits_lens")

    st.subheader("QK and OV circuits (from the weights)")
    fourier = False
    cols = st.columns(2)
    if run.task.name == "modular":
        fourier = cols[0].toggle("Fourier basis", value=False, key="circuits_fourier",
                                 help="Number tokens and outputs in the Fourier basis of Z_p (Nanda et al. 2023).")
    full = cols[1].toggle("Full QK matrix", value=False, key="circuits_full",
                          help="Every query token's row, not only the read token's.")
    qk, ov, composition = weights(run, str(run.path), checkpoint, step, fourier)
    key = (str(run.path), checkpoint, step, fourier)
    figs["QK circuit"] = figure(("qk", *key, full), lambda: plots.qk_circuit_figure(qk, full=full))
    figs["OV circuit"] = figure(("ov", *key), lambda: plots.ov_circuit_figure(ov))
    display.chart(figs["QK circuit"], key="circuits_qk")
    display.chart(figs["OV circuit"], key="circuits_ov")
    if composition is None:
        st.caption("Composition scores compare heads of different layers; this model has one layer.")
    else:
        figs["composition"] = figure(("composition", *key), lambda: plots.composition_figure(composition))
        display.chart(figs["composition"], key="circuits_composition")
downloads.download_figures(figs, "Circuits")
