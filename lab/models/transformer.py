"""A small transformer, from scratch, with TransformerLens hook points.

Read top to bottom: LayerNorm, attention, the MLP, a block, the whole transformer. Every
intermediate activation passes through a `HookPoint` named as in TransformerLens (`hook_embed`, `blocks.0.attn.hook_pattern`, `blocks.0.mlp.hook_post`, ...), so

    logits, cache = model.run_with_cache(tokens)
    cache["pattern", 0]          # (batch, head, query, key)

works as TransformerLens users expect, and any activation can be patched with `run_with_hooks`.
Weights carry TransformerLens names too: `W_E`, `W_pos`, `blocks[l].attn.W_Q/W_K/W_V/W_O`,
`blocks[l].mlp.W_in/W_out`, `W_U`.

Shapes use: batch, pos (= query or key), d_model, head, d_head, d_mlp, vocab.

Training reads the logits of one position only: `Transformer.forward_at` computes just those, with
these modules' weights and the same result, in section 5 at the end of this file.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import einsum
from torch import nn
from transformer_lens import ActivationCache, HookedRootModule
from transformer_lens.hook_points import HookPoint

from lab.config import ModelConfig


# --- 0. LayerNorm --------------------------------------------------------------------------------
# Optional (cfg.normalization = "LN"); the Nanda et al. model has none.


class LayerNorm(nn.Module):
    """LayerNorm with TransformerLens's parameter (`w`, `b`) and hook (`hook_scale`, `hook_normalized`) names."""

    def __init__(self, d_model: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(d_model))
        self.b = nn.Parameter(torch.zeros(d_model))
        self.hook_scale = HookPoint()  # (batch, pos, 1)
        self.hook_normalized = HookPoint()  # (batch, pos, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., d_model), normalised over its last dimension
        x = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return self.hook_normalized(x / scale) * self.w + self.b


# --- 1. Attention --------------------------------------------------------------------------------
# Each head asks, at every query position, "which earlier (or any, if bidirectional) positions
# matter to me?": scores = q·k / sqrt(d_head), masked, softmaxed over keys into a pattern, and the
# head's output at the query is the pattern-weighted sum of values.


class Attention(nn.Module):
    """Multi-head self-attention: `n_heads` independent heads, their outputs summed through W_O."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, d, e = cfg.n_heads, cfg.d_model, cfg.d_head
        self.causal = bool(cfg.causal)
        self.W_Q = nn.Parameter(torch.empty(h, d, e))
        self.W_K = nn.Parameter(torch.empty(h, d, e))
        self.W_V = nn.Parameter(torch.empty(h, d, e))
        self.W_O = nn.Parameter(torch.empty(h, e, d))
        self.b_Q = nn.Parameter(torch.zeros(h, e))
        self.b_K = nn.Parameter(torch.zeros(h, e))
        self.b_V = nn.Parameter(torch.zeros(h, e))
        self.b_O = nn.Parameter(torch.zeros(d))
        self.hook_q = HookPoint()  # (batch, pos, head, d_head)
        self.hook_k = HookPoint()  # (batch, pos, head, d_head)
        self.hook_v = HookPoint()  # (batch, pos, head, d_head)
        self.hook_attn_scores = HookPoint()  # (batch, head, query, key), masked entries -inf
        self.hook_pattern = HookPoint()  # (batch, head, query, key), each row sums to 1
        self.hook_z = HookPoint()  # (batch, pos, head, d_head)

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor | None) -> torch.Tensor:
        # x: (batch, pos, d_model); key_padding: (batch, key) True where the key is padding.
        q = self.hook_q(einsum(x, self.W_Q, "batch pos d_model, head d_model d_head -> batch pos head d_head") + self.b_Q)
        k = self.hook_k(einsum(x, self.W_K, "batch pos d_model, head d_model d_head -> batch pos head d_head") + self.b_K)
        v = self.hook_v(einsum(x, self.W_V, "batch pos d_model, head d_model d_head -> batch pos head d_head") + self.b_V)

        scores = einsum(q, k, "batch query head d_head, batch key head d_head -> batch head query key")
        scores = scores / math.sqrt(q.shape[-1])
        scores = self.hook_attn_scores(scores.masked_fill(self._mask(x.shape[1], key_padding, x.device), float("-inf")))
        pattern = self.hook_pattern(scores.softmax(dim=-1))  # (batch, head, query, key)

        z = self.hook_z(einsum(pattern, v, "batch head query key, batch key head d_head -> batch query head d_head"))
        return einsum(z, self.W_O, "batch pos head d_head, head d_head d_model -> batch pos d_model") + self.b_O

    def _mask(self, n_pos: int, key_padding: torch.Tensor | None, device) -> torch.Tensor:
        """True where a query may not look: future keys (causal) and padding keys. (batch|1, 1, query, key)"""
        mask = torch.zeros(1, 1, n_pos, n_pos, dtype=torch.bool, device=device)
        if self.causal:
            mask = torch.ones(n_pos, n_pos, dtype=torch.bool, device=device).triu(1)[None, None]  # (1, 1, query, key)
        if key_padding is not None:
            mask = mask | key_padding[:, None, None, :]  # (batch, key) -> (batch, 1, 1, key)
        return mask


# --- 2. MLP --------------------------------------------------------------------------------------
# A position-wise two-layer network: where Nanda et al. found the modular-addition model does its
# trigonometry (products of cosines become cosines of sums).


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp))
        self.W_out = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model))
        self.act_fn = {"relu": F.relu, "gelu": F.gelu}[cfg.act_fn]
        self.hook_pre = HookPoint()  # (batch, pos, d_mlp)
        self.hook_post = HookPoint()  # (batch, pos, d_mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (batch, pos, d_model); the fast path calls this too, with pos = 1. F.linear is the matmul
        # and the bias add as one op, so both paths round alike.
        pre = self.hook_pre(F.linear(x, self.W_in.T, self.b_in))  # x @ W_in + b_in: (batch, pos, d_mlp)
        post = self.hook_post(self.act_fn(pre))  # (batch, pos, d_mlp)
        return F.linear(post, self.W_out.T, self.b_out)  # post @ W_out + b_out: (batch, pos, d_model)


# --- 3. Block ------------------------------------------------------------------------------------
# The residual stream is a running sum: each block reads it, and adds what attention and the MLP
# write. resid_pre -> (+ attn_out) -> resid_mid -> (+ mlp_out) -> resid_post.


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        use_ln = cfg.normalization == "LN"
        self.ln1 = LayerNorm(cfg.d_model) if use_ln else nn.Identity()
        self.attn = Attention(cfg)
        self.mlp = None if cfg.attn_only else MLP(cfg)
        self.ln2 = LayerNorm(cfg.d_model) if use_ln and self.mlp is not None else nn.Identity()
        self.hook_resid_pre = HookPoint()  # (batch, pos, d_model)
        self.hook_attn_out = HookPoint()  # (batch, pos, d_model)
        self.hook_resid_mid = HookPoint()  # (batch, pos, d_model)
        self.hook_mlp_out = HookPoint()  # (batch, pos, d_model)
        self.hook_resid_post = HookPoint()  # (batch, pos, d_model)

    def forward(self, resid: torch.Tensor, key_padding: torch.Tensor | None) -> torch.Tensor:
        resid = self.hook_resid_pre(resid)
        resid = self.hook_resid_mid(resid + self.hook_attn_out(self.attn(self.ln1(resid), key_padding)))
        if self.mlp is not None:
            resid = resid + self.hook_mlp_out(self.mlp(self.ln2(resid)))
        return self.hook_resid_post(resid)


# --- 4. Transformer ------------------------------------------------------------------------------
# Embed tokens (plus positions, if learned), run the blocks, unembed into output logits.


class Transformer(HookedRootModule):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        missing = [key for key in ("d_vocab", "d_vocab_out", "n_ctx", "causal") if getattr(cfg, key) is None]
        if missing:
            raise ValueError(f"model config lacks {', '.join(missing)}: build it from ExperimentConfig.resolve()")
        self.cfg = cfg
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))
        self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model)) if cfg.positional == "learned" else None
        self.blocks = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.ln_final = LayerNorm(cfg.d_model) if cfg.normalization == "LN" else nn.Identity()
        self.W_U = nn.Parameter(torch.empty(cfg.d_model, cfg.d_vocab_out))
        self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab_out))
        self.hook_embed = HookPoint()  # (batch, pos, d_model)
        self.hook_pos_embed = HookPoint()  # (batch, pos, d_model)
        self.init_weights(cfg.seed)
        self.setup()  # TransformerLens: names every HookPoint after its module path

    def init_weights(self, seed: int) -> None:
        """TransformerLens's GPT-2 init: every weight matrix ~ N(0, (0.8 / sqrt(d_model))^2), biases 0,
        times `cfg.init_scale` (Omnigrok's alpha: the weight norm grokking starts from; LayerNorm gains stay 1)."""
        generator = torch.Generator().manual_seed(seed)
        std = 0.8 / math.sqrt(self.cfg.d_model) * self.cfg.init_scale  # * 1.0 is exact: the default init is unchanged
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.rsplit(".", 1)[-1].startswith("W_"):
                    param.copy_(torch.randn(param.shape, generator=generator) * std)

    def prepare_input(self, tokens: torch.Tensor, key_padding: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The checks and defaults of every forward pass (`forward` and the fast path share them):
        one sequence (pos,) becomes a batch of one; learned positions limit the length to n_ctx; keys
        holding `cfg.pad_token_id` are padding unless `key_padding` is given. Returns tokens (batch, pos)
        and key_padding (batch, pos; True = padding) or None when nothing is padded."""
        if tokens.ndim == 1:
            tokens = tokens[None]  # (pos,) -> (1, pos)
        n_pos = tokens.shape[1]
        if self.W_pos is not None and n_pos > self.cfg.n_ctx:
            raise ValueError(f"input of {n_pos} positions is longer than this model's n_ctx of {self.cfg.n_ctx}")
        if key_padding is None and self.cfg.pad_token_id is not None:
            key_padding = tokens == self.cfg.pad_token_id
            key_padding = key_padding if key_padding.any() else None
        return tokens, key_padding

    def forward(self, tokens: torch.Tensor, key_padding: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (batch, pos) -> logits (batch, pos, d_vocab_out).

        Padding keys (tokens equal to `cfg.pad_token_id`) get zero attention, unless
        `key_padding` (batch, pos; True = padding) is given explicitly.
        """
        tokens, key_padding = self.prepare_input(tokens, key_padding)
        resid = self.hook_embed(self.W_E[tokens])  # (batch, pos, d_model)
        if self.W_pos is not None:
            # W_pos[:pos] (pos, d_model) -> (batch, pos, d_model)
            resid = resid + self.hook_pos_embed(self.W_pos[: tokens.shape[1]].expand_as(resid))
        for block in self.blocks:
            resid = block(resid, key_padding)
        return einsum(self.ln_final(resid), self.W_U, "batch pos d_model, d_model vocab -> batch pos vocab") + self.b_U

    def forward_at(self, tokens: torch.Tensor, position: int, key_padding: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (batch, pos) -> logits (batch, d_vocab_out) at `position`: `forward(tokens)[:, position]`
        up to float rounding, gradients included, computing only what that position needs
        (section 5 below). Falls back to `forward` while a hook is attached."""
        return forward_at(self, tokens, position, key_padding)

    def run_with_cache(self, *args, **kwargs) -> tuple[torch.Tensor, ActivationCache]:
        """Like TransformerLens: `logits, cache = model.run_with_cache(tokens)`; `cache["pattern", 0]`."""
        logits, cache_dict = super().run_with_cache(*args, **kwargs)
        return logits, ActivationCache(cache_dict, self)

    @property
    def device(self) -> torch.device:
        return self.W_E.device


# --- 5. The one-position fast path ----------------------------------------------------------
# The one-position fast path: a model's logits at one position, for training.
#
# Training reads the logits of one position (the `=` of a + b, or a CLS token). In the last block
# only that position's query, attention output, MLP and unembedding reach the loss, so computing
# them for every position wastes work (2.3x the FLOPs on the Nanda et al. setup). `forward_at` does
# `Transformer.forward`'s arithmetic restricted to that position:
#
# - the earlier blocks run as usual (every position feeds the last block's keys and values);
# - in the last block, keys and values only at the positions the query can see, K and V fused into
#   one 2-D matmul, and the query at that one position;
# - the MLP is the block's own module, called on the one position;
# - for one layer without LayerNorm, Q, K and V are looked up in per-token and per-position tables.
#
# It shares `Transformer.prepare_input` with `forward`, and equals `forward(tokens)[:, position]`
# up to float rounding, gradients included (tests/test_fast_path.py is its contract). It skips the
# hook points, which are identities, so while any TransformerLens hook is attached it runs `forward`.


def hooks_attached(model: Transformer) -> bool:
    """True if any HookPoint has a hook added through TransformerLens (`add_hook`, `hooks()`,
    `run_with_hooks`, `run_with_cache`), forward or backward, temporary or permanent. Hooks added
    with plain PyTorch (`register_forward_hook`) are not TransformerLens hooks and are not seen."""
    return bool(model.list_hooks())


def forward_at(model: Transformer, tokens: torch.Tensor, position: int,
               key_padding: torch.Tensor | None = None) -> torch.Tensor:
    """tokens (batch, pos) -> logits (batch, d_vocab_out) at `position` (negative counts from the end):
    `model(tokens)[:, position]` up to float rounding, gradients included, at a fraction of the cost."""
    if hooks_attached(model):
        return model(tokens, key_padding)[:, position]
    tokens, key_padding = model.prepare_input(tokens, key_padding)  # (batch, pos), (batch, pos) | None
    n_pos = tokens.shape[1]
    if not -n_pos <= position < n_pos:
        raise IndexError(f"position {position} is outside an input of {n_pos} positions")
    pos = position % n_pos

    block = model.blocks[-1]
    n_keys = pos + 1 if block.attn.causal else n_pos  # a causal query never sees later keys
    if len(model.blocks) == 1 and isinstance(block.ln1, nn.Identity):
        # one layer, no LayerNorm: attention reads embeddings straight from per-token tables
        k, v, q = _qkv_at_from_tokens(block.attn, model.W_E, model.W_pos, tokens, pos, n_keys)
        resid_at = F.embedding(tokens[:, pos], model.W_E)  # (batch, d_model)
        if model.W_pos is not None:
            resid_at = resid_at + model.W_pos[pos]
    else:
        resid = F.embedding(tokens, model.W_E)  # (batch, pos, d_model)
        if model.W_pos is not None:
            resid = resid + model.W_pos[:n_pos]
        for earlier in model.blocks[:-1]:
            resid = earlier(resid, key_padding)
        k, v, q = _qkv_at(block.attn, block.ln1(resid), pos, n_keys)
        resid_at = resid[:, pos]  # (batch, d_model)
    resid_at = resid_at + _attend_at(block.attn, k, v, q, key_padding)  # (batch, d_model)
    if block.mlp is not None:
        # (batch, d_model) -> (batch, 1, d_model): the MLP module sees one position
        resid_at = resid_at + block.mlp(block.ln2(resid_at)[:, None])[:, 0]
    return torch.addmm(model.b_U, model.ln_final(resid_at), model.W_U)  # (batch, d_vocab_out)


def _qkv_at(attn: Attention, x: torch.Tensor, pos: int, n_keys: int) -> tuple[torch.Tensor, ...]:
    """x (batch, pos, d_model) -> keys and values at positions < n_keys (batch, key, head, d_head) and
    the query at `pos` (batch, 1, head, d_head)."""
    n_heads, d_model, d_head = attn.W_Q.shape
    batch = x.shape[0]
    keys = x[:, :n_keys].reshape(batch * n_keys, d_model)  # (batch * key, d_model)
    # (2 * head, d_model, d_head) -> (d_model, 2 * head * d_head): K's columns, then V's
    W_KV = torch.cat([attn.W_K, attn.W_V]).permute(1, 0, 2).reshape(d_model, 2 * n_heads * d_head)
    kv = torch.addmm(torch.cat([attn.b_K, attn.b_V]).reshape(-1), keys, W_KV).view(batch, n_keys, 2, n_heads, d_head)
    W_Q = attn.W_Q.permute(1, 0, 2).reshape(d_model, n_heads * d_head)  # (d_model, head * d_head)
    q = torch.addmm(attn.b_Q.reshape(-1), x[:, pos], W_Q).view(batch, 1, n_heads, d_head)
    k, v = kv.unbind(2)  # unbind's backward is one stack, not two zero-filled copies
    return k, v, q


def _qkv_at_from_tokens(attn: Attention, W_E: torch.Tensor, W_pos: torch.Tensor | None, tokens: torch.Tensor,
                        pos: int, n_keys: int) -> tuple[torch.Tensor, ...]:
    """`_qkv_at` for a first layer without LayerNorm, whose input is W_E[token] + W_pos[position]:
    (W_E[t] + W_pos[i]) W = (W_E W)[t] + (W_pos W)[i], so Q, K and V are looked up in per-token
    and per-position tables (vocab + n_ctx rows) instead of multiplied out for every batch row."""
    n_heads, d_model, d_head = attn.W_Q.shape
    batch, he = tokens.shape[0], n_heads * d_head
    # (3 * head, d_model, d_head) -> (d_model, 3 * head * d_head): Q's columns, then K's, then V's
    W_QKV = torch.cat([attn.W_Q, attn.W_K, attn.W_V]).permute(1, 0, 2).reshape(d_model, 3 * he)
    b_QKV = torch.cat([attn.b_Q, attn.b_K, attn.b_V]).reshape(-1)  # (3 * head * d_head,)
    token_table = torch.addmm(b_QKV, W_E, W_QKV)  # (vocab, 3 * he)
    q = F.embedding(tokens[:, pos], token_table[:, :he])  # (batch, he)
    kv = F.embedding(tokens[:, :n_keys], token_table[:, he:])  # (batch, key, 2 * he)
    if W_pos is not None:
        pos_table = W_pos[:n_keys] @ W_QKV  # (key, 3 * he)
        q = q + pos_table[pos, :he]
        kv = kv + pos_table[:, he:]
    k, v = kv.view(batch, n_keys, 2, n_heads, d_head).unbind(2)  # each (batch, key, head, d_head)
    return k, v, q.view(batch, 1, n_heads, d_head)


def _attend_at(attn: Attention, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor,
               key_padding: torch.Tensor | None) -> torch.Tensor:
    """One query per row attends over its keys; returns the attention output (batch, d_model)."""
    n_heads, d_head, d_model = attn.W_O.shape
    batch, n_keys = k.shape[:2]
    scores = (k * q).sum(-1) / math.sqrt(d_head)  # (batch, key, head)
    if key_padding is not None:
        scores = scores.masked_fill(key_padding[:, :n_keys, None], float("-inf"))  # (batch, key, 1)
    pattern = scores.softmax(dim=1)  # over keys
    z = (pattern[..., None] * v).sum(1)  # (batch, key, head, 1) * (batch, key, head, d_head) -> (batch, head, d_head)
    # (batch, head * d_head) @ (head * d_head, d_model)
    return torch.addmm(attn.b_O, z.reshape(batch, n_heads * d_head), attn.W_O.reshape(n_heads * d_head, d_model))
