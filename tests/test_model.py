"""The hooked transformer: shapes, hook names, masks, cache."""

import pytest
import torch
from transformer_lens import ActivationCache

from lab.config import ExperimentConfig
from lab.models.transformer import Transformer
from lab.tasks import make_task

HOOKS_PER_LAYER = [
    "hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post",
    "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z",
    "mlp.hook_pre", "mlp.hook_post",
]


def build(task: dict, **model):
    config = ExperimentConfig.model_validate({"task": task, "model": model}).resolve()
    return Transformer(config.model), make_task(config.task)


def test_every_transformer_lens_hook_name_is_present():
    model, _ = build({"name": "modular", "p": 7}, n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, normalization="LN")
    names = set(model.hook_dict)
    expected = {"hook_embed", "hook_pos_embed", "ln_final.hook_scale", "ln_final.hook_normalized"}
    for layer in range(2):
        expected |= {f"blocks.{layer}.{hook}" for hook in HOOKS_PER_LAYER}
        expected |= {f"blocks.{layer}.ln1.hook_scale", f"blocks.{layer}.ln2.hook_normalized"}
    assert expected <= names


def test_weights_have_transformer_lens_names_and_shapes():
    model, _ = build({"name": "modular", "p": 7}, d_model=16, n_heads=2, d_head=8, d_mlp=32)
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    assert model.W_E.shape == (8, 16) and model.W_pos.shape == (3, 16) and model.W_U.shape == (16, 7)
    assert attn.W_Q.shape == attn.W_K.shape == attn.W_V.shape == (2, 16, 8)
    assert attn.W_O.shape == (2, 8, 16)
    assert mlp.W_in.shape == (16, 32) and mlp.W_out.shape == (32, 16)


def test_run_with_cache_shapes():
    model, task = build({"name": "modular", "p": 7}, d_model=16, n_heads=2, d_head=8, d_mlp=32)
    tokens = task.split("train").tokens[:5]
    logits, cache = model.run_with_cache(tokens)
    assert isinstance(cache, ActivationCache)
    assert logits.shape == (5, 3, 7)
    assert cache["pattern", 0].shape == (5, 2, 3, 3)  # (batch, head, query, key)
    assert cache["z", 0].shape == (5, 3, 2, 8)
    assert cache["post", 0, "mlp"].shape == (5, 3, 32)
    assert cache["resid_post", 0].shape == (5, 3, 16)
    assert torch.allclose(cache["pattern", 0].sum(-1), torch.ones(5, 2, 3))


def test_causal_mask_gives_zero_attention_to_the_future():
    model, task = build({"name": "modular", "p": 7}, d_model=16, n_heads=2, d_head=8, d_mlp=32)
    _, cache = model.run_with_cache(task.split("train").tokens)
    pattern = cache["pattern", 0]
    future = torch.ones(3, 3, dtype=torch.bool).triu(1)
    assert (pattern[..., future] == 0).all()
    assert (pattern[..., ~future] > 0).all()


def test_padding_gets_zero_attention_and_does_not_change_the_answer():
    model, task = build({"name": "a_and_b"}, d_model=16, n_heads=2, d_head=8, d_mlp=32, positional="none")
    assert not model.cfg.causal
    batch = task.encode_batch(["a cab", "ab"])  # the second is padded
    logits, cache = model.run_with_cache(batch)
    pattern = cache["pattern", 0]
    assert (pattern[1, :, :, 3:] == 0).all()
    alone = model(torch.tensor([task.encode("ab")]))
    torch.testing.assert_close(logits[1, 0], alone[0, 0])


def test_model_without_positions_takes_any_length_and_is_permutation_invariant_at_cls():
    model, task = build({"name": "a_and_b"}, d_model=16, n_heads=2, d_head=8, d_mlp=32, positional="none")
    assert model.W_pos is None
    long = model(torch.tensor([task.encode("ab" + "c" * 500)]))
    swapped = model(torch.tensor([task.encode("c" * 500 + "ba")]))
    torch.testing.assert_close(long[0, 0], swapped[0, 0])


def test_too_long_input_for_learned_positions_is_a_clear_error():
    model, _ = build({"name": "modular", "p": 7}, d_model=16, n_heads=2, d_head=8, d_mlp=32)
    with pytest.raises(ValueError, match="input of 4 positions is longer than this model's n_ctx of 3"):
        model(torch.zeros(1, 4, dtype=torch.long))


def test_attn_only_and_gelu_variants_compute_what_they_name():
    model, task = build({"name": "modular", "p": 7}, d_model=16, n_heads=2, d_head=8, attn_only=True)
    assert model.blocks[0].mlp is None and "blocks.0.mlp.hook_post" not in model.hook_dict
    logits, cache = model.run_with_cache(task.split("train").tokens)
    torch.testing.assert_close(cache["resid_post", 0], cache["resid_mid", 0])  # nothing after attention
    torch.testing.assert_close(logits, cache["resid_mid", 0] @ model.W_U + model.b_U)

    model, task = build({"name": "modular", "p": 7}, d_model=16, n_heads=2, d_head=8, d_mlp=32, act_fn="gelu")
    tokens = task.split("train").tokens
    logits, cache = model.run_with_cache(tokens)
    mlp = model.blocks[0].mlp
    pre = cache["resid_mid", 0] @ mlp.W_in + mlp.b_in
    torch.testing.assert_close(cache["pre", 0], pre)
    torch.testing.assert_close(cache["post", 0], torch.nn.functional.gelu(pre))
    torch.testing.assert_close(cache["mlp_out", 0], torch.nn.functional.gelu(pre) @ mlp.W_out + mlp.b_out)
    assert (cache["post", 0] < 0).any()  # gelu's negative lobe: not a relu
    mlp.act_fn = torch.nn.functional.relu
    assert not torch.allclose(model(tokens), logits)


def test_layernorm_normalises_each_position():
    model, task = build({"name": "modular", "p": 7}, d_model=16, n_heads=2, d_head=8, d_mlp=32, normalization="LN")
    _, cache = model.run_with_cache(task.split("train").tokens)
    normalized = cache["blocks.0.ln1.hook_normalized"]  # (batch, pos, d_model)
    torch.testing.assert_close(normalized.mean(-1), torch.zeros(normalized.shape[:2]), atol=1e-5, rtol=0)
    torch.testing.assert_close(normalized.pow(2).mean(-1), torch.ones(normalized.shape[:2]), atol=1e-3, rtol=0)


def test_hooks_can_patch_activations():
    model, task = build({"name": "modular", "p": 7}, d_model=16, n_heads=2, d_head=8, d_mlp=32)
    tokens = task.split("train").tokens
    zero_head = lambda z, hook: z.index_fill(2, torch.tensor([0, 1]), 0.0)  # noqa: E731
    patched = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", zero_head)])
    assert not torch.allclose(patched, model(tokens))
    model.blocks[0].attn.W_O.data.zero_()  # same effect as zeroing every head's z
    torch.testing.assert_close(patched, model(tokens))


def test_fused_forward_gives_transformer_lens_activations_and_hooks_still_patch_them(monkeypatch):
    """The forward pass runs Q, K and V as one matmul, W_O and W_U as F.linear, and PyTorch's LayerNorm
    kernel while no hook is on a LayerNorm's points. Every cached activation (q, k, v, z per head, each
    LayerNorm's scale and normalized stream) equals TransformerLens's on the same weights, the plain
    forward gives the cached run's logits, and patching q, k, v, z or a LayerNorm's points changes them."""
    import lab

    model, task = build({"name": "modular", "p": 7}, n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32,
                        normalization="LN", act_fn="gelu")
    with torch.no_grad():  # non-trivial biases and LayerNorm weights, so a misplaced one shows
        for name, param in model.named_parameters():
            if not name.rsplit(".", 1)[-1].startswith("W_"):
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
    tokens = task.split("train").tokens[:6]
    layer_norm_calls = []
    layer_norm = torch.nn.functional.layer_norm
    monkeypatch.setattr(torch.nn.functional, "layer_norm", lambda *a, **k: layer_norm_calls.append(1) or layer_norm(*a, **k))
    plain = model(tokens)
    assert len(layer_norm_calls) == 5  # ln1, ln2 of two blocks and ln_final: the fused kernel
    logits, cache = model.run_with_cache(tokens)
    assert len(layer_norm_calls) == 5  # hooked: each LayerNorm runs step by step through its hook points
    monkeypatch.undo()
    theirs, their_cache = lab.to_transformer_lens(model).run_with_cache(tokens)
    assert plain.abs().max() > 0.5
    torch.testing.assert_close(plain, logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, theirs, atol=1e-5, rtol=0)
    names = [f"blocks.{layer}.{point}" for layer in (0, 1) for point in
             ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z", "ln1.hook_scale", "ln1.hook_normalized",
              "ln2.hook_scale", "ln2.hook_normalized")] + ["ln_final.hook_scale", "ln_final.hook_normalized"]
    for name in names:
        assert cache[name].shape == their_cache[name].shape, name
        torch.testing.assert_close(cache[name], their_cache[name], atol=1e-5, rtol=0, msg=name)
    assert cache["blocks.1.attn.hook_q"].shape == (6, 3, 2, 8)  # (batch, pos, head, d_head)
    for name in ("blocks.1.attn.hook_q", "blocks.1.attn.hook_k", "blocks.1.attn.hook_v", "blocks.1.attn.hook_z",
                 "blocks.0.ln1.hook_scale", "ln_final.hook_normalized"):
        patched = model.run_with_hooks(tokens, fwd_hooks=[(name, lambda t, hook: t * 2)])
        assert (patched - plain).abs().max() > 1e-2, name
