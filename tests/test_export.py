"""`lab.to_transformer_lens(model)`: a TransformerLens 4.x TransformerBridge with the same weights and logits."""

from __future__ import annotations

import re

import pytest
import torch

import lab
from runs_for_tests import a_and_b_run, grokked_run  # noqa: F401  (fixtures)


@torch.no_grad()
def test_modular_export_matches_and_the_toolbox_works(grokked_run):
    from transformer_lens import TransformerBridge

    model, task = grokked_run.model(), grokked_run.task
    bridge = lab.to_transformer_lens(model)
    assert isinstance(bridge, TransformerBridge)
    tokens = task.split("test").tokens
    ours, theirs = model(tokens)[:, -1], bridge(tokens)[:, -1]
    # float32 rounding, relative to logits up to ~25 (the lab model attends through SDPA, the bridge explicitly)
    assert (ours - theirs).abs().max() < 2e-6 * ours.abs().max()
    assert ours.abs().max() > 1  # a real comparison, not of two near-zero tensors

    logits, cache = bridge.run_with_cache(tokens[:8])
    heads, labels = cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
    assert heads.shape[:2] == (4, 8) and labels == ["L0H0", "L0H1", "L0H2", "L0H3"]
    resid = cache.decompose_resid(pos_slice=-1)  # (component, batch, d_model)
    assert torch.allclose(resid.sum(0), cache["blocks.0.hook_resid_post"][:, -1], atol=1e-4)
    attrs = cache.logit_attrs(resid, tokens=task.split("test").labels[:8])
    assert attrs.shape == (resid.shape[0], 8)
    assert torch.allclose(cache["pattern", 0], model.run_with_cache(tokens[:8])[1]["pattern", 0], atol=1e-6)


@torch.no_grad()
def test_a_and_b_export_with_padding_mask(a_and_b_run):
    model, task = a_and_b_run.model(), a_and_b_run.task
    bridge = lab.to_transformer_lens(model)
    tokens = task.split("test").tokens  # padded
    assert (tokens == task.pad_token_id).any()
    theirs = bridge(tokens, attention_mask=(tokens != task.pad_token_id).long())[:, task.read_position]
    assert (model(tokens)[:, task.read_position] - theirs).abs().max() < 1e-5


@torch.no_grad()
def test_layernorm_gelu_attn_only_models_export_exactly():
    from lab.config import load_experiment
    from lab.models.transformer import Transformer
    from lab.tasks import make_task

    for overrides in (["model.normalization=LN", "model.act_fn=gelu", "model.n_layers=2"], ["model.attn_only=true"]):
        config = load_experiment("modadd_quick", ["task.p=11", "model.d_model=16", "model.d_head=4", "model.d_mlp=32",
                                                  *overrides]).resolve()
        model = Transformer(config.model).eval()
        for name, param in model.named_parameters():  # non-trivial biases and LayerNorm weights
            if not name.rsplit(".", 1)[-1].startswith("W_"):
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
        tokens = make_task(config.task).split("test").tokens
        assert (model(tokens) - lab.to_transformer_lens(model)(tokens)).abs().max() < 1e-5, overrides


def test_the_bridge_is_for_analysis_and_builds_no_autograd_graph(grokked_run):
    """As the README uses it, with gradients on (no `torch.no_grad()`): nothing carries a grad_fn."""
    run = grokked_run
    bridge = lab.to_transformer_lens(run.model())
    assert not any(param.requires_grad for param in bridge.parameters())
    tokens = run.task.split("test").tokens[:16]
    logits, cache = bridge.run_with_cache(tokens)
    resid = cache.decompose_resid(pos_slice=-1)
    attrs = cache.logit_attrs(resid, tokens=run.task.split("test").labels[:16])
    assert torch.is_grad_enabled()
    assert logits.grad_fn is None and resid.grad_fn is None and attrs.grad_fn is None
    assert attrs.abs().max() > 0.1  # a real result, just without a graph
    # gradient-based methods (attribution patching) ask for gradients explicitly
    trainable = lab.to_transformer_lens(run.model(), requires_grad=True)
    assert all(param.requires_grad for param in trainable.parameters())
    labels = run.task.split("test").labels[:16]

    def loss():
        return torch.nn.functional.cross_entropy(trainable(tokens)[:, -1], labels)

    before = loss()
    before.backward()
    # the gradients are the loss's: a small step against them lowers it
    with torch.no_grad():
        for param in trainable.parameters():
            param -= 1e-3 * param.grad
    assert loss().item() < before.item() - 1e-6


def test_settings_the_bridge_cannot_represent_fail_clearly(grokked_run, monkeypatch):
    """A model setting the export does not translate must refuse, not build a bridge computing something else.
    (Every setting the lab has today is translatable, so the export's tables are narrowed to stand in for
    a future one.)"""
    from lab.models import export

    model = lab.Transformer(grokked_run.config.model.model_copy(update={"seed": 5, "act_fn": "gelu"}))
    monkeypatch.setattr(export, "SUPPORTED", {**export.SUPPORTED, "act_fn": ("relu",)})
    with pytest.raises(lab.ExportError, match=r"model\.act_fn = 'gelu' has no bridge equivalent \(supported: 'relu'\)"):
        lab.to_transformer_lens(model)
    monkeypatch.setattr(export, "SUPPORTED", {key: value for key, value in export.SUPPORTED.items() if key != "act_fn"})
    monkeypatch.setattr(export, "KNOWN_FIELDS", export.KNOWN_FIELDS - {"seed"})
    with pytest.raises(lab.ExportError, match=r"model\.seed = 5 is a setting this export does not translate"):
        lab.to_transformer_lens(model)


@torch.no_grad()
def test_variants_the_bridge_can_represent_export_exactly_and_the_others_refuse():
    """Sinusoidal positions (the table as W_pos), unscaled dot-product scores (sqrt(d_head) folded into
    W_Q) and shared blocks (a copy per layer) give the lab model's logits and patterns; the general and
    additive scores and a model without skip connections have no bridge equivalent: one line each."""
    from lab.config import load_experiment
    from lab.models.transformer import Transformer
    from lab.tasks import make_task

    base = ["task.p=11", "model.d_model=16", "model.d_head=4", "model.d_mlp=32"]
    for overrides in (["model.positional=sinusoidal"], ["model.attn_score=dot", "model.n_layers=2"],
                      ["model.shared_blocks=true", "model.n_layers=3", "model.normalization=LN"]):
        config = load_experiment("modadd_quick", [*base, *overrides]).resolve()
        model = Transformer(config.model).eval()
        for name, param in model.named_parameters():  # non-trivial biases and LayerNorm weights
            if not name.rsplit(".", 1)[-1].startswith("W_"):
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
        tokens = make_task(config.task).split("test").tokens
        logits, cache = model.run_with_cache(tokens)
        theirs, their_cache = lab.to_transformer_lens(model).run_with_cache(tokens)
        assert logits.abs().max() > 0.5 and (logits - theirs).abs().max() < 1e-5, overrides
        for layer in range(config.model.n_layers):
            assert (cache["pattern", layer] - their_cache["pattern", layer]).abs().max() < 1e-5, (overrides, layer)

    for override, line in (("model.attn_score=general", "model.attn_score = 'general' has no bridge equivalent"),
                           ("model.attn_score=additive", "model.attn_score = 'additive' has no bridge equivalent"),
                           ("model.residual=false", "model.residual = false has no bridge equivalent (supported: true)")):
        model = Transformer(load_experiment("modadd_quick", [*base, override]).resolve().model)
        with pytest.raises(lab.ExportError, match=f"^cannot export to TransformerLens: {re.escape(line)}"):
            lab.to_transformer_lens(model)
