"""`lab bench`'s full-sequence step: a language model's training step (logits at every position,
cross-entropy over every target token, AdamW), ours against PyTorch's own encoder and the
TransformerLens bridge, on the same weights and the same batch.

- ours: `Trainer.update` of the experiment (by default the shipped text experiment,
  experiments/shakespeare.toml), the step `lab train` runs: `model.forward_at(tokens, None)`, the
  task's loss, fused AdamW.
- PyTorch: `torch.nn.TransformerEncoder` of the same shapes (d_model, heads, d_mlp, layers,
  activation; pre-LayerNorm blocks, `norm_first=True`, as ours; no dropout), causal
  (`is_causal=True` with the causal mask, so its attention runs PyTorch's fused
  `scaled_dot_product_attention`), between an `nn.Embedding` (plus our learned positions) and an
  `nn.Linear` unembedding, with our weights copied in. Its optimiser is ours (`make_adamw`), so the
  ratio compares the models' forward and backward passes. PyTorch's encoder layer always has its two
  LayerNorms: for a model without LayerNorm (`normalization = "none"`) they are replaced by
  identities, which is that model's function.
- TransformerLens: a `TransformerBridge.boot_native` of the same config with our weights
  (`lab.models.export.to_transformer_lens`), full-sequence logits, the same cross-entropy,
  `torch.optim.AdamW` with its defaults, as a TransformerLens user trains.

The three steps and a matmul that probes the machine's peak run interleaved, round by round
(`lab.bench.measure.interleaved_medians`), so they see the same machine load; medians are reported.
`share_of_matmul_peak` = (matmul FLOPs of the step, `sequence_step_flops`, / its median time) / the
probe's FLOP/s: what is left of the step beyond the matmul work every implementation must do. Before
timing, both baselines' logits are compared with ours on the batch (`*_same_logits_max_abs_diff`: they
are the same model), and one forward of each is traced to name the attention kernel it runs
(`attention_ops`).
"""

from __future__ import annotations

import json
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lab.bench.measure import interleaved_medians, matmul_n, matmul_sample, sequence_step_flops
from lab.config import load_experiment
from lab.errors import ConfigError
from lab.models.export import to_transformer_lens
from lab.tasks.base import IGNORE_INDEX
from lab.training.trainer import Trainer, make_adamw


class TorchEncoderLM(nn.Module):
    """PyTorch's own causal `nn.TransformerEncoder` language model with a lab transformer's shapes and
    weights: embedding (+ learned positions), pre-LN encoder layers, final LayerNorm, unembedding."""

    def __init__(self, model: nn.Module):
        super().__init__()
        cfg = model.cfg
        comparable = {"arch": (cfg.arch, ("transformer",)), "attn_only": (cfg.attn_only, (False,)),
                      "attn_score": (cfg.attn_score, ("scaled_dot",)), "shared_blocks": (cfg.shared_blocks, (False,)),
                      "residual": (cfg.residual, (True,)), "causal": (cfg.causal, (True,)),
                      "positional": (cfg.positional, ("learned", "none"))}
        for key, (value, valid) in comparable.items():
            if value not in valid:
                raise ConfigError(f"model.{key} = {value!r} has no equivalent in PyTorch's TransformerEncoder "
                                  f"(the full-sequence bench needs {' or '.join(map(repr, valid))})")
        if cfg.n_heads * cfg.d_head != cfg.d_model:
            raise ConfigError(f"model.n_heads * model.d_head = {cfg.n_heads * cfg.d_head} differs from d_model = {cfg.d_model}: "
                              "PyTorch's TransformerEncoder splits d_model into its heads")
        d, h, e, layers = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.n_layers
        with torch.no_grad():
            self.embed = nn.Embedding(cfg.d_vocab, d, _weight=model.W_E.detach().clone())
            self.W_pos = nn.Parameter(model.W_pos.detach().clone()) if model.W_pos is not None else None
            layer = nn.TransformerEncoderLayer(d, h, dim_feedforward=cfg.d_mlp, dropout=0.0, activation=cfg.act_fn,
                                               layer_norm_eps=1e-5, batch_first=True, norm_first=True)
            use_ln = cfg.normalization == "LN"
            self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(d, eps=1e-5) if use_ln else None,
                                                 enable_nested_tensor=False)
            for ours, theirs in zip(model.blocks, self.encoder.layers):
                attn = ours.attn
                # (head, d_model, d_head) -> (head * d_head, d_model): rows Q, then K, then V, as in_proj_weight
                theirs.self_attn.in_proj_weight.copy_(torch.cat([W.permute(0, 2, 1).reshape(h * e, d)
                                                                 for W in (attn.W_Q, attn.W_K, attn.W_V)]))
                theirs.self_attn.in_proj_bias.copy_(torch.cat([attn.b_Q, attn.b_K, attn.b_V]).reshape(-1))
                theirs.self_attn.out_proj.weight.copy_(attn.W_O.reshape(h * e, d).T)  # (d_model, head * d_head)
                theirs.self_attn.out_proj.bias.copy_(attn.b_O)
                theirs.linear1.weight.copy_(ours.mlp.W_in.T)  # (d_mlp, d_model)
                theirs.linear1.bias.copy_(ours.mlp.b_in)
                theirs.linear2.weight.copy_(ours.mlp.W_out.T)  # (d_model, d_mlp)
                theirs.linear2.bias.copy_(ours.mlp.b_out)
                if use_ln:
                    for norm, ln in ((theirs.norm1, ours.ln1), (theirs.norm2, ours.ln2)):
                        norm.weight.copy_(ln.w)
                        norm.bias.copy_(ln.b)
                else:  # the encoder layer's LayerNorms are not part of this model
                    theirs.norm1, theirs.norm2 = nn.Identity(), nn.Identity()
            if use_ln:
                self.encoder.norm.weight.copy_(model.ln_final.w)
                self.encoder.norm.bias.copy_(model.ln_final.b)
            self.unembed = nn.Linear(d, cfg.d_vocab_out)
            self.unembed.weight.copy_(model.W_U.T)  # (d_vocab_out, d_model)
            self.unembed.bias.copy_(model.b_U)
        self.to(model.W_E.device)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (batch, pos) -> logits (batch, pos, d_vocab_out)."""
        n_pos = tokens.shape[1]
        x = self.embed(tokens)  # (batch, pos, d_model)
        if self.W_pos is not None:
            x = x + self.W_pos[:n_pos]
        # (query, key): -inf above the diagonal
        mask = nn.Transformer.generate_square_subsequent_mask(n_pos, device=tokens.device)
        return self.unembed(self.encoder(x, mask=mask, is_causal=True))


def attention_ops(forward: Callable[[], object]) -> list[str]:
    """The ATen ops with "attention" or "softmax" in their name that one call of `forward` runs: which
    attention kernel a model uses (e.g. `_scaled_dot_product_flash_attention_for_cpu`, or `_softmax`
    for an explicit softmax(q k^T) v)."""
    seen: set[str] = set()

    class Trace(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if "attention" in name or "softmax" in name:
                seen.add(name)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Trace():
        forward()
    return sorted(seen)


def sequence_step(model: nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor,
                  labels: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One language-model training step of `model` (tokens -> logits at every position) on a fixed batch:
    mean cross-entropy over the target tokens (labels (batch, pos), IGNORE_INDEX where none), backward, step."""

    def step() -> torch.Tensor:
        logits = model(tokens)  # (batch, pos, vocab)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def bench_sequence_step(rounds: int, device: torch.device, log: Callable[[str], None],
                        experiment: str = "shakespeare") -> dict:
    """Median step times of ours, PyTorch's encoder and the TransformerLens bridge (interleaved), their
    ratios, tokens per second, the logits check and each one's attention kernel (see the module docstring)."""
    config = load_experiment(experiment, [f"train.device={json.dumps(device.type)}"]).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        ours = Trainer(config, Path(tmp) / "run", progress=False)
    if ours.task.read_position is not None:
        raise ConfigError(f"experiment {experiment!r} reads one position (task {ours.task.name!r}); the full-sequence "
                          "step needs a next-token task (read_position None), e.g. shakespeare")
    batch = ours.batch(0)  # the batch size `lab train` steps with; the baselines step on this batch
    tokens, labels = batch.tokens, batch.labels
    encoder = TorchEncoderLM(ours.model).train()
    log("importing TransformerLens for the full-sequence baseline ...")
    bridge = to_transformer_lens(ours.model, requires_grad=True).to(device, print_details=False).train()
    with torch.no_grad():
        reference = ours.model.forward_at(tokens, None)
        same_encoder = (encoder(tokens) - reference).abs().max().item()
        same_bridge = (bridge(tokens) - reference).abs().max().item()
    kernels = {"ours": attention_ops(lambda: ours.model.forward_at(tokens, None)),
               "torch_encoder": attention_ops(lambda: encoder(tokens)),
               "transformer_lens": attention_ops(lambda: bridge(tokens))}
    tc = config.train
    steps = {
        "transformer_lens": sequence_step(bridge, torch.optim.AdamW(bridge.parameters(), lr=tc.lr, betas=tc.betas,
                                                                    weight_decay=tc.weight_decay), tokens, labels),
        "ours": ours.update,
        "torch_encoder": sequence_step(encoder, make_adamw(encoder.parameters(), tc), tokens, labels),
    }
    n = matmul_n(device)
    peak_flops, steps["matmul"] = matmul_sample(n, device)
    batch_size, n_pos = tokens.shape
    log(f"timing {rounds} interleaved rounds of the full-sequence step ({experiment}: batch {batch_size} x {n_pos} "
        f"tokens): TransformerLens, ours, PyTorch's TransformerEncoder, a {n}^3 matmul ...")
    times = interleaved_medians(steps, rounds=rounds, warmup=3, device=device)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    cfg = config.model
    flops = sequence_step_flops(cfg, batch_size, n_pos)
    return {
        "experiment": experiment,
        "model": {"n_layers": cfg.n_layers, "d_model": cfg.d_model, "n_heads": cfg.n_heads, "d_mlp": cfg.d_mlp,
                  "d_vocab": cfg.d_vocab, "n_ctx": cfg.n_ctx, "normalization": cfg.normalization},
        "batch": batch_size,
        "positions": n_pos,
        "rounds": rounds,
        "ours_ms": 1e3 * med["ours"],
        "torch_encoder_ms": 1e3 * med["torch_encoder"],
        "transformer_lens_ms": 1e3 * med["transformer_lens"],
        "speedup_vs_torch_encoder": med["torch_encoder"] / med["ours"],
        "speedup_vs_transformer_lens": med["transformer_lens"] / med["ours"],
        "ours_tokens_per_s": batch_size * n_pos / med["ours"],
        "torch_encoder_tokens_per_s": batch_size * n_pos / med["torch_encoder"],
        "transformer_lens_tokens_per_s": batch_size * n_pos / med["transformer_lens"],
        "flops_per_step": flops,
        "ours_gflops_per_s": flops / med["ours"] / 1e9,
        "matmul_peak_gflops_per_s": peak_flops / med["matmul"] / 1e9,
        "share_of_matmul_peak": flops / med["ours"] / (peak_flops / med["matmul"]),
        "torch_encoder_share_of_matmul_peak": flops / med["torch_encoder"] / (peak_flops / med["matmul"]),
        "torch_encoder_same_logits_max_abs_diff": same_encoder,
        "transformer_lens_same_logits_max_abs_diff": same_bridge,
        "attention_ops": kernels,
    }
