"""Progress measures (modular runs): Fourier norms, key frequencies, restricted/excluded loss, Gini, weight norm."""

from __future__ import annotations

import streamlit as st

import lab
from dashboard import common, figures

st.title("Progress measures")
st.caption("Nanda et al. 2023: the model learns a few key frequencies; restricted loss (only those) falls before "
           "test loss does, excluded loss (all but those) rises, and the Gini coefficients of the Fourier norms grow "
           "as the embedding becomes sparse in the Fourier basis.")


def _stamp(run) -> tuple:
    """Changes when a checkpoint is added or rewritten (the measures are computed over all of them)."""
    steps = common.checkpoint_steps(run)
    return tuple(steps), common.checkpoint_stamp(run, steps[-1]) if steps else None


@st.cache_data(show_spinner="Computing progress measures over every checkpoint (cached in the run folder)…",
               max_entries=32)
def measures(_run, path: str, stamp):
    return lab.progress_measures(_run, progress=False)


@st.cache_data(show_spinner=False, max_entries=256)
def fourier(_run, path: str, stamp, step: int):
    return lab.fourier_norms(_run, step=step), lab.key_frequencies(_run, step=step)


run = common.pick_run("Run", task="modular", key="progress_run")
if run is None:
    st.stop()
figs: dict = {}
with common.guard(run.name):
    if not common.checkpoint_steps(run):
        raise common.PageError("no checkpoint yet; progress measures appear once training has saved one")
    df = measures(run, str(run.path), _stamp(run))
    log_x = st.toggle("log x", value=False, key="progress_log_x")
    figs["losses"] = figures.progress_losses_figure(df, log_x=log_x)
    figs["gini and weights"] = figures.progress_measures_figure(df, log_x=log_x)
    common.chart(figs["losses"], key="progress_losses")
    common.chart(figs["gini and weights"], key="progress_gini")

    st.subheader("Fourier basis at a checkpoint")
    step = common.pick_step(run, key="progress_step")
    if step is not None:
        norms, keys = fourier(run, str(run.path), common.checkpoint_stamp(run, step), step)
        figs["fourier norms"] = figures.fourier_norms_figure(norms, keys["frequency"], step=step)
        common.chart(figs["fourier norms"], key="progress_fourier")
        if keys.empty:
            st.info("No key frequencies yet at this step.")
        else:
            figs["key frequencies"] = figures.key_frequencies_figure(keys, step=step)
            common.chart(figs["key frequencies"], key="progress_keys")
    with st.expander("Table of the measures"):
        st.dataframe(df, hide_index=True)
common.download_figures(figs, "Progress measures")
