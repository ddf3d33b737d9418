"""A small transformer, from scratch, with TransformerLens hook points.

Read top to bottom: LayerNorm, attention, the MLP, a block, the whole transformer. Every
intermediate activation passes through a `HookPoint` named as in TransformerLens (`hook_embed`, `blocks.0.attn.hook_pattern`, `blocks.0.mlp.hook_post`, ...), so

    logits, cache = model.run_with_cache(tokens)
    cache["pattern", 0]          # (batch, head, query, key)

works as TransformerLens users expect, and any activation can be patched with `run_with_hooks`.
Weights carry TransformerLens names too: `W_E`, `W_pos`, `blocks[l].attn.W_Q/W_K/W_V/W_O`,
`blocks[l].mlp.W_in/W_out`, `W_U`.

Shapes use: batch, pos (= query or key), d_model, head, d_head, d_mlp, vocab.

The architecture questions of issue 17 are config switches with the same hook names: the attention
score (`attn_score`, section 1: adds `W_score` or `v_score` per block), one block's weights at every
layer (`shared_blocks`, section 4), no skip connections (`residual = false`, section 3), and
learned, sinusoidal or no positions (`positional`, section 4).

Training reads the logits of one position only: `Transformer.forward_at` computes just those, with
these modules' weights and the same result, in section 5 at the end of this file. Analyses that read
one position (head and neuron ablations) call the same path in its two steps, `read_at` (the
residual stream, each head's z and attention row there) and `logits_at` (the rest, after replacing
what they ablate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import einsum
from torch import nn
from transformer_lens import ActivationCache, HookedRootModule
from transformer_lens.hook_points import HookPoint

from lab.config import ModelConfig
from lab.models.lookup import lookup_rows


# --- 0. LayerNorm --------------------------------------------------------------------------------
# Optional (cfg.normalization = "LN"); the Nanda et al. model has none.


def hooked(*points: HookPoint) -> bool:
    """True if any of these hook points has a hook (TransformerLens's or PyTorch's, forward or backward):
    then the computation they name must run step by step, so the hook sees and patches its values."""
    return any(point.fwd_hooks or point.bwd_hooks or point._forward_hooks or point._backward_hooks for point in points)


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
        # x: (..., d_model), normalised over its last dimension. With no hook on the scale or the
        # normalized stream (training, plain inference), PyTorch's fused kernel computes the same thing
        # in one op forward and one backward instead of several elementwise passes (4% of the text
        # model's training step); the lines below are its definition, and run whenever a hook would
        # read or patch the scale or the normalized stream.
        if not hooked(self.hook_scale, self.hook_normalized):
            return F.layer_norm(x, x.shape[-1:], self.w, self.b, self.eps)
        x = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return self.hook_normalized(x / scale) * self.w + self.b


# --- 1. Attention --------------------------------------------------------------------------------
# Each head asks, at every query position, "which earlier (or any, if bidirectional) positions
# matter to me?": a score for every (query, key) pair, masked, softmaxed over keys into a pattern,
# and the head's output at the query is the pattern-weighted sum of values.
#
# The score is `cfg.attn_score` (issue 17: why this one?), with q = W_Q x and k = W_K x per head:
#   "scaled_dot" (default)  q.k / sqrt(d_head)          Vaswani et al. 2017
#   "dot"                   q.k                         Luong et al. 2015, "dot"
#   "general"               q W_score k                 Luong et al. 2015, "general" (bilinear); W_score
#                                                       (head, d_head, d_head) starts at I / sqrt(d_head),
#                                                       i.e. as the scaled dot product, and is learned
#   "additive"              v_score . tanh(q + k)       Bahdanau et al. 2015, with v_score (head, d_head);
#                                                       costs (batch, query, key, head, d_head) memory
#
# Two ways compute the same thing. The explicit one below runs every hook point and is the reference.
# When no hook is attached to the scores or the pattern (training, plain inference), dot-product
# scores go through PyTorch's fused `scaled_dot_product_attention` instead, which never materialises
# them (q and k are computed as before, so hook_q/hook_k/hook_v/hook_z still fire); it was 1.4x to 3.5x
# faster than the explicit path at 3 to 256 positions (forward + backward, CPU). Under torch.func
# transforms (the sweeps' vmap over members) the explicit path runs: SDPA has no batching rule there,
# warns, and loops over members, 1.5x slower than the explicit path at 16 members of 17 or 64 positions.


class Attention(nn.Module):
    """Multi-head self-attention: `n_heads` independent heads, their outputs summed through W_O."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, d, e = cfg.n_heads, cfg.d_model, cfg.d_head
        self.causal = bool(cfg.causal)
        self.score = cfg.attn_score
        self.W_Q = nn.Parameter(torch.empty(h, d, e))
        self.W_K = nn.Parameter(torch.empty(h, d, e))
        self.W_V = nn.Parameter(torch.empty(h, d, e))
        self.W_O = nn.Parameter(torch.empty(h, e, d))
        self.b_Q = nn.Parameter(torch.zeros(h, e))
        self.b_K = nn.Parameter(torch.zeros(h, e))
        self.b_V = nn.Parameter(torch.zeros(h, e))
        self.b_O = nn.Parameter(torch.zeros(d))
        if self.score == "general":
            self.W_score = nn.Parameter(torch.eye(e).expand(h, e, e) / math.sqrt(e))  # (head, d_head, d_head)
        if self.score == "additive":
            self.v_score = nn.Parameter(torch.empty(h, e))  # (head, d_head)
        self.hook_q = HookPoint()  # (batch, pos, head, d_head)
        self.hook_k = HookPoint()  # (batch, pos, head, d_head)
        self.hook_v = HookPoint()  # (batch, pos, head, d_head)
        self.hook_attn_scores = HookPoint()  # (batch, head, query, key), masked entries -inf
        self.hook_pattern = HookPoint()  # (batch, head, query, key), each row sums to 1
        self.hook_z = HookPoint()  # (batch, pos, head, d_head)

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor | None) -> torch.Tensor:
        # x: (batch, pos, d_model); key_padding: (batch, key) True where the key is padding.
        # q = x W_Q + b_Q for every head, and k, v alike, as ONE matmul against W_Q, W_K, W_V side by side
        # (`_fused_qkv`, section 5), instead of three per-head einsums, each a batched matmul over heads
        # with small (pos, d_model) x (d_model, d_head) products; W_O and W_U below are one matmul each too.
        n_heads, _, d_head = self.W_Q.shape
        W_QKV, b_QKV = _fused_qkv(self)  # (d_model, 3 * head * d_head), (3 * head * d_head,)
        qkv = F.linear(x, W_QKV.T, b_QKV)  # x @ W_QKV + b_QKV: (batch, pos, 3 * head * d_head)
        # (batch, pos, 3 * head * d_head) -> (batch, pos, 3, head, d_head) -> three (batch, pos, head, d_head)
        q, k, v = qkv.unflatten(-1, (3, n_heads, d_head)).unbind(-3)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        if self.fused_applies(q):
            z = self._fused(q, k, v, key_padding)
        else:
            scores = self.hook_attn_scores(self.scores(q, k).masked_fill(self._mask(x.shape[1], key_padding, x.device), float("-inf")))
            pattern = self.hook_pattern(scores.softmax(dim=-1))  # (batch, head, query, key)
            z = einsum(pattern, v, "batch head query key, batch key head d_head -> batch query head d_head")
        z = self.hook_z(z)
        # sum over heads of z W_O as one matmul: (batch, pos, head, d_head) -> (batch, pos, head * d_head)
        # against W_O (head, d_head, d_model) -> (head * d_head, d_model)
        return F.linear(z.flatten(-2), self.W_O.flatten(0, 1).T, self.b_O)  # (batch, pos, d_model)

    def scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q, k (batch, pos, head, d_head) -> unmasked scores (batch, head, query, key), as `cfg.attn_score` says."""
        if self.score == "additive":
            # (batch, query, 1, head, d_head) + (batch, 1, key, head, d_head): every (query, key) pair's sum
            hidden = torch.tanh(q[:, :, None] + k[:, None, :])
            return einsum(hidden, self.v_score, "batch query key head d_head, head d_head -> batch head query key")
        if self.score == "general":
            q = self._bilinear(q)
        scores = einsum(q, k, "batch query head d_head, batch key head d_head -> batch head query key")
        return scores / math.sqrt(q.shape[-1]) if self.score == "scaled_dot" else scores

    def _bilinear(self, q: torch.Tensor) -> torch.Tensor:
        """q (batch, pos, head, d_head) -> q W_score, so that the general score q W_score k is a dot product with k."""
        return einsum(q, self.W_score, "batch query head d_head, head d_head d_key -> batch query head d_key")

    def fused_applies(self, q: torch.Tensor) -> bool:
        """True when `_fused` computes this forward: a dot-product score (the general one is a dot
        product of q W_score with k), no hook on the scores or pattern (which it never forms), and q
        not under a torch.func transform (vmap, grad), where the explicit path is faster."""
        return (self.score != "additive"
                and not hooked(self.hook_attn_scores, self.hook_pattern)
                and not torch._C._functorch.is_functorch_wrapped_tensor(q))

    def _fused(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding: torch.Tensor | None) -> torch.Tensor:
        """The explicit path's z (batch, query, head, d_head) through `F.scaled_dot_product_attention`."""
        if self.score == "general":
            q = self._bilinear(q)
        scale = None if self.score == "scaled_dot" else 1.0  # None: SDPA's own 1 / sqrt(d_head)
        # SDPA wants (batch, head, pos, d_head); its boolean mask is True where a query may look
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if key_padding is None:
            z = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, scale=scale)
        else:
            allowed = ~self._mask(q.shape[2], key_padding, q.device)  # (batch, 1, query, key)
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
        return z.transpose(1, 2)  # (batch, head, query, d_head) -> (batch, query, head, d_head)

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

    def forward(self, x: torch.Tensor, replace_post=None) -> torch.Tensor:
        # x: (batch, pos, d_model); the fast path calls this too, with pos = 1. F.linear is the matmul
        # and the bias add as one op, so both paths round alike. `replace_post(post) -> post` lets the
        # read-position path of section 5 ablate neurons where it runs no hook points.
        pre = self.hook_pre(F.linear(x, self.W_in.T, self.b_in))  # x @ W_in + b_in: (batch, pos, d_mlp)
        post = self.hook_post(self.act_fn(pre))  # (batch, pos, d_mlp)
        if replace_post is not None:
            post = replace_post(post)
        return F.linear(post, self.W_out.T, self.b_out)  # post @ W_out + b_out: (batch, pos, d_model)


# --- 3. Block ------------------------------------------------------------------------------------
# The residual stream is a running sum: each block reads it, and adds what attention and the MLP
# write. resid_pre -> (+ attn_out) -> resid_mid -> (+ mlp_out) -> resid_post.
# Without skip connections (`cfg.residual = false`, issue 17) each sub-layer's output replaces the
# stream instead: resid_mid = attn_out, resid_post = mlp_out (LayerNorms stay where they are).


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        use_ln = cfg.normalization == "LN"
        self.residual = cfg.residual
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
        attn_out = self.hook_attn_out(self.attn(self.ln1(resid), key_padding))
        resid = self.hook_resid_mid(resid + attn_out if self.residual else attn_out)
        if self.mlp is not None:
            mlp_out = self.hook_mlp_out(self.mlp(self.ln2(resid)))
            resid = resid + mlp_out if self.residual else mlp_out
        return self.hook_resid_post(resid)


# --- 4. Transformer ------------------------------------------------------------------------------
# Embed tokens (plus positions), run the blocks, unembed into output logits.
#
# Positions (`cfg.positional`): "learned" W_pos (n_ctx, d_model), a parameter; "sinusoidal", the fixed
# table of Vaswani et al. 2017 as a buffer named W_pos too (not trained, not saved: it is a function of
# the shape), extended on the fly for inputs longer than n_ctx; "none", no W_pos (attention is then
# permutation equivariant, and inputs may have any length).
#
# Shared blocks (`cfg.shared_blocks`, the Universal Transformer's question): every block's parameters
# are block 0's Parameter objects, so each layer keeps its own modules and hook points (blocks.{l}.…
# fire at every layer, `cache["pattern", l]` works) while `parameters()` holds one block. The state
# dict holds block 0's weights only (safetensors refuses aliased tensors) and loading re-ties them.


class Transformer(HookedRootModule):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        missing = [key for key in ("d_vocab", "d_vocab_out", "n_ctx", "causal") if getattr(cfg, key) is None]
        if missing:
            raise ValueError(f"model config lacks {', '.join(missing)}: build it from ExperimentConfig.resolve()")
        self.cfg = cfg
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))
        if cfg.positional == "learned":
            self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model))
        elif cfg.positional == "sinusoidal":
            self.register_buffer("W_pos", sinusoidal_positions(cfg.n_ctx, cfg.d_model), persistent=False)
        else:
            self.W_pos = None
        self.blocks = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        if cfg.shared_blocks:
            for block in self.blocks[1:]:
                _tie(block, self.blocks[0])
            self.register_state_dict_post_hook(_drop_shared_weights)
            self.register_load_state_dict_pre_hook(_fill_shared_weights)
        self.ln_final = LayerNorm(cfg.d_model) if cfg.normalization == "LN" else nn.Identity()
        self.W_U = nn.Parameter(torch.empty(cfg.d_model, cfg.d_vocab_out))
        self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab_out))
        self.hook_embed = HookPoint()  # (batch, pos, d_model)
        self.hook_pos_embed = HookPoint()  # (batch, pos, d_model)
        self.init_weights(cfg.seed)
        self.setup()  # TransformerLens: names every HookPoint after its module path

    def init_weights(self, seed: int) -> None:
        """TransformerLens's GPT-2 init: every weight matrix ~ N(0, (0.8 / sqrt(d_model))^2), biases 0,
        times `cfg.init_scale` (Omnigrok's alpha: the weight norm grokking starts from; LayerNorm gains stay 1).
        The attention score's own weights: `v_score` (additive) is drawn like a weight matrix; `W_score`
        (general) starts at I / sqrt(d_head), so the general score begins as the scaled dot product."""
        generator = torch.Generator().manual_seed(seed)
        std = 0.8 / math.sqrt(self.cfg.d_model) * self.cfg.init_scale  # * 1.0 is exact: the default init is unchanged
        with torch.no_grad():
            for name, param in self.named_parameters():  # shared blocks: one block's, once
                leaf = name.rsplit(".", 1)[-1]
                if leaf == "W_score":
                    d_head = param.shape[-1]
                    param.copy_(torch.eye(d_head).expand_as(param) / math.sqrt(d_head))
                elif leaf.startswith("W_") or leaf == "v_score":
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
        if self.cfg.positional == "learned" and n_pos > self.cfg.n_ctx:
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
        resid = self.hook_embed(lookup_rows(self.W_E, tokens))  # (batch, pos, d_model)
        if self.W_pos is not None:
            # W_pos[:pos] (pos, d_model) -> (batch, pos, d_model)
            resid = resid + self.hook_pos_embed(self.positions(tokens.shape[1]).expand_as(resid))
        for block in self.blocks:
            resid = block(resid, key_padding)
        return F.linear(self.ln_final(resid), self.W_U.T, self.b_U)  # resid @ W_U + b_U: (batch, pos, d_vocab_out)

    def positions(self, n_pos: int) -> torch.Tensor:
        """The positional embeddings of the first `n_pos` positions (n_pos, d_model); sinusoidal ones
        exist for any length."""
        if n_pos > self.W_pos.shape[0]:  # only sinusoidal positions get here (prepare_input refuses learned ones)
            return sinusoidal_positions(n_pos, self.cfg.d_model).to(self.W_pos)
        return self.W_pos[:n_pos]

    def forward_at(self, tokens: torch.Tensor, position: int | None, key_padding: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (batch, pos) -> logits (batch, d_vocab_out) at `position`: `forward(tokens)[:, position]`
        up to float rounding, gradients included, computing only what that position needs
        (section 5 below). Falls back to `forward` while a hook is attached. `position=None` (a task with
        a target at every position, a language model) is `forward(tokens)`: logits (batch, pos, d_vocab_out)."""
        if position is None:
            return self(tokens, key_padding)
        return forward_at(self, tokens, position, key_padding)

    def read_at(self, tokens: torch.Tensor, position: int, key_padding: torch.Tensor | None = None) -> ReadAt:
        """What the last block reads and computes at `position` (section 5): the residual stream entering
        it (batch, d_model), each head's z (batch, head, d_head) and attention row (batch, head, key).
        `model.logits_at(read.resid, read.z)` finishes the forward: equal to `forward_at`."""
        return read_at(self, tokens, position, key_padding)

    def logits_at(self, resid: torch.Tensor, z: torch.Tensor, replace_post=None) -> torch.Tensor:
        """The last block after attention, at one position: (resid, z) of `read_at`, ablated or not ->
        logits (..., d_vocab_out); `replace_post` rewrites the MLP's activations (section 5)."""
        return logits_at(self, resid, z, replace_post)

    def run_with_cache(self, *args, **kwargs) -> tuple[torch.Tensor, ActivationCache]:
        """Like TransformerLens: `logits, cache = model.run_with_cache(tokens)`; `cache["pattern", 0]`."""
        logits, cache_dict = super().run_with_cache(*args, **kwargs)
        return logits, ActivationCache(cache_dict, self)

    @property
    def device(self) -> torch.device:
        return self.W_E.device


def sinusoidal_positions(n_pos: int, d_model: int) -> torch.Tensor:
    """Vaswani et al. 2017, section 3.5: PE[pos, 2i] = sin(pos / 10000^(2i / d_model)), PE[pos, 2i + 1] =
    cos(the same). (n_pos, d_model); an odd d_model's last column is a sine."""
    position = torch.arange(n_pos, dtype=torch.float64)[:, None]  # (pos, 1)
    frequency = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)  # (ceil(d_model / 2),)
    angles = position * frequency  # (pos, ceil(d_model / 2))
    table = torch.empty(n_pos, d_model, dtype=torch.float64)
    table[:, 0::2] = angles.sin()
    table[:, 1::2] = angles.cos()[:, : d_model // 2]
    return table.float()


def _tie(block: nn.Module, first: nn.Module) -> None:
    """Make every parameter of `block` the very Parameter object of `first` (same module layout)."""
    for module, source in zip(block.modules(), first.modules()):
        for name, param in source.named_parameters(recurse=False):
            setattr(module, name, param)


def _shared_keys(model: "Transformer", prefix: str) -> list[tuple[str, str]]:
    """(key of a later block's tied weight, block 0's key for it) in a state dict with this prefix."""
    first = dict(model.blocks[0].named_parameters())
    return [(f"{prefix}blocks.{layer}.{name}", f"{prefix}blocks.0.{name}")
            for layer in range(1, len(model.blocks)) for name in first]


def _drop_shared_weights(model: "Transformer", state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: block 0's weights only (safetensors refuses tensors that share memory)."""
    for key, _ in _shared_keys(model, prefix):
        state_dict.pop(key, None)


def _fill_shared_weights(model: "Transformer", state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: every layer loads block 0's weights (into the same, tied Parameters)."""
    for key, first in _shared_keys(model, prefix):
        if first in state_dict:
            state_dict.setdefault(key, state_dict[first])


# --- 5. The one-position path -------------------------------------------------------------------
# A model's computation at one position: for training, and for the analyses that read one position.
#
# Training reads the logits of one position (the `=` of a + b, or a CLS token). In the last block
# only that position's query, attention output, MLP and unembedding reach the loss, so computing
# them for every position wastes work (2.3x the FLOPs on the Nanda et al. setup). `forward_at` does
# `Transformer.forward`'s arithmetic restricted to that position, in two steps that analyses call
# on their own:
#
# - `read_at`: the earlier blocks run as usual (every position feeds the last block's keys and
#   values); in the last block, keys and values only at the positions the query can see, K and V
#   fused into one 2-D matmul, and the query at that one position; for one layer without LayerNorm,
#   Q, K and V come from per-token and per-position tables, and for large batches the attention
#   scores from a (query token, key position, key token) table (and for analyses of one layer
#   without positions over inputs longer than the vocabulary, attention is summed per token:
#   `_read_at_by_rows`). It returns the residual stream entering the last block there, each head's
#   `z` there and the attention row (`ReadAt`).
# - `logits_at`: the rest of the last block from (resid, z): W_O, the block's own MLP module on the
#   one position, the unembedding. An analysis replaces heads' `z` between the two steps (ablating
#   every head of the last block from one `read_at`), or neurons with `replace_post`.
#
# It shares `Transformer.prepare_input` with `forward`, and equals `forward(tokens)[:, position]`
# up to float rounding, gradients included (tests/test_fast_path.py is its contract). It skips the
# last block's and the embedding's hook points, which are identities: while any TransformerLens hook
# is attached `forward_at` runs `forward`, and `read_at` runs the earlier blocks as modules, so
# hooks there apply (how analyses patch an earlier layer), and refuses hooks where it runs none.
#
# It implements the default transformer and these variants: shared blocks (the last block's weights
# are the shared ones), sinusoidal positions within n_ctx. For the others (attn_score other than
# "scaled_dot", residual = false, sinusoidal inputs longer than n_ctx) `forward_at` runs
# `forward(tokens)[:, position]`, and `read_at` raises ValueError (`_unsupported_variant`).


@dataclass
class ReadAt:
    """The last block at one position, for a batch of inputs: `resid` (batch, d_model), the residual
    stream entering the last block there; `z` (batch, head, d_head), each last-block head's output
    there (TransformerLens's `hook_z` at that query); `pattern` (batch, head, key), its attention row
    over the keys the query can see (the first position + 1 for a causal model, else all)."""

    resid: torch.Tensor
    z: torch.Tensor
    pattern: torch.Tensor


def hooks_attached(model: Transformer) -> bool:
    """True if any HookPoint has a hook added through TransformerLens (`add_hook`, `hooks()`,
    `run_with_hooks`, `run_with_cache`), forward or backward, temporary or permanent. Hooks added
    with plain PyTorch (`register_forward_hook`) are not TransformerLens hooks and are not seen."""
    return bool(model.list_hooks())


def forward_at(model: Transformer, tokens: torch.Tensor, position: int,
               key_padding: torch.Tensor | None = None) -> torch.Tensor:
    """tokens (batch, pos) -> logits (batch, d_vocab_out) at `position` (negative counts from the end):
    `model(tokens)[:, position]` up to float rounding, gradients included, at a fraction of the cost."""
    if hooks_attached(model) or _unsupported_variant(model, tokens):
        return model(tokens, key_padding)[:, position]
    read = _read_at(model, tokens, position, key_padding)
    return logits_at(model, read.resid, read.z)


def read_at(model: Transformer, tokens: torch.Tensor, position: int,
            key_padding: torch.Tensor | None = None) -> ReadAt:
    """tokens (batch, pos) -> `ReadAt` at `position`: what the last block reads and computes there.
    Hooks on the earlier blocks apply; a hook where this path runs no hook point (the embeddings,
    the last block, ln_final) raises ValueError, since it would be silently skipped, and so does a
    model variant this path does not implement."""
    variant = _unsupported_variant(model, tokens)
    if variant:
        raise ValueError(f"read_at does not implement {variant}; use model.run_with_cache and read the last block's hooks")
    last = len(model.blocks) - 1
    skipped = [name for name, point in model.hook_dict.items()
               if (point.fwd_hooks or point.bwd_hooks) and not _in_earlier_block(name, last)]
    if skipped:
        raise ValueError(f"a hook on {skipped[0]} would not run: read_at runs hook points only in blocks 0..{last - 1}; "
                         "use model.run_with_hooks for hooks there")
    return _read_at(model, tokens, position, key_padding, by_rows=True)


def _unsupported_variant(model: Transformer, tokens: torch.Tensor) -> str | None:
    """The model setting this path does not implement, as a phrase, or None if it implements them all."""
    cfg = model.cfg
    if cfg.attn_score != "scaled_dot":
        return f"model.attn_score = {cfg.attn_score!r}"
    if not cfg.residual:
        return "model.residual = false"
    if model.W_pos is not None and tokens.shape[-1] > model.W_pos.shape[0]:
        return f"sinusoidal positions beyond n_ctx = {model.W_pos.shape[0]}"
    return None


def _in_earlier_block(hook_name: str, last: int) -> bool:
    parts = hook_name.split(".")
    return parts[0] == "blocks" and int(parts[1]) < last


def _read_at(model: Transformer, tokens: torch.Tensor, position: int, key_padding: torch.Tensor | None,
             by_rows: bool = False) -> ReadAt:
    """`read_at` without the hook check. `by_rows`: allow `_read_at_by_rows` for one-layer models."""
    tokens, key_padding = model.prepare_input(tokens, key_padding)  # (batch, pos), (batch, pos) | None
    n_pos = tokens.shape[1]
    if not -n_pos <= position < n_pos:
        raise IndexError(f"position {position} is outside an input of {n_pos} positions")
    pos = position % n_pos

    block = model.blocks[-1]
    n_keys = pos + 1 if block.attn.causal else n_pos  # a causal query never sees later keys
    if by_rows and len(model.blocks) == 1 and model.W_pos is None and model.W_E.shape[0] < n_keys:
        return _read_at_by_rows(model, tokens, pos, n_keys, key_padding)
    if len(model.blocks) == 1 and isinstance(block.ln1, nn.Identity):
        # one layer, no LayerNorm: attention reads embeddings straight from per-token tables
        scores, v = _scores_v_from_tokens(block.attn, model.W_E, model.W_pos, tokens, pos, n_keys)
        resid_at = lookup_rows(model.W_E, tokens[:, pos])  # (batch, d_model)
        if model.W_pos is not None:
            resid_at = resid_at + model.W_pos[pos]
    else:
        resid = lookup_rows(model.W_E, tokens)  # (batch, pos, d_model)
        if model.W_pos is not None:
            resid = resid + model.W_pos[:n_pos]
        for earlier in model.blocks[:-1]:
            resid = earlier(resid, key_padding)
        k, v, q = _qkv_at(block.attn, block.ln1(resid), pos, n_keys)
        scores = (k * q).sum(-1) / math.sqrt(k.shape[-1])  # (batch, key, head)
        resid_at = resid[:, pos]  # (batch, d_model)
    z, pattern = _attend_at(scores, v, key_padding)
    return ReadAt(resid_at, z, pattern)


def logits_at(model: Transformer, resid: torch.Tensor, z: torch.Tensor, replace_post=None) -> torch.Tensor:
    """The rest of the last block at one position: resid (..., d_model) plus the heads' z (..., head,
    d_head) through W_O, then the MLP (with `replace_post(post) -> post` applied to its activations
    (rows, 1, d_mlp), if given) and the unembedding -> logits (..., d_vocab_out). Leading dimensions
    are batch-like: e.g. (variant, batch, ...) evaluates several ablations of one `read_at` at once."""
    block = model.blocks[-1]
    n_heads, d_head, d_model = block.attn.W_O.shape
    lead = resid.shape[:-1]
    # (..., head, d_head) -> (rows, head * d_head) @ (head * d_head, d_model)
    attn_out = torch.addmm(block.attn.b_O, z.reshape(-1, n_heads * d_head), block.attn.W_O.reshape(n_heads * d_head, d_model))
    resid = resid.reshape(-1, d_model) + attn_out  # (rows, d_model)
    if block.mlp is not None:
        # (rows, d_model) -> (rows, 1, d_model): the MLP module sees one position
        resid = resid + block.mlp(block.ln2(resid)[:, None], replace_post)[:, 0]
    logits = torch.addmm(model.b_U, model.ln_final(resid), model.W_U)  # (rows, d_vocab_out)
    return logits.view(*lead, logits.shape[-1])


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


def _scores_v_from_tokens(attn: Attention, W_E: torch.Tensor, W_pos: torch.Tensor | None, tokens: torch.Tensor,
                          pos: int, n_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention scores (batch, key, head) and values (batch, key, head, d_head) at `pos` for a first
    layer without LayerNorm, whose input is W_E[token] + W_pos[position]: (W_E[t] + W_pos[i]) W =
    (W_E W)[t] + (W_pos W)[i], so Q, K and V are per-token plus per-position tables (vocab + n_ctx
    rows), and a query's score against a key depends only on (query token, key position, key token):
    scores are looked up in that (vocab, key, vocab, head) table instead of multiplied out for every
    batch row (per-row q * k products were a fifth of a vmapped sweep step). It is used when it has no
    more entries than those products (vocab^2 * key * head <= batch * key * head * d_head): it is then
    one small matmul against several memory-bound passes over (batch, key, head, d_head)."""
    n_heads, d_model, d_head = attn.W_Q.shape
    (batch, _), vocab, he = tokens.shape, W_E.shape[0], n_heads * d_head
    W_QKV, b_QKV = _fused_qkv(attn)
    token_table = torch.addmm(b_QKV, W_E, W_QKV)  # (vocab, 3 * he)
    q_table = token_table[:, :he]  # (vocab, he): the query of each token at `pos`
    k_table = token_table[None, :, he:2 * he].expand(n_keys, vocab, he)  # (key, vocab, he)
    v = lookup_rows(token_table[:, 2 * he:], tokens[:, :n_keys])  # (batch, key, he)
    if W_pos is not None:
        pos_table = W_pos[:n_keys] @ W_QKV  # (key, 3 * he)
        q_table = q_table + pos_table[pos, :he]
        k_table = k_table + pos_table[:, None, he:2 * he]  # each key position's own keys
        v = v + pos_table[:, 2 * he:]
    if vocab * vocab > batch * d_head:  # a table larger than the per-row products it would replace
        q = lookup_rows(q_table, tokens[:, pos]).view(batch, 1, n_heads, d_head)
        # key row of (position i, token t) = k_table[i, t]: (batch, key, head, d_head)
        entry = torch.arange(n_keys, device=tokens.device) * vocab + tokens[:, :n_keys]  # (batch, key): row of (i, t)
        k = lookup_rows(k_table.reshape(n_keys * vocab, he), entry).view(batch, n_keys, n_heads, d_head)
        scores = (k * q).sum(-1) / math.sqrt(d_head)  # (batch, key, head)
    else:
        score_table = einsum(q_table.view(vocab, n_heads, d_head), k_table.reshape(n_keys, vocab, n_heads, d_head),
                             "query head d_head, key token head d_head -> query key token head") / math.sqrt(d_head)
        # each (row, key)'s entry of the flattened table: query token, then key position, then key token
        entry = (tokens[:, pos, None] * n_keys + torch.arange(n_keys, device=tokens.device)) * vocab + tokens[:, :n_keys]
        scores = lookup_rows(score_table.reshape(-1, n_heads), entry)  # (batch, key, head)
    return scores, v.view(batch, n_keys, n_heads, d_head)


def _fused_qkv(attn: Attention) -> tuple[torch.Tensor, torch.Tensor]:
    """W_Q, W_K, W_V as one (d_model, 3 * head * d_head) matrix (Q's columns, then K's, then V's), and their biases."""
    n_heads, d_model, d_head = attn.W_Q.shape
    # (3 * head, d_model, d_head) -> (d_model, 3 * head * d_head)
    W_QKV = torch.cat([attn.W_Q, attn.W_K, attn.W_V]).permute(1, 0, 2).reshape(d_model, 3 * n_heads * d_head)
    return W_QKV, torch.cat([attn.b_Q, attn.b_K, attn.b_V]).reshape(-1)  # bias: (3 * head * d_head,)


def _read_at_by_rows(model: Transformer, tokens: torch.Tensor, pos: int, n_keys: int,
                     key_padding: torch.Tensor | None) -> ReadAt:
    """`_read_at` for a one-layer model without positional embeddings, summing over the vocabulary
    ("rows") instead of over keys, for inputs with more keys than the vocabulary has tokens.

    The attention's input at a key is then a function of its token alone (the embedding, LayerNorm'd
    or not), so Q, K and V are computed once per token in a table, scores are looked up in it, and
    each head's z is its pattern summed per token times that token's value. a_and_b's test strings
    have up to 257 keys over a vocabulary of 29, and its Heads analyses run 5x faster than per key. Training
    keeps `_read_at`'s per-key order (rounding as `forward` does, in sweeps as in single runs), so only
    `read_at` (the analyses) takes this one."""
    block = model.blocks[0]
    n_heads, _, d_head = block.attn.W_Q.shape
    batch = tokens.shape[0]
    ids = tokens[:, :n_keys]  # (batch, key): each key's row of the table = its token
    W_QKV, b_QKV = _fused_qkv(block.attn)
    table = torch.addmm(b_QKV, block.ln1(model.W_E), W_QKV)  # (row, 3 * head * d_head)
    q_table, k_table, v_table = table.view(-1, 3, n_heads, d_head).unbind(1)  # each (row, head, d_head)
    q = lookup_rows(q_table, ids[:, pos])  # (batch, head, d_head)
    row_scores = einsum(q, k_table, "batch head d_head, row head d_head -> batch head row") / math.sqrt(d_head)
    scores = row_scores.gather(-1, ids[:, None, :].expand(batch, n_heads, n_keys))  # (batch, head, key)
    if key_padding is not None:
        scores = scores.masked_fill(key_padding[:, None, :n_keys], float("-inf"))  # (batch, 1, key)
    pattern = scores.softmax(dim=-1)  # (batch, head, key)
    # each key's attention added onto its row: (batch, head, key) -> (batch, head, row)
    row_weights = torch.zeros_like(row_scores).scatter_add(-1, ids[:, None, :].expand_as(pattern), pattern)
    z = einsum(row_weights, v_table, "batch head row, row head d_head -> batch head d_head")
    return ReadAt(lookup_rows(model.W_E, ids[:, pos]), z, pattern)


def _attend_at(scores: torch.Tensor, v: torch.Tensor,
               key_padding: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per row attends over its keys' scores (batch, key, head) and values (batch, key, head,
    d_head): z (batch, head, d_head) and the pattern (batch, head, key)."""
    n_keys = scores.shape[1]
    if key_padding is not None:
        scores = scores.masked_fill(key_padding[:, :n_keys, None], float("-inf"))  # (batch, key, 1)
    pattern = scores.softmax(dim=1)  # over keys
    z = (pattern[..., None] * v).sum(1)  # (batch, key, head, 1) * (batch, key, head, d_head) -> (batch, head, d_head)
    return z, pattern.transpose(1, 2)  # (batch, key, head) -> (batch, head, key)
