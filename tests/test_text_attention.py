"""Attention over the words of a sentence, the next words a text model expects, and sampling from it
(issue 16, item 3): `lab.attention` and `lab.plot_attention` / `lab.plot_next_tokens` on a text run,
`run.generate`, and the Attention page for a text run under Streamlit's AppTest. The run is a real one:
a tiny word-level model trained on four lines of Hamlet (tests/dashboard_runs.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import dashboard_runs
import lab
from test_dashboard import app, arr, errors, goto, no_exception, specs  # noqa: F401  (app is a fixture)

SENTENCE = "To be, or not to be, that is the question"
WORDS = ["To", "be", ",", "or", "not", "to", "be", ",", "that", "is", "the", "question"]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    return lab.load_run(dashboard_runs.shared_text_run(tmp_path_factory))


def _logits(run, text: str, step=None) -> torch.Tensor:
    """The model's own logits (pos, vocab) at every position of `text`: the full forward, no hooks."""
    with torch.no_grad():
        return run.model(step)(torch.tensor([run.task.encode(text)]))[0].double()


def test_attention_over_words_has_the_causal_mask_and_the_top_five_next_words(text_run):
    result = lab.attention(text_run, SENTENCE)
    n = len(WORDS)
    assert result.tokens == WORDS and result.pattern.shape == (2, 2, n, n) and result.step == 40
    # the mask: a query sees itself and earlier keys only; the pattern is 0 beyond it and each row sums to 1
    assert torch.equal(result.mask, torch.ones(n, n, dtype=torch.bool).triu(1))
    assert torch.all(result.pattern[..., result.mask] == 0)
    torch.testing.assert_close(result.pattern.sum(-1), torch.ones(2, 2, n))
    # the five likeliest next words at every position: the model's own softmax, likeliest first
    probs = _logits(text_run, SENTENCE).softmax(-1)
    top = probs.topk(5, dim=-1)
    assert len(result.top_next) == n and all(len(row) == 5 for row in result.top_next)
    for pos, row in enumerate(result.top_next):
        assert text_run.task.token_labels(top.indices[pos].tolist()) == [label for label, _ in row]  # "\n" as "↵"
        assert [p for _, p in row] == pytest.approx(top.values[pos].tolist(), abs=1e-6)
        assert sum(p for _, p in row) <= 1 + 1e-9 and row[0][1] >= row[-1][1]
    ids = text_run.task.encode(SENTENCE)
    assert result.typed_next_probability == pytest.approx([probs[pos, ids[pos + 1]].item() for pos in range(n - 1)], abs=1e-6)
    assert (result.prediction, result.probability) == (result.top_next[-1][0][0], pytest.approx(result.top_next[-1][0][1]))
    assert result.top_next[1][0][0] == ","  # trained on these lines: after "To be" comes ","
    assert lab.attention(text_run, "in the mind to suffer").prediction == "↵"  # then a line break, as it is shown
    assert not result.unknown and result.unknown_note == ""
    table = result.top_next_table()
    assert list(table["token"]) == WORDS and list(table["#1"]) == [row[0][0] for row in result.top_next]
    # an earlier checkpoint is another model
    assert not torch.allclose(lab.attention(text_run, SENTENCE, step=0).pattern, result.pattern)


def test_pattern_and_next_words_are_transformer_lens_own_on_the_same_weights(text_run):
    """TransformerLens defines the attention pattern (`hook_pattern`, masked keys 0, rows summing to 1) and the
    next-token logits: its bridge, exported from the run's model, gives the same numbers."""
    result = lab.attention(text_run, SENTENCE)
    bridge = lab.to_transformer_lens(text_run.model())
    logits, cache = bridge.run_with_cache(torch.tensor([result.token_ids]))
    pattern = torch.stack([cache["pattern", layer][0] for layer in range(2)])  # (layer, head, query, key)
    torch.testing.assert_close(pattern.float(), result.pattern, atol=1e-6, rtol=0)
    top = logits[0].double().softmax(-1).topk(5)
    torch.testing.assert_close(torch.tensor([[p for _, p in row] for row in result.top_next], dtype=torch.float64), top.values, atol=1e-6, rtol=0)
    assert [[label for label, _ in row] for row in result.top_next] == [text_run.task.token_labels(i) for i in top.indices.tolist()]


def test_unknown_words_are_read_as_unk_and_named(text_run):
    result = lab.attention(text_run, "To be, Rosencrantz, or xyzzy")
    assert result.tokens == ["To", "be", ",", "<unk>", ",", "or", "<unk>"]
    assert result.unknown == ["Rosencrantz", "xyzzy"]
    assert result.unknown_note == "Not in this run's vocabulary, so read as <unk>: 'Rosencrantz', 'xyzzy'"
    with pytest.raises(ValueError, match="this model reads 1 to 16 words"):
        lab.attention(text_run, " ".join(["to be"] * 9))  # 18 tokens, above n_ctx


def test_figures_label_the_words_and_grey_out_the_mask(text_run):
    from lab.plots import MASKED_COLOR, next_tokens_figure

    result = lab.attention(text_run, SENTENCE)
    fig = lab.plot_attention(text_run, SENTENCE)
    assert len(fig.data) == 4 and list(fig.layout.xaxis.ticktext) == WORDS and list(fig.layout.yaxis.ticktext) == WORDS
    z = np.asarray(fig.data[0].z, dtype=float)
    assert np.array_equal(np.isnan(z), result.mask.numpy())  # masked cells are empty (grey), not zero attention
    assert np.allclose(z[~result.mask.numpy()], result.pattern[0, 0][~result.mask].numpy())
    assert fig.layout.plot_bgcolor == MASKED_COLOR and "grey: masked" in fig.layout.title.text

    table = lab.plot_next_tokens(text_run, SENTENCE)
    assert list(table.layout.xaxis.ticktext) == ["#1", "#2", "#3", "#4", "#5", "typed next"]
    assert list(table.layout.yaxis.ticktext) == [f"{i}:{w}" for i, w in enumerate(WORDS)]
    first = result.top_next[1][0]
    assert table.data[0].text[1][0] == f"{first[0]} {first[1]:.2f}" and table.data[0].text[1][5].startswith(", ")
    strip = lab.plot_read_attention(text_run, SENTENCE)  # long inputs: what the last word reads
    assert "what question reads" in strip.layout.title.text and strip.layout.xaxis.title.text == "position: token"
    assert [t.removeprefix("<br>") for t in strip.layout.xaxis.ticktext] == WORDS  # a long word drops a line
    with pytest.raises(ValueError, match="next-token runs"):
        next_tokens_figure(dataclasses.replace(result, top_next=[]), "run")  # a classifier's result


def test_generate_is_greedy_at_temperature_zero_and_repeatable_with_a_seed(text_run):
    task, model = text_run.task, text_run.model()
    # greedy: the argmax of the model's full forward, one token at a time, the context cropped to n_ctx (16)
    tokens = task.encode("To be")
    for _ in range(20):
        with torch.no_grad():
            tokens.append(int(model(torch.tensor([tokens[-16:]]))[0, -1].argmax()))
    greedy = text_run.generate("To be", n=20, temperature=0)
    assert "To be" + greedy == task.decode(tokens) and greedy.startswith(", or not to be, that is the question:\nWhether")
    assert text_run.generate("To be", n=20, temperature=1e-320) == greedy  # logits / temperature overflow: greedy
    # sampling: the same seed, the same text; the untrained model (step 0) is near uniform, so seeds differ
    samples = [text_run.generate("To be", n=10, seed=seed, step=0) for seed in (7, 7, 8, 9)]
    assert samples[0] == samples[1] and len(set(samples)) == 3
    assert len(text_run.task.encode(samples[0])) >= 8  # ~10 tokens (an apostrophe may join its neighbours)


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -0.5}, "temperature=-0.5 is not valid: give a number >= 0"),
    ({"temperature": float("nan")}, "temperature=nan is not valid"),
    ({"temperature": "hot"}, "temperature='hot' is not valid"),
    ({"n": 0}, "n=0 is not a number of tokens to sample: give a whole number >= 1"),
    ({"n": 2.5}, "n=2.5 is not a number"),
    ({"n": True}, "n=True is not a number"),
    ({"seed": "abc"}, "seed='abc' is not valid: give a whole number"),
])
def test_generate_refuses_bad_settings_in_one_line(text_run, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as err:
        text_run.generate("To be", **kwargs)
    assert "\n" not in str(err.value)


def test_generate_refuses_a_classifier_and_an_empty_prompt(text_run, tmp_path_factory):
    folder, made = dashboard_runs.shared_runs(tmp_path_factory)
    with pytest.raises(ValueError, match="is a 'modular' classifier: use run.predict"):
        lab.load_run(made["mod"]).generate("1 + 2 =")
    with pytest.raises(ValueError, match="0 tokens"):
        text_run.generate("   ")


def test_attention_page_for_a_text_run(text_run, app):  # noqa: F811
    at = goto(app(text_run.path.parent).run(), "attention")
    no_exception(at)
    assert not errors(at)
    grid = next(s for s in specs(at) if "attention per head" in s["layout"]["title"]["text"])
    assert grid["layout"]["xaxis"]["ticktext"] == WORDS and grid["layout"]["yaxis"]["ticktext"] == WORDS
    assert np.isnan(arr(grid["data"][0]["z"]).astype(float)[0, 1])  # the mask: the first word sees no later one
    words = next(s for s in specs(at) if "likeliest next tokens" in s["layout"]["title"]["text"])
    assert words["layout"]["yaxis"]["ticktext"][:2] == ["0:To", "1:be"]
    assert {m.label for m in at.metric} >= {"Next word", "Probability"}

    at.text_input(key="attn_text").set_value("To be, Rosencrantz,").run()
    no_exception(at)
    assert any("'Rosencrantz'" in w.value and "<unk>" in w.value for w in at.warning)
    grid = next(s for s in specs(at) if "attention per head" in s["layout"]["title"]["text"])
    assert grid["layout"]["xaxis"]["ticktext"] == ["To", "be", ",", "<unk>", ","]

    at.text_input(key="attn_prompt").set_value("To be")
    at.number_input(key="attn_temperature").set_value(0.0)
    at.number_input(key="attn_n").set_value(12)
    sample(at)
    no_exception(at)
    expected = text_run.generate("To be", n=12, temperature=0)
    assert expected == ", or not to be, that is the question:\n"
    assert any(m.value == "<b>To be</b>, or not to be, that is the question:<br>" for m in at.markdown), [m.value for m in at.markdown]

    at.number_input(key="attn_temperature").set_value(1.0)
    at.text_input(key="attn_prompt").set_value("")
    sample(at)
    no_exception(at)
    assert any("0 tokens" in e for e in errors(at))


def sample(at):
    """Click the page's Sample button (the sampling form's submit button) and run the page."""
    next(b for b in at.button if b.label == "Sample").click()
    return at.run()
