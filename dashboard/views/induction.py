"""Induction heads (next-token runs): loss by position, in-context learning and head scores over training."""

from __future__ import annotations

import streamlit as st

import lab
from dashboard import background, display, downloads, loading, selection
from lab import plots
from lab.analysis.induction import is_next_token

st.title("Induction heads")
st.caption("Olsson et al. 2022: in small attention-only models, induction heads (attend to the token after the "
           "previous occurrence of the current token, and copy it) form at one point in training, where the loss "
           "shows a bump and in-context learning rises sharply. Head scores are TransformerLens's head_detector "
           "scores (the share of a head's attention on the previous-token, duplicate-token or induction pattern) "
           "on random tokens repeated twice; the in-context-learning score is the loss late in the context minus the "
           "loss early in it, scaled from the paper's tokens 500 and 50 of 512 to the run's context.")


def _stamp(run) -> tuple:
    """Changes when a checkpoint is added or rewritten (the measures are computed over all of them)."""
    steps = loading.checkpoint_steps(run)
    return tuple(steps), tuple(loading.checkpoint_stamp(run, step) for step in steps)


@st.cache_resource(show_spinner=False, max_entries=32)
def history(_run, path: str, stamp):
    """lab.induction_history, on the background thread: a run nobody analysed needs every checkpoint read (a few
    seconds each), so the page answers at once with a notice and draws when it is ready (display.when_ready)."""
    return background.submit(lambda: lab.induction_history(_run))


run = selection.pick_run("Run", key="induction_run")
if run is None:
    st.stop()
figs: dict = {}
with display.guard(run.name):
    if not is_next_token(run.task):
        raise display.PageError(f"the induction measures are for next-token runs (repeated_tokens, text, reverse); "
                                f"this run is task {run.task.name!r}, a classifier: see its Progress, Heads and Circuits pages")
    if not loading.checkpoint_steps(run):
        raise display.PageError("no checkpoint yet; the induction measures appear once training has saved one")
    result = display.when_ready(history(run, str(run.path), _stamp(run)),
                                f"Computing the induction measures over {len(loading.checkpoint_steps(run))} checkpoints "
                                f"of {run.name} in the background; they appear here when ready, and are kept in the run "
                                "folder (`lab analyze RUN` computes them ahead).")
    if result is None:
        st.stop()
    st.markdown(result.summary())
    log_x = st.toggle("log x", value=False, key="induction_log_x")
    figs["induction"] = plots.induction_figure(result, loading.get_metrics(run.path), log_x=log_x)  # = lab.plot_induction(run)
    display.chart(figs["induction"], key="induction_history")

    st.subheader("At a checkpoint")
    step = selection.pick_step(run, key="induction_step")
    if step is not None and step in set(result.measures["step"]):
        figs["loss by position"] = plots.position_loss_figure(result, step)
        display.chart(figs["loss by position"], key="induction_positions")
        if len(result.heads):
            figs["head scores"] = plots.head_scores_figure(result, step)
            display.chart(figs["head scores"], key="induction_heads")
        else:
            st.info(f"No head scores: this run's arch {run.config.model.arch!r} has no attention heads.")
    with st.expander("Table of the measures"):
        st.dataframe(result.measures, hide_index=True)
downloads.download_figures(figs, "Induction heads")
