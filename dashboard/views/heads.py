"""Heads: what ablating each head does to loss and accuracy; for a_and_b, where <cls> looks."""

from __future__ import annotations

import streamlit as st

import lab
from dashboard import common, figures

st.title("Heads")


@st.cache_data(show_spinner="Ablating heads…", max_entries=128)
def ablation(_run, path: str, stamp, step: int, split: str, method: str):
    return lab.ablate_heads(_run, split=split, method=method, step=step)


@st.cache_data(show_spinner=False, max_entries=128)
def letters(_run, path: str, stamp, step: int, split: str):
    return lab.letter_attention(_run, step=step, split=split)


run = common.pick_run("Run", key="heads_run")
if run is None:
    st.stop()
figs: dict = {}
with common.guard(run.name):
    step = common.pick_step(run, key="heads_step")
    if step is None:
        st.stop()
    cols = st.columns(2)
    split = cols[0].radio("Split", ["test", "train"], horizontal=True, key="heads_split")
    method = cols[1].radio("Ablation", ["zero", "mean"], horizontal=True, key="heads_method",
                           help="zero: the head's output is replaced by 0; mean: by its mean over the split.")
    stamp = common.checkpoint_stamp(run, step)
    table = ablation(run, str(run.path), stamp, step, split, method)
    figs["ablation"] = figures.ablation_figure(table, title=f"{run.name}, step {step}: {method}-ablating one head ({split})")
    common.chart(figs["ablation"], key="heads_ablation")
    with st.expander("Ablation table"):
        st.dataframe(table, hide_index=True)
    if run.task.name == "a_and_b":
        mass = letters(run, str(run.path), stamp, step, split)
        figs["letter attention"] = figures.letter_attention_figure(mass)
        common.chart(figs["letter attention"], key="heads_letters")
        with st.expander("Letter attention table"):
            st.dataframe(mass, hide_index=True)
common.download_figures(figs, "Heads")
