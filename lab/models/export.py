"""Export a lab model to a TransformerLens 4.x `TransformerBridge`, so the whole TransformerLens
toolbox (`cache.decompose_resid`, `cache.logit_attrs`, `cache.stack_head_results`, ...) applies.

    bridge = lab.to_transformer_lens(run.model())
    logits, cache = bridge.run_with_cache(tokens)                  # modular: causal, no padding
    logits = bridge(tokens, attention_mask=(tokens != 0).long())   # a_and_b: pass the padding mask

The bridge is built with `TransformerBridge.boot_native` and carries the same weights (converted
by TransformerLens's own `convert_tl_checkpoint`), so its logits equal the lab model's. It is for
analysis: its parameters do not require gradients, so `run_with_cache`, `decompose_resid` and
`logit_attrs` build no autograd graph (no `grad_fn`, no memory held for a backward pass). For
gradient-based methods (attribution patching) or training, export with `requires_grad=True`.

What the bridge cannot represent, and how this export handles it:
- `positional = "none"`: the bridge always adds a learned positional embedding; it gets an all-zero
  one of length n_ctx, which is the same function, but inputs longer than n_ctx (which the lab
  model accepts) are refused by the bridge.
- `positional = "sinusoidal"`: the bridge's learned W_pos holds the fixed table (n_ctx rows), so the
  bridge refuses inputs longer than n_ctx, which the lab model extends its table for.
- `attn_score = "dot"` (q.k without 1 / sqrt(d_head)): TransformerLens 4.3's native bridge refuses
  `attn_scale = 1` ("unscaled attention"), so the export folds sqrt(d_head) into W_Q and b_Q instead:
  the bridge's scores, pattern, z and logits equal the lab model's, its hook_q is the lab's times sqrt(d_head).
- `shared_blocks = true`: every layer of the bridge gets its own copy of the one block's weights (the
  bridge computes the same function; training the bridge would untie them).
- `attn_score = "general"` or `"additive"`, and `residual = false`, have no TransformerLens equivalent
  and raise `ExportError` naming the setting.
- Padding: the lab model masks keys equal to the pad token by itself; the bridge masks only what
  `attention_mask` (1 = keep) tells it, so pass `attention_mask=(tokens != pad).long()` for tasks
  with padding (a_and_b).
- Any model setting this export does not know (an activation other than relu/gelu, a normalisation
  other than none/LN, a positional scheme other than learned/sinusoidal/none, or a config field added after
  this export was written and set to a non-default value) raises `ExportError` instead of building
  a bridge that computes something else.
"""

from __future__ import annotations

import torch

from lab.errors import LabError

SUPPORTED = {
    "act_fn": ("relu", "gelu"),
    "normalization": ("none", "LN"),
    "positional": ("learned", "sinusoidal", "none"),
    "attn_score": ("scaled_dot", "dot"),
    "residual": (True,),
}
# translated, or without effect on a transformer's function (init settings, the other architectures' widths)
KNOWN_FIELDS = {"n_layers", "d_model", "n_heads", "d_head", "d_mlp", "act_fn", "attn_only", "normalization",
                "positional", "attn_score", "shared_blocks", "residual", "seed", "init_scale", "d_vocab",
                "d_vocab_out", "n_ctx", "causal", "pad_token_id", "arch", "mlp_width", "mlp_layers", "mlp_input",
                "cnn_channels", "cnn_kernel", "cnn_layers", "linear_width", "lstm_hidden", "lstm_layers"}
TOP_LEVEL = {"W_E": "embed.W_E", "W_pos": "pos_embed.W_pos", "W_U": "unembed.W_U", "b_U": "unembed.b_U"}


class ExportError(LabError):
    """The model has a setting a TransformerLens bridge cannot represent; the message names it."""


def _check_supported(model) -> None:
    cfg = model.cfg
    for key, valid in SUPPORTED.items():
        value = getattr(cfg, key)
        if value not in valid:
            shown = str(value).lower() if isinstance(value, bool) else repr(value)  # as TOML spells it
            raise ExportError(f"cannot export to TransformerLens: model.{key} = {shown} has no bridge equivalent "
                              f"(supported: {', '.join(str(v).lower() if isinstance(v, bool) else repr(v) for v in valid)})")
    defaults = {name: field.default for name, field in type(cfg).model_fields.items()}
    for name in set(type(cfg).model_fields) - KNOWN_FIELDS:
        if getattr(cfg, name) != defaults[name]:
            raise ExportError(f"cannot export to TransformerLens: model.{name} = {getattr(cfg, name)!r} is a setting "
                              "this export does not translate")


def bridge_config(model):
    """The `TransformerBridgeConfig` matching a lab model's config."""
    from transformer_lens.config import TransformerBridgeConfig

    cfg = model.cfg
    return TransformerBridgeConfig(
        n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads, d_head=cfg.d_head, d_mlp=cfg.d_mlp,
        d_vocab=cfg.d_vocab, d_vocab_out=cfg.d_vocab_out, n_ctx=cfg.n_ctx, act_fn=cfg.act_fn,
        normalization_type="LN" if cfg.normalization == "LN" else None, attn_only=cfg.attn_only,
        attention_dir="causal" if cfg.causal else "bidirectional", eps=1e-5, device="cpu",
    )


def to_transformer_lens(model, requires_grad: bool = False):
    """A TransformerLens `TransformerBridge` (built with `boot_native`, on CPU, eval mode) with this
    model's weights, parameters frozen unless `requires_grad`. Raises ExportError for settings the
    bridge cannot represent (see the module docs).

    Tasks with padding (a_and_b) must pass `attention_mask=(tokens != pad).long()` to the bridge;
    `positional = "none"` becomes a zero positional embedding, so the bridge refuses inputs longer than n_ctx."""
    from transformer_lens import TransformerBridge
    from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint

    arch = getattr(model.cfg, "arch", "transformer")
    if arch != "transformer":
        raise ExportError(f"cannot export to TransformerLens: it is not available for arch {arch!r}, which has no "
                          "attention blocks to map onto a TransformerBridge")
    _check_supported(model)
    config = bridge_config(model)
    # every layer's weights, shared blocks' too (their state dict holds block 0's only); sinusoidal W_pos is a buffer
    weights = dict(model.named_parameters(remove_duplicate=False))
    state = {TOP_LEVEL.get(key, key): value.detach().to("cpu", torch.float32).clone() for key, value in weights.items()}
    if model.W_pos is None:  # positional = "none": a zero positional embedding is the same function
        state["pos_embed.W_pos"] = torch.zeros(model.cfg.n_ctx, model.cfg.d_model)
    elif "pos_embed.W_pos" not in state:  # sinusoidal: the fixed table, as a learned one
        state["pos_embed.W_pos"] = model.W_pos.detach().to("cpu", torch.float32).clone()
    if model.cfg.attn_score == "dot":  # q.k = (sqrt(d_head) q).k / sqrt(d_head): the bridge's scaled score
        for layer in range(model.cfg.n_layers):
            for name in ("W_Q", "b_Q"):
                state[f"blocks.{layer}.attn.{name}"] *= model.cfg.d_head ** 0.5
    bridge = TransformerBridge.boot_native(config)
    converted = convert_tl_checkpoint(state, bridge.cfg)
    result = bridge.load_state_dict(converted, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ExportError(f"cannot export to TransformerLens: weights do not map onto the bridge "
                          f"(missing {list(result.missing_keys)[:3]}, unexpected {list(result.unexpected_keys)[:3]})")
    return bridge.requires_grad_(requires_grad).eval()
