"""Curves: train and test loss and accuracy against step for the selected runs, overlaid."""

from __future__ import annotations

import streamlit as st

from dashboard import display, downloads, loading, selection, state
from lab import plots
from lab.runs.outcomes import reached_text

st.title("Curves")
paths = selection.selected_paths()
if not paths:
    if state.rows().empty:
        selection.no_runs_message()
    else:
        st.info("Select one or more runs in the sidebar (or on the Runs page).")
    st.stop()

cols = st.columns([1, 1, 1, 2])
log_x = cols[0].toggle("log x", value=True, key="curves_log_x", help="Grokking plots are read on a log step axis.")
log_y_loss = cols[1].toggle("log y (loss)", value=True, key="curves_log_y_loss")
log_y_acc = cols[2].toggle("log y (accuracy)", value=False, key="curves_log_y_acc")
smoothing = cols[3].slider("Smoothing (debiased EMA, as in TensorBoard)", 0.0, 0.99, 0.0, 0.01, key="curves_smoothing")


@st.fragment(run_every=selection.live_interval(paths))
def curves() -> None:
    metrics, events = {}, {}
    for name, path in paths.items():
        with display.guard(name):
            df = loading.get_metrics(path)
            events[name] = loading.summary(loading.get_run(path))
            if df.empty:
                st.info(f"{name}: no metrics yet (training writes the first row at step 0).")
                continue
            metrics[name] = df
    if not metrics:
        return
    colors = plots.run_colors(metrics)
    figs = {
        "loss": plots.curves_figure(metrics, "loss", log_x=log_x, log_y=log_y_loss, smoothing=smoothing,
                                      events=events, colors=colors),
        "accuracy": plots.curves_figure(metrics, "accuracy", log_x=log_x, log_y=log_y_acc, smoothing=smoothing,
                                          events=events, colors=colors),
        "weight norm": plots.weight_norm_figure(metrics, log_x=log_x, colors=colors),
    }
    display.chart(figs["loss"], key="curves_loss")
    display.chart(figs["accuracy"], key="curves_accuracy")
    display.chart(figs["weight norm"], key="curves_weight_norm")
    lines = []
    for name, ev in events.items():
        ran = ev.get("step")
        lines.append(f"**{name}**: {ev.get('status', '?')}, {reached_text('memorized', ev.get('memorize_step'), ran)}, "
                     f"{reached_text('grokked', ev.get('grok_step'), ran)}")
    st.caption("Markers: ● memorized (train accuracy ≥ 99%), ★ grokked (test accuracy ≥ 99%). "
               + ("Step 0 is not shown on a log axis. " if log_x else "") + " · ".join(lines))
    st.session_state["_curves_figures"] = figs


curves()
downloads.download_figures(st.session_state.get("_curves_figures", {}), "Curves")
