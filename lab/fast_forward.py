"""The one-position fast path: a model's logits at one position, for training.

Training reads the logits of one position (the `=` of a + b, or a CLS token). In the last block
only that position's query, attention output, MLP and unembedding reach the loss, so computing
them for every position wastes work (2.3x the FLOPs on the Nanda et al. setup). `forward_at` does
`Transformer.forward`'s arithmetic restricted to that position:

- the earlier blocks run as usual (every position feeds the last block's keys and values);
- in the last block, keys and values only at the positions the query can see, K and V fused into
  one 2-D matmul, and the query at that one position;
- the MLP is the block's own module, called on the one position;
- for one layer without LayerNorm, Q, K and V are looked up in per-token and per-position tables.

It shares `Transformer.prepare_input` with `forward`, and equals `forward(tokens)[:, position]`
up to float rounding, gradients included (tests/test_fast_path.py is its contract). It skips the
hook points, which are identities, so while any TransformerLens hook is attached it runs `forward`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # annotations only: lab.model imports this module
    from lab.model import Attention, Transformer


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
