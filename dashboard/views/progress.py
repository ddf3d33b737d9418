"""Progress measures (modular runs): Fourier norms, key frequencies, restricted/excluded loss, Gini, weight norm."""

from __future__ import annotations

import streamlit as st

import lab
from dashboard import background, display, downloads, loading, selection
from lab import plots
from lab.analysis.progress import fourier_at

st.title("Progress measures")
st.caption("Nanda et al. 2023: the model learns a few key frequencies; restricted loss (only those) falls before "
           "test loss does, excluded loss (all but those) rises, and the Gini coefficients of the Fourier norms grow "
           "as the embedding becomes sparse in the Fourier basis. By default the paper's definitions, as its notebook "
           "computes them: the key frequencies are every neuron's best frequency at the last checkpoint; restricted "
           "loss keeps only their cos/sin(w(a+b)) terms of the logits and is scored on all p² pairs, excluded loss "
           "removes them and is scored on the train pairs.")


def _stamp(run) -> tuple:
    """Changes when a checkpoint is added or rewritten (the measures are computed over all of them)."""
    steps = loading.checkpoint_steps(run)
    return tuple(steps), loading.checkpoint_stamp(run, steps[-1]) if steps else None


@st.cache_resource(show_spinner=False, max_entries=32)
def measures(_run, path: str, stamp, definition: str = "paper"):
    """lab.progress_measures, on the background thread: for a run nobody analysed it reads every checkpoint
    (15 s for modadd_quick), and the page answers at once with a notice instead (display.when_ready)."""
    return background.submit(lambda: lab.progress_measures(_run, progress=False, definition=definition))


def _fourier(run, step: int):
    return fourier_at(run, step)  # from the run's progress-measures cache when `lab analyze` filled it


@st.cache_resource(show_spinner=False, max_entries=8)
def fourier_prefetcher(_run, path: str, stamp) -> background.Prefetcher:
    """The Fourier norms and key frequencies at every checkpoint, computed in the background from the
    last step outwards, so that scrubbing the slider answers from memory."""
    steps = list(stamp[0])
    return background.Prefetcher(lambda step: _fourier(_run, step), background.by_distance(steps, steps[-1]))


def fourier(run, step: int):
    prefetcher = fourier_prefetcher(run, str(run.path), _stamp(run))
    result = prefetcher.get(step)
    if result is None:  # not reached by the background thread yet
        result = _fourier(run, step)
        prefetcher.put(step, result)
    return result


run = selection.pick_run("Run", task="modular", key="progress_run")
if run is None:
    st.stop()
figs: dict = {}
with display.guard(run.name):
    if not loading.checkpoint_steps(run):
        raise display.PageError("no checkpoint yet; progress measures appear once training has saved one")
    definition = st.radio("Definition", ["paper", "tl_demo"], horizontal=True, key="progress_definition",
                          format_func={"paper": "the paper's (logits; restricted on all pairs)",
                                       "tl_demo": "TransformerLens demo (neurons through W_L; restricted on test)"}.get,
                          help="paper: Nanda et al.'s notebook projects the logits onto the key frequencies' "
                               "cos/sin(w(a+b)). tl_demo: TransformerLens's Grokking demo projects the neuron "
                               "activations and passes them through W_out W_U, so the direct and attention paths' "
                               "key-frequency terms stay in the excluded logits; its restricted loss is on the test split.")
    df = display.when_ready(measures(run, str(run.path), _stamp(run), definition),
                            f"Computing the progress measures over {len(loading.checkpoint_steps(run))} checkpoints of "
                            f"{run.name} in the background; they appear here when ready, and are kept in the run "
                            "folder (`lab analyze RUN` computes them ahead).")
    if df is None:
        st.stop()
    log_x = st.toggle("log x", value=False, key="progress_log_x")
    figs["progress measures"] = plots.progress_figure(df, log_x=log_x)  # the figure `lab.plot_progress(run)` returns
    display.chart(figs["progress measures"], key="progress_measures")

    st.subheader("Fourier basis at a checkpoint")
    step = selection.pick_step(run, key="progress_step")
    if step is not None:
        norms, keys = fourier(run, step)
        figs["fourier norms"] = plots.fourier_norms_figure(norms, keys["frequency"], step=step)
        display.chart(figs["fourier norms"], key="progress_fourier")
        if keys.empty:
            st.info("No key frequencies yet at this step.")
        else:
            figs["key frequencies"] = plots.key_frequencies_figure(keys, step=step)
            display.chart(figs["key frequencies"], key="progress_keys")
    with st.expander("Table of the measures"):
        st.dataframe(df, hide_index=True)
downloads.download_figures(figs, "Progress measures")
