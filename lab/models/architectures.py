"""The architecture ladder: `build_model(config.model)` builds the model `[model] arch` names.

    arch = "transformer"   lab/models/transformer.py: attention reads the input, position by position (the default)
    arch = "mlp"           lab/models/mlp.py: embeddings concatenated (fixed-length input) or averaged, then hidden layers
    arch = "cnn"           lab/models/cnn.py: 1-D convolutions over the embeddings, then a global max pool
    arch = "linear"        lab/models/linear.py: a perceptron over one-hot tokens (fixed length) or token counts
    arch = "lstm"          lab/models/lstm.py: an LSTM reads the tokens left to right, carrying one state (h, c)

Every model is a TransformerLens `HookedRootModule` (so `run_with_cache` and `run_with_hooks` work), has
`cfg`, `forward(tokens, key_padding=None)` and `forward_at(tokens, position)`, and is trained, saved,
resumed and loaded by the same code (`lab.training.trainer`, `Run.model()`). The models below the transformer
give one answer per input: their `forward` returns (batch, 1, d_vocab_out), so `logits[:, read_position]`
reads it for a read position of 0 or -1 alike. The LSTM answers at every position on a causal task (a language
model, like the transformer) and once per input, after its last token, on a non-causal one (like the pooled models).

Analyses that read attention (patterns, head ablations, letter attention, the TransformerLens export)
call `require_attention` first and say in one line that another architecture has none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformer_lens import HookedRootModule

from lab.models.pooled import PooledModel

ARCHS = ("transformer", "mlp", "cnn", "linear", "lstm")


def build_model(cfg) -> HookedRootModule:
    """The model a resolved `ModelConfig` describes, with its seeded initial weights."""
    if cfg.arch == "transformer":
        from lab.models.transformer import Transformer

        return Transformer(cfg)
    if cfg.arch == "mlp":
        from lab.models.mlp import MLPClassifier

        return MLPClassifier(cfg)
    if cfg.arch == "cnn":
        from lab.models.cnn import CNNClassifier

        return CNNClassifier(cfg)
    if cfg.arch == "linear":
        from lab.models.linear import LinearClassifier

        return LinearClassifier(cfg)
    if cfg.arch == "lstm":
        from lab.models.lstm import LSTMModel

        return LSTMModel(cfg)
    raise ValueError(f"unknown model.arch {cfg.arch!r}; valid: {', '.join(map(repr, ARCHS))}")


def count_params(model: torch.nn.Module) -> int:
    """Number of trained numbers (every parameter element)."""
    return sum(param.numel() for param in model.parameters())


def n_params(cfg) -> int:
    """Parameter count of the model a resolved `ModelConfig` describes (these models build in milliseconds)."""
    return count_params(build_model(cfg))


def is_model(obj) -> bool:
    """True for any model `build_model` makes (what analyses accept as a bare model)."""
    from lab.models.transformer import Transformer

    return isinstance(obj, (Transformer, PooledModel))


def arch_of(run_or_model) -> str:
    """The architecture of a model or a Run (this module sits below lab.runs.run: callers load run folders)."""
    cfg = getattr(run_or_model, "cfg", None)  # a model
    if cfg is not None:
        return getattr(cfg, "arch", "transformer")
    config = getattr(run_or_model, "config", None)  # a Run
    if config is None:
        raise TypeError(f"expected a model or a Run, got {type(run_or_model).__name__}")
    return config.model.arch


def require_attention(run_or_model, what: str) -> None:
    """Raise a one-line ValueError if `run_or_model` (a model or a Run) has no attention."""
    arch = arch_of(run_or_model)
    if arch != "transformer":
        raise ValueError(f"{what} is not available for arch {arch!r}: it reads attention heads, and this model has none")


# --- what the Fourier analysis reads --------------------------------------------------------------


@dataclass(frozen=True)
class Readout:
    """The last hidden features of a model and the linear map from them to the logits: the "neurons"
    Nanda et al.'s Fourier analysis reads. `hook`: their hook point; `position`: the position to read in
    its (batch, pos, n) activations, or None for (batch, n) activations; `logit_map`: (n, d_vocab_out)
    float64 on CPU, with logits = features @ logit_map + (a part that does not depend on these features)."""

    hook: str
    position: int | None
    logit_map: torch.Tensor


def readout(model) -> Readout:
    """The `Readout` of a model: for the transformer the last MLP layer's neurons at the read position
    (through W_out W_U), for the MLP its last hidden layer, for the CNN its pooled channels, for the LSTM its last
    layer's hidden state h at the read position (each through W_U)."""
    arch = arch_of(model)
    if arch == "transformer":
        if model.cfg.attn_only:
            raise ValueError("this transformer is attention-only: it has no MLP neurons to read")
        logit_map = model.blocks[-1].mlp.W_out.detach().double() @ model.W_U.detach().double()
        return Readout(f"blocks.{model.cfg.n_layers - 1}.mlp.hook_post", -1, logit_map.cpu())
    if arch == "mlp":
        return Readout(f"layers.{len(model.layers) - 1}.hook_post", None, model.W_U.detach().double().cpu())
    if arch == "cnn":
        return Readout("hook_pooled", None, model.W_U.detach().double().cpu())
    if arch == "lstm":
        return Readout(f"layers.{len(model.layers) - 1}.hook_h", -1, model.W_U.detach().double().cpu())
    raise ValueError(f"Fourier analysis of neurons is not available for arch {arch!r}: it has no hidden neurons")


# --- neuron ablation below the transformer ------------------------------------------------------------


@torch.no_grad()
def ablate_hidden_neurons(target, neurons: list[int], layer: int, split: str, method: str, score, chunk: int = 512) -> dict:
    """`lab.ablate_neurons` for the MLP and the CNN: the neurons (channels) `neurons` of hidden layer `layer`
    (`layers.{layer}.hook_post`) zeroed or replaced by their mean over the split (real positions only),
    at every position. `score(logits, labels) -> (loss, accuracy)`. Returns {"loss", "accuracy",
    "base_loss", "base_accuracy"}."""
    model, arch = target.model, arch_of(target.model)
    if arch == "lstm":
        raise ValueError("neuron ablation is not available for arch 'lstm': its units feed their own recurrence, "
                         "which a hook on their output (layers.{l}.hook_h) does not reach")
    if arch not in ("mlp", "cnn"):
        raise ValueError(f"neuron ablation is not available for arch {arch!r}: it has no hidden neurons")
    if not 0 <= layer < len(model.layers):
        raise ValueError(f"layer {layer} does not exist: this model's hidden layers are 0..{len(model.layers) - 1}")
    width = model.cfg.mlp_width if arch == "mlp" else model.cfg.cnn_channels
    bad = [n for n in neurons if not 0 <= int(n) < width]
    if bad:
        raise ValueError(f"neuron {bad[0]} does not exist: this layer's neurons are 0..{width - 1}")
    index = torch.tensor([int(n) for n in neurons], dtype=torch.long)
    hook = f"layers.{layer}.hook_post"  # mlp: (batch, width); cnn: (batch, pos, channels)
    data = target.task.split(split)
    chunks = [data.tokens[start : start + chunk].to(model.device) for start in range(0, len(data), chunk)]

    mean = None
    if method == "mean":
        total, count = torch.zeros(width, dtype=torch.float64), 0.0
        for tokens in chunks:
            _, cache = model.run_with_cache(tokens, names_filter=hook)
            acts = cache[hook].double().cpu()
            if acts.ndim == 3:  # per position: average over the real ones
                real = model.prepare_input(tokens)[1].cpu()[..., None]  # (batch, pos, 1)
                total, count = total + (acts * real).sum((0, 1)), count + float(real.sum())
            else:
                total, count = total + acts.sum(0), count + acts.shape[0]
        mean = (total / max(count, 1.0)).float()

    def patch(act, hook):
        act = act.clone()
        act[..., index] = 0.0 if mean is None else mean[index].to(act.device, act.dtype)
        return act

    base = torch.cat([model(tokens)[:, 0].cpu() for tokens in chunks])  # (batch, vocab)
    ablated = torch.cat([model.run_with_hooks(tokens, fwd_hooks=[(hook, patch)])[:, 0].cpu() for tokens in chunks])
    base_loss, base_acc = score(base, data.labels)
    loss, acc = score(ablated, data.labels)
    return {"loss": loss, "accuracy": acc, "base_loss": base_loss, "base_accuracy": base_acc}
