"""Attention: per-head attention patterns of one run at any checkpoint, on a sentence the user types
(a_and_b, text) or a pair a, b (modular), plus the model's prediction; for a text run (a next-token
model), the likeliest next words after every word and a box that samples a continuation."""

from __future__ import annotations

import html

import streamlit as st

import lab
from dashboard import background, display, downloads, loading, selection
from lab import plots
from lab.models.prediction import probability_text

st.title("Attention")

TEXT_DEFAULT = "To be, or not to be, that is the question"


@st.cache_data(show_spinner=False, max_entries=512)
def attention(_run, path: str, stamp, step: int, text: str):
    return lab.attention(_run, text, step=step)


@st.cache_resource(show_spinner=False, max_entries=8)
def grid_prefetcher(_run, path: str, steps: tuple, stamp) -> background.Prefetcher:
    """Attention over all (a, b) at every checkpoint, computed in the background from the last step
    outwards, so that scrubbing the slider answers from memory."""
    return background.Prefetcher(lambda step: lab.modular_attention_grid(_run, step=step),
                                 background.by_distance(list(steps), steps[-1]))


def modular_grid(run, step: int):
    steps = tuple(loading.checkpoint_steps(run))
    prefetcher = grid_prefetcher(run, str(run.path), steps, loading.checkpoint_stamp(run, steps[-1]))
    grid = prefetcher.get(step)
    if grid is None:  # not reached by the background thread yet
        with st.spinner("Running the model on all (a, b)…"):
            grid = lab.modular_attention_grid(run, step=step)
        prefetcher.put(step, grid)
    return grid


def cls_highlight(pattern, tokens: list[str]) -> str:
    """The classification token's attention over the characters, one line per head, as highlighted text."""
    lines = []
    n_layers, n_heads = pattern.shape[:2]
    for layer in range(n_layers):
        for head in range(n_heads):
            weights = pattern[layer, head, 0, 1:].tolist()
            spans = []
            for char, w in zip(tokens[1:], weights):
                alpha = max(0.0, min(1.0, w)) ** 0.5  # absolute 0..1 (comparable across heads), √ so small weights show
                spans.append(
                    f'<span title="{w:.4f}" style="background: rgba(255, 120, 0, {alpha:.3f}); padding: 2px 1px; '
                    f'font-family: monospace; font-size: 1.15em">{html.escape(char)}</span>'
                )
            self_mass = float(pattern[layer, head, 0, 0])
            lines.append(f'<div style="margin: 4px 0"><b>L{layer}H{head}</b>&nbsp;&nbsp;{"".join(spans)}'
                         f'&nbsp;&nbsp;<small>(on &lt;cls&gt; itself: {self_mass:.3f})</small></div>')
    return "".join(lines)


def inputs(run):
    """The checkpoint and the text to run (from the typed sentence, or from a and b)."""
    task = run.task
    step = selection.pick_step(run, key="attn_step")
    if step is None:
        return None, None
    if task.name == "modular":
        cols = st.columns(2)
        a = cols[0].number_input("a", min_value=0, max_value=task.p - 1, value=min(5, task.p - 1), step=1, key="attn_a")
        b = cols[1].number_input("b", min_value=0, max_value=task.p - 1, value=min(7, task.p - 1), step=1, key="attn_b")
        return step, f"{int(a)} {task.symbol} {int(b)} ="
    if task.read_position is None:  # a next-token run: words, not an alphabet
        text = st.text_input("Sentence", value=TEXT_DEFAULT, key="attn_text",
                             help=f"Any text; words this run's vocabulary lacks are read as <unk>. Up to {task.n_ctx} tokens.")
        return step, text
    alphabet = getattr(task, "alphabet", "")
    default = "grab a cab" if all(c in alphabet for c in "grab a cab") else "ab" + alphabet.replace("a", "").replace("b", "")[:3]
    text = st.text_input("Sentence", value=default, key="attn_text",
                         help=f"Characters from the alphabet {alphabet!r}; up to {task.config.max_len} of them.")
    return step, text


def patterns(run, step: int, text: str, figs: dict) -> None:
    task = run.task
    result = attention(run, str(run.path), loading.checkpoint_stamp(run, step), step, text)
    if task.read_position is None:
        cols = st.columns(3)
        cols[0].metric("Next word", result.prediction)
        cols[1].metric("Probability", probability_text(result.probability))
        cols[2].metric("Tokens", len(result.tokens))
        if result.unknown:
            st.warning(result.unknown_note, icon="❔")
    else:
        answer = task.label_names[task.label(result.token_ids)]
        cols = st.columns(3)
        cols[0].metric("Prediction", result.prediction)
        cols[1].metric("Probability", probability_text(result.probability))
        right = answer == result.prediction
        cols[2].metric("Correct answer", answer, delta="model is right" if right else "model is wrong",
                       delta_color="green" if right else "red", delta_arrow="off")
    if result.mask is not None:
        st.caption("Grey cells are masked: a causal model's query cannot see a later key (that is not zero attention).")
    figs["attention"] = plots.attention_figure(result, run.name)
    if len(result.tokens) <= plots.LONG_INPUT:
        display.chart(figs["attention"], key="attn_heatmaps")
    else:  # a long input: first the one row that decides the answer, readable, then the whole grid
        figs["read position"] = plots.read_attention_figure(result, task.read_position, run.name)
        display.chart(figs["read position"], key="attn_read_strip")
        n = len(result.tokens)
        st.caption(f"{n} positions" + (f": the strip shows {plots.STRIP_WINDOW} at a time (drag the slider under "
                                       "it to move along)" if n > plots.STRIP_WINDOW else "")
                   + ". Below, every head's full grid, one per row, in a scrollable box; drag a rectangle on a grid "
                   "to zoom into it, double-click to zoom out.")
        with st.container(height=720):
            display.chart(figs["attention"], key="attn_heatmaps")
    if task.read_position is None:
        st.subheader("The likeliest next words")
        st.caption(f"After each word of the sentence, the model's {len(result.top_next[0])} likeliest next words "
                   "with their probabilities; hover a row for the probability it gave the word typed next.")
        figs["next words"] = plots.next_tokens_figure(result, run.name)
        display.chart(figs["next words"], key="attn_next_words")
    if task.name == "a_and_b":
        st.subheader("What the classification token reads")
        st.caption("Each character shaded by the attention <cls> puts on it: white 0, full orange 1 (square-root "
                   "scale, so that small weights still show); hover a character for the exact value.")
        st.markdown(cls_highlight(result.pattern, result.tokens), unsafe_allow_html=True)


SAMPLE_MAX = 400  # tokens per sample: seconds on a CPU for the shipped text model


def sample_box(run, step: int, sentence: str) -> None:
    """A prompt, a length and a temperature, and a button that samples a continuation from the checkpoint."""
    st.subheader("Sample a continuation")
    with st.form("attn_sample_form", border=True):
        prompt = st.text_input("Prompt", value=sentence, key="attn_prompt")
        cols = st.columns(2)
        n = cols[0].number_input("Length (tokens)", min_value=1, max_value=SAMPLE_MAX, value=20, step=1, key="attn_n")
        temperature = cols[1].number_input("Temperature", min_value=0.0, max_value=5.0, value=1.0, step=0.1, key="attn_temperature",
                                           help="0: always the likeliest next word; 1: the model's own distribution; above 1: wilder.")
        sampled = st.form_submit_button("Sample")
    if sampled:
        continuation = run.generate(prompt, n=int(n), temperature=float(temperature), step=step)
        st.session_state["attn_sample"] = (run.name, step, run.task.decode(run.task.encode(prompt)), continuation)
    shown = st.session_state.get("attn_sample")
    if shown and shown[:2] == (run.name, step):  # the last sample of this checkpoint: the prompt as the model read it, in bold
        st.markdown(sample_html(*shown[2:]), unsafe_allow_html=True)


def sample_html(prompt: str, continuation: str) -> str:
    """The prompt in bold and its continuation, line breaks kept (a play's verse lines)."""
    return f"<b>{html.escape(prompt)}</b>{html.escape(continuation)}".replace("\n", "<br>")


def pairs_grid(run, step: int, figs: dict) -> None:
    grid = modular_grid(run, step)
    st.subheader("Attention from `=` to `a` over all (a, b)")
    st.caption("Rows a, columns b. A head that reads a and b through Fourier features shows periodic stripes "
               "(Nanda et al. 2023); scrub the checkpoint slider to watch them form.")
    figs["attention over all pairs"] = plots.modular_attention_figure(grid, run.name, step)
    display.chart(figs["attention over all pairs"], key="attn_modular_grid")


run = selection.pick_run("Run", key="attn_run")
if run is None:
    st.stop()
step = text = None
with display.guard(run.name):
    step, text = inputs(run)
if step is None:
    st.stop()
figs: dict = {}
with display.guard():  # bad text: the task's one-line ValueError, shown as an error, never a traceback
    patterns(run, step, text, figs)
if run.task.name == "modular":
    with display.guard(run.name):
        pairs_grid(run, step, figs)
if run.task.read_position is None:
    with display.guard():  # a bad prompt: one line
        sample_box(run, step, text)
downloads.download_figures(figs, "Attention")
