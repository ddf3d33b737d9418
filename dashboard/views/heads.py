"""Heads: what ablating each head does to loss and accuracy; for a_and_b, where <cls> looks.

Every table comes from `lab.ablate_heads` / `lab.letter_attention`, which cache per checkpoint in
the run folder (`lab demo` fills that cache before the dashboard opens, via `lab.analysis.heads.
precompute_heads`). While the page is open, a background thread computes every split and method at
the checkpoints nearest the one shown, so moving the slider or a radio button answers from memory;
a checkpoint not reached yet is computed on the spot under a spinner (about a second, cold).
"""

from __future__ import annotations

import streamlit as st

import lab
from dashboard import background, display, downloads, loading, selection
from lab import plots
from lab.analysis.ablation import METHODS

st.title("Heads")
SPLITS = ("test", "train")


def tables_at(run, step: int) -> dict:
    """Every table the page can show at one checkpoint: (split, method) -> ablation, ("letters", split) -> letters."""
    tables = {(split, method): lab.ablate_heads(run, split=split, method=method, step=step)
              for split in SPLITS for method in METHODS}
    if run.task.name == "a_and_b":
        tables.update({("letters", split): lab.letter_attention(run, step=step, split=split) for split in SPLITS})
    return tables


def _stamp(run) -> tuple:
    """Changes when a checkpoint is added or rewritten."""
    steps = loading.checkpoint_steps(run)
    return tuple(steps), tuple(loading.checkpoint_stamp(run, step) for step in steps)


@st.cache_resource(show_spinner=False, max_entries=8)
def heads_prefetcher(_run, path: str, stamp) -> background.Prefetcher:
    """All tables at every checkpoint, computed in the background from the last step outwards."""
    steps = list(stamp[0])
    return background.Prefetcher(lambda step: tables_at(_run, step), background.by_distance(steps, steps[-1]))


@st.cache_data(show_spinner=False, max_entries=128)
def ablation(_run, path: str, stamp, step: int, split: str, method: str):
    return lab.ablate_heads(_run, split=split, method=method, step=step)


@st.cache_data(show_spinner=False, max_entries=128)
def letters(_run, path: str, stamp, step: int, split: str):
    return lab.letter_attention(_run, step=step, split=split)


def table(run, step: int, key: tuple):
    """One table: from the background thread's results, else computed now (run-folder cache first)."""
    stamp = _stamp(run)
    prefetcher = heads_prefetcher(run, str(run.path), stamp)
    what = f"letter attention ({key[1]})" if key[0] == "letters" else f"{key[1]}-ablating each head ({key[0]})"
    with st.spinner(f"Computing {what} at step {step}…"):
        tables = prefetcher.get(step)  # waits if the thread is computing this step right now
        if tables is not None:
            return tables[key]
        checkpoint = loading.checkpoint_stamp(run, step)
        if key[0] == "letters":
            return letters(run, str(run.path), checkpoint, step, key[1])
        return ablation(run, str(run.path), checkpoint, step, *key)


run = selection.pick_run("Run", key="heads_run")
if run is None:
    st.stop()
figs: dict = {}
with display.guard(run.name):
    display.classification_only(run, "Heads")
    step = selection.pick_step(run, key="heads_step")
    if step is None:
        st.stop()
    cols = st.columns(2)
    split = cols[0].radio("Split", list(SPLITS), horizontal=True, key="heads_split")
    method = cols[1].radio("Ablation", list(METHODS), horizontal=True, key="heads_method",
                           help="zero: the head's output is replaced by 0; mean: by its mean over the split. "
                                "Exact: every input of the split.")
    ablated = table(run, step, (split, method))
    figs["ablation"] = plots.ablation_figure(ablated, title=plots.ablation_title(run.name, step, method, split))
    display.chart(figs["ablation"], key="heads_ablation")
    with st.expander("Ablation table"):
        st.dataframe(ablated, hide_index=True)
    if run.task.name == "a_and_b":
        mass = table(run, step, ("letters", split))
        figs["letter attention"] = plots.letter_attention_figure(mass)
        display.chart(figs["letter attention"], key="heads_letters")
        with st.expander("Letter attention table"):
            st.dataframe(mass, hide_index=True)
downloads.download_figures(figs, "Heads")
