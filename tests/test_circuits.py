"""The Circuits analyses (issue 18): activation patching, direct logit attribution, the logit lens, QK / OV
circuits and composition scores, each checked against TransformerLens on the exported TransformerBridge of
the same weights (the field's numbers); the per-checkpoint history and its cache; the one-line refusals;
the figures; and the Circuits dashboard page."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import lab
from runs_for_tests import a_and_b_run, grokked_run, tiny_modular_run  # noqa: F401  (fixtures)


def random_model(*overrides: str):
    """A small modular model with non-trivial biases and LayerNorm weights (so every term is tested), and its task."""
    from lab.config import load_experiment
    from lab.tasks import make_task

    config = load_experiment("modadd_quick", ["task.p=11", "model.d_model=16", "model.d_head=4", "model.d_mlp=32",
                                              *overrides]).resolve()
    model = lab.Transformer(config.model).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.rsplit(".", 1)[-1].startswith("W_"):
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    return model, make_task(config.task)


def folded_final_ln(model):
    """The same function with the final LayerNorm's weight and bias folded into W_U and b_U, as TransformerLens's
    `fold_ln` does: `cache.logit_attrs` assumes folded weights."""
    folded = copy.deepcopy(model)
    with torch.no_grad():
        folded.b_U += folded.ln_final.b @ folded.W_U
        folded.W_U *= folded.ln_final.w[:, None]
        folded.ln_final.w.fill_(1.0)
        folded.ln_final.b.zero_()
    return folded


# --- 1. activation patching = transformer_lens.patching ---------------------------------------------------


def tl_patching(model, task, clean: str, corrupted: str):
    """TransformerLens's get_act_patch_block_every and get_act_patch_attn_head_all_pos_every on the bridge."""
    from transformer_lens import patching

    bridge = lab.to_transformer_lens(model)
    clean_tokens, corrupted_tokens = task.encode_batch([clean]), task.encode_batch([corrupted])
    _, cache = bridge.run_with_cache(clean_tokens)
    answer, wrong, read = task.label(clean_tokens[0]), task.label(corrupted_tokens[0]), task.read_position

    def metric(logits):
        return logits[0, read, answer] - logits[0, read, wrong]

    if model.cfg.attn_only:  # get_act_patch_block_every needs mlp_out: its first two parts, one by one
        block = torch.stack([patching.get_act_patch_resid_pre(bridge, corrupted_tokens, cache, metric),
                             patching.get_act_patch_attn_out(bridge, corrupted_tokens, cache, metric)])
    else:
        block = patching.get_act_patch_block_every(bridge, corrupted_tokens, cache, metric)
    return block, patching.get_act_patch_attn_head_all_pos_every(bridge, corrupted_tokens, cache, metric)


@pytest.mark.parametrize("overrides", [["model.n_layers=2", "model.normalization=LN"], ["model.attn_only=true"]])
def test_patching_equals_transformer_lens(overrides):
    model, task = random_model(*overrides)
    ours = lab.activation_patching(model, task=task)
    block, heads = tl_patching(model, task, ours.clean, ours.corrupted)
    sites = ["resid_pre", "attn_out", "mlp_out"][: len(block)]  # an attention-only model has no mlp_out
    assert torch.allclose(torch.stack([ours.grid(s, "value") for s in sites]).float(), block, atol=1e-5)
    ours_heads = torch.stack([ours.head_grid(s, "value") for s in ("z", "q", "k", "v", "pattern")]).float()
    assert torch.allclose(ours_heads, heads, atol=1e-5)
    assert heads.std() > 0.01  # the patches do differ: a real comparison


def test_patching_a_and_b_finds_the_b_head(a_and_b_run):
    result = lab.activation_patching(a_and_b_run)
    assert (result.clean, result.corrupted, result.answer, result.wrong) == ("a cab", "a cac", "yes", "no")
    block, heads = tl_patching(a_and_b_run.model(), a_and_b_run.task, result.clean, result.corrupted)
    assert torch.allclose(result.grid("attn_out", "value").float(), block[1], atol=1e-4)
    assert torch.allclose(result.head_grid("z", "value").float(), heads[0], atol=1e-4)
    # one layer: everything that differs reaches <cls> through attention, so its output there restores all of it,
    # and pasting the clean `b` into the residual stream at position 5 does too
    attn_out = result.positions.query("site == 'attn_out' and position == 0")["restored"].item()
    assert attn_out == pytest.approx(1.0, abs=1e-4)
    assert result.positions.query("site == 'resid_pre' and position == 5")["restored"].item() == pytest.approx(1.0, abs=1e-4)
    assert result.clean_value > 0 > result.corrupted_value
    assert "PatchingResult('a cab' -> 'yes'" in repr(result) and "<table" in result._repr_html_()
    assert lab.PatchingResult.from_dict(json.loads(json.dumps(result.to_dict()))).heads.equals(result.heads)


# --- 2. direct logit attribution = cache.logit_attrs ---------------------------------------------------------


def tl_attributions(model, tokens, answers, wrong=None, attention_mask=None):
    """{component label: mean attribution} from TransformerLens: decompose_resid (embed, pos_embed, mlp_out) and
    stack_head_results (heads), both through cache.logit_attrs at the read position."""
    bridge = lab.to_transformer_lens(model)
    _, cache = bridge.run_with_cache(tokens, attention_mask=attention_mask)
    read = -1 if model.cfg.causal else 0
    resid, labels = cache.decompose_resid(pos_slice=read, return_labels=True)
    attrs = cache.logit_attrs(resid, tokens=answers, incorrect_tokens=wrong, pos_slice=read).mean(-1)
    out = {("L" + label.replace("_mlp_out", " mlp") if "mlp" in label else label): float(v)
           for label, v in zip(labels, attrs) if "attn_out" not in label}
    heads, head_labels = cache.stack_head_results(layer=-1, pos_slice=read, return_labels=True)
    head_attrs = cache.logit_attrs(heads, tokens=answers, incorrect_tokens=wrong, pos_slice=read).mean(-1)
    out.update({label: float(v) for label, v in zip(head_labels, head_attrs)})
    return out


def test_dla_equals_logit_attrs_modular(grokked_run):
    frame = lab.logit_attribution(grokked_run, neurons=True)
    data = grokked_run.task.split("test")
    theirs = tl_attributions(grokked_run.model(), data.tokens, data.labels)
    ours = frame.set_index("component")["attribution"]
    assert set(theirs) <= set(ours.index)
    for label, value in theirs.items():
        assert float(ours[label]) == pytest.approx(value, abs=1e-4), label
    # neurons plus the MLP bias are the MLP; every row but those adds up to the logit less b_U
    neurons = frame[frame["kind"] == "neuron"]["attribution"].sum()
    assert neurons + float(ours["L0 mlp bias"]) == pytest.approx(float(ours["L0 mlp"]), abs=1e-3)
    model = grokked_run.model()
    with torch.no_grad():
        logits = model(data.tokens)[:, -1]
        direct = (logits.gather(1, data.labels[:, None])[:, 0] - model.b_U[data.labels]).mean()
    assert frame.attrs["total"] == pytest.approx(float(direct), abs=1e-3)
    assert abs(float(ours["L0 mlp"])) > 1  # the MLP does the work in a grokked model


def test_dla_equals_logit_attrs_with_layernorm_and_padding(a_and_b_run):
    """a_and_b has a final LayerNorm and padded inputs. TransformerLens's logit_attrs assumes the LayerNorm's
    weight folded into W_U (its default), so it is compared on a folded copy of the same function."""
    model, task = a_and_b_run.model(), a_and_b_run.task
    data = task.split("test")
    frame = lab.logit_attribution(a_and_b_run)
    assert frame.attrs["direction"] == "logit of the right answer - logit of the other class"
    theirs = tl_attributions(folded_final_ln(model), data.tokens, data.labels, 1 - data.labels,
                             attention_mask=(data.tokens != task.pad_token_id).long())
    assert theirs.pop("pos_embed") == 0.0  # the bridge's stand-in for no positions is a zero embedding
    ours = frame.set_index("component")["attribution"]
    for label, value in theirs.items():
        assert float(ours[label]) == pytest.approx(value, abs=2e-3), label
    one = lab.logit_attribution(a_and_b_run, "a cab", against="no")
    assert one.attrs["direction"] == "logit of 'yes' - logit of 'no'" and one.attrs["n_inputs"] == 1


# --- 3. the logit lens ---------------------------------------------------------------------------------------


def test_logit_lens_equals_accumulated_resid_and_ends_at_the_output(grokked_run):
    frame = lab.logit_lens(grokked_run, split="train")
    assert list(frame["stage"]) == ["embed", "L0 attn", "L0 mlp"]
    model, data = grokked_run.model(), grokked_run.task.split("train")
    bridge = lab.to_transformer_lens(model)
    _, cache = bridge.run_with_cache(data.tokens)
    resid = cache.accumulated_resid(incl_mid=True, pos_slice=-1)  # (stage, batch, d_model); no LayerNorm here
    probs = (resid @ bridge.W_U + bridge.b_U).softmax(-1).gather(-1, data.labels[None, :, None].expand(len(resid), -1, 1))
    assert torch.allclose(torch.tensor(frame["answer_prob"].to_numpy()).float(), probs[..., 0].mean(-1), atol=1e-5)
    with torch.no_grad():
        output = model(data.tokens)[:, -1]
    assert frame["accuracy"].iloc[-1] == pytest.approx(float((output.argmax(-1) == data.labels).double().mean()))
    assert frame["accuracy"].iloc[-1] > 0.9 > frame["accuracy"].iloc[0]  # the answer appears only after the MLP
    one = lab.logit_lens(grokked_run, "12 + 5 =")
    assert one["top"].iloc[-1] == lab.predict(grokked_run, "12 + 5 =").label


# --- 4. QK and OV circuits, composition scores ------------------------------------------------------------------


def test_qk_circuit_is_the_attention_score_and_finds_a_and_b(a_and_b_run):
    qk = lab.qk_circuit(a_and_b_run)
    assert qk.read_token == "<cls>" and "<pad>" not in qk.key_tokens
    model, task = a_and_b_run.model(), a_and_b_run.task
    tokens = task.encode_batch(["a cab xyz"])
    _, cache = model.run_with_cache(tokens)
    scores = cache["blocks.0.attn.hook_attn_scores"][0, :, 0]  # (head, key) from <cls>
    from_weights = qk.read_scores[0][:, [qk.key_tokens.index(label) for label in task.token_labels(tokens[0].tolist())]]
    assert torch.allclose(from_weights, scores, atol=1e-4)
    preference = qk.preference().pivot(index="key", columns="component", values="score")
    assert {preference.loc["a"].idxmax(), preference.loc["b"].idxmax()} == {"L0H0", "L0H1"}  # one head per letter


def test_ov_circuit_equals_transformer_lens_full_ov():
    model, task = random_model("model.positional=none", "model.n_layers=2")
    ov = lab.ov_circuit(model, task=task)
    bridge = lab.to_transformer_lens(model)
    full = (bridge.W_E @ bridge.OV @ bridge.W_U).AB  # (layer, head, token, output)
    assert torch.allclose(ov.values, full[:, :, : task.d_vocab], atol=1e-4)
    assert ov.values.abs().max() > 0.1


def test_fourier_basis_circuits_are_the_token_circuits_rotated(grokked_run):
    from lab.analysis.fourier import fourier_basis

    p = grokked_run.task.p
    basis = fourier_basis(p)[0].float()
    tokens, fourier = lab.qk_circuit(grokked_run), lab.qk_circuit(grokked_run, fourier=True)
    assert torch.allclose(fourier.scores, basis @ tokens.scores[:, :, :p, :p] @ basis.T, atol=1e-3)
    assert fourier.key_tokens[:3] == ["const", "cos 1", "sin 1"]
    ov = lab.ov_circuit(grokked_run, fourier=True)
    assert ov.values.shape[-2:] == (p, p)


def test_composition_scores_equal_the_bridge():
    model, task = random_model("model.n_layers=3")
    frame = lab.composition_scores(model, task=task)
    bridge = lab.to_transformer_lens(model)
    for mode in ("Q", "K", "V"):
        theirs = bridge.all_composition_scores(mode).scores
        for row in frame[frame["mode"] == mode].itertuples():
            assert row.score == pytest.approx(float(theirs[row.earlier_layer, row.earlier_head, row.later_layer, row.later_head]), abs=1e-5)
    assert len(frame) == 3 * 3 * 16  # modes x (0,1), (0,2), (1,2) layer pairs x 4 x 4 heads


# --- 5. over training, cached per checkpoint ------------------------------------------------------------------


def test_circuit_history_covers_every_checkpoint_and_is_cached(tmp_path_factory, tmp_path, monkeypatch):
    from runs_for_tests import copy_run

    from lab.analysis import circuit_history as history_module

    run = lab.load_run(copy_run("a_and_b", tmp_path_factory, tmp_path / "ab"))
    history = lab.circuit_history(run)
    assert sorted(set(history["step"])) == run.checkpoint_steps
    assert set(history["measure"]) == {"patching", "dla", "lens", "qk"}
    last = history[(history["step"] == run.checkpoint_steps[-1]) & (history["measure"] == "qk")].set_index("component")["value"]
    assert max(last["L0H0 → a"], last["L0H1 → a"]) > 1  # some head prefers `a` by the end
    # the second time everything is read from the run folder
    monkeypatch.setattr(history_module, "summary_at", lambda *a, **k: pytest.fail("recomputed a cached checkpoint"))
    assert lab.circuit_history(run).equals(history)
    stored = json.loads(next((run.path / "analysis" / "heads").glob("step_*.json")).read_text())
    assert history_module.CACHE_KEY in stored["entries"]
    fig = lab.plot_circuit_history(run, "qk")
    names = [trace.name for trace in fig.data]
    assert "L0H0 → a" in names and any(str(n).startswith("grokked at") for n in names)


# --- 6. one line where an analysis does not apply -----------------------------------------------------------------


def test_refusals_say_what_is_wrong(grokked_run, a_and_b_run):
    from lab.config import load_experiment
    from lab.models.architectures import build_model
    from lab.tasks import make_task

    config = load_experiment("modadd_quick", ["task.p=7", "model.arch=mlp"]).resolve()
    mlp, task = build_model(config.model), make_task(config.task)
    for call in (lab.activation_patching, lab.logit_attribution, lab.logit_lens, lab.qk_circuit, lab.ov_circuit):
        with pytest.raises(ValueError, match="not available for arch 'mlp'"):
            call(mlp, task=task)
    with pytest.raises(ValueError, match="this model has 1 layer"):
        lab.composition_scores(grokked_run)
    with pytest.raises(ValueError, match="fourier=True is for modular runs"):
        lab.qk_circuit(a_and_b_run, fourier=True)
    with pytest.raises(ValueError, match="give two inputs of one length"):
        lab.activation_patching(a_and_b_run, "a cab", "a ca")
    with pytest.raises(ValueError, match="have the same answer 'yes'"):
        lab.activation_patching(a_and_b_run, "a cab", "c cab")
    with pytest.raises(ValueError, match="against='maybe' is not an answer of this task; valid: no, yes"):
        lab.logit_attribution(a_and_b_run, "a cab", against="maybe")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        lab.logit_lens(a_and_b_run, split="dev")


# --- 7. figures and the page ---------------------------------------------------------------------------------------


def test_figures(a_and_b_run):
    patching = lab.plot_patching(a_and_b_run)
    assert "'a cab' (yes) into 'a cac' (no)" in patching.layout.title.text and len(patching.data) == 4
    dla = lab.plot_logit_attribution(a_and_b_run, "a cab")
    assert list(dla.data[0].x)[:3] == ["embed", "L0H0", "L0H1"]
    assert lab.plot_qk_circuit(a_and_b_run).data[0].name == "L0H0"
    assert len(lab.plot_qk_circuit(a_and_b_run, full=True).data) == 2
    assert len(lab.plot_ov_circuit(a_and_b_run).data) == 2
    assert list(lab.plot_logit_lens(a_and_b_run, "a cab").data[0].x) == ["embed", "L0 attn", "L0 mlp"]


def test_circuits_page(tmp_path_factory, monkeypatch):
    """The page on real runs (modular: one layer; a_and_b: two layers, so composition scores show), a typed
    pair, and a pair of different lengths (one line)."""
    import dashboard_runs
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from dashboard import background

    folder, _ = dashboard_runs.shared_runs(tmp_path_factory)
    monkeypatch.setenv("LAB_RUNS_DIR", str(folder))
    st.cache_data.clear()
    st.cache_resource.clear()
    try:
        at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py"), default_timeout=120)
        at.run()
        at.switch_page("views/circuits.py").run()
        assert not at.exception, [e.value for e in at.exception]
        for name in ("mod23", "ab"):
            at.selectbox(key="circuits_run").set_value(name).run()
            assert not at.exception and not at.error, [e.value for e in at.exception] + [e.value for e in at.error]
            titles = [json.loads(chart.proto.spec)["layout"]["title"]["text"] for chart in at.get("plotly_chart")]
            assert any(t.startswith("Activation patching") for t in titles), titles
            assert any("Composition" in t for t in titles) == (name == "ab")
            # the page's patching and QK charts are the figures lab.plot_* returns (default: the last checkpoint)
            charts = {json.loads(c.proto.spec)["layout"]["title"]["text"]: json.loads(c.proto.spec) for c in at.get("plotly_chart")}
            run = lab.load_run(folder / name)
            for fig in (lab.plot_patching(run), lab.plot_qk_circuit(run)):
                spec = charts[fig.layout.title.text]
                assert [t.get("name") for t in spec["data"]] == [t.name for t in fig.data]
                field = "z" if "z" in spec["data"][0] else "y"
                assert spec["data"][0][field] == json.loads(fig.to_json())["data"][0][field]
        at.text_input(key="circuits_corrupted:ab").set_value("a ca").run()
        assert any("give two inputs of one length" in e.value for e in at.error)
        assert not at.exception
    finally:
        background.stop_all()
        st.cache_data.clear()
        st.cache_resource.clear()


def test_readme_circuits_walkthrough_runs(tmp_path_factory, tmp_path):
    """The README's Circuits block runs as written, on copies of the session's runs (it writes caches into them)."""
    import re

    from runs_for_tests import copy_run

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Circuits:", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    namespace = {"lab": lab, "run": lab.load_run(copy_run("modadd_quick", tmp_path_factory, tmp_path / "mod")),
                 "ab": lab.load_run(copy_run("a_and_b", tmp_path_factory, tmp_path / "ab"))}
    exec(compile(code, "README.md (Circuits)", "exec"), namespace)
    assert namespace["fig"].layout.title.text.endswith("QK circuit: <cls>'s score for `a` / `b` above an average character")
