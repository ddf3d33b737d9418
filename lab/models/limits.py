"""Will this model fit? An estimate of the memory a model needs, checked before anything is allocated.

`--set model.d_model=1000000000` must not end in a 240 GB allocation traceback, nor a config.json
claiming `d_vocab = 1e11` make `lab.load_run(...).model()` try to allocate it. The parameter count
is exact (the model is built on PyTorch's "meta" device, which allocates nothing); the rest is an
estimate, on the generous side of what training holds at once:

    weights + gradients + AdamW's two moments (+ the Grokfast filter's state)   4 bytes per number each
    activations kept for the backward pass: rows x positions x (per-layer widths + logits at every position)

It is compared with what the machine can give now: MemAvailable for the CPU, free memory for CUDA.
"""

from __future__ import annotations

from typing import Callable

from lab.errors import ConfigError
from lab.files import available_memory_bytes

FLOAT_BYTES = 4


def parameter_count(build: Callable[[], object]) -> int:
    """Exact number of parameters of the model `build()` makes, without allocating it."""
    import torch

    with torch.device("meta"):
        model = build()
    return sum(p.numel() for p in model.parameters())


def available_bytes(device) -> tuple[int, str]:
    """(bytes free, where) on the device a model would live on."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"{device} has"
    return available_memory_bytes(), "this machine has"


def activation_bytes(model_config, rows: int) -> int:
    """Activations a forward + backward pass over `rows` inputs keeps (an estimate; see the module docstring)."""
    get = lambda name, default=0: getattr(model_config, name, None) or default  # noqa: E731
    n_ctx, d_model, n_layers = get("n_ctx", 1), get("d_model", 1), get("n_layers", 1)
    heads, d_head, d_mlp = get("n_heads", 1), get("d_head", 1), get("d_mlp", 0)
    per_position = n_layers * (6 * d_model + 4 * heads * d_head + 2 * heads * n_ctx + 2 * d_mlp)
    # logits, their softmax and gradient at every position: a language model's (a classifier's are fewer)
    return rows * n_ctx * (per_position + 3 * get("d_vocab_out", 1)) * FLOAT_BYTES


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB" if n >= 1e8 else f"{n / 1e6:.3g} MB"


def check_fits(model_config, build: Callable[[], object], device="cpu", rows: int = 0, training: bool = True,
               optimizer_copies: int = 3, source: str = "config") -> int:
    """Raise ConfigError (one line, with the estimate) if the model would not fit; return the estimate in bytes.
    `optimizer_copies`: numbers per parameter besides the weights when training (gradient + AdamW's 2 moments,
    + 1 for an EMA gradient filter, + window for an MA filter)."""
    n_params = parameter_count(build)
    weights = n_params * FLOAT_BYTES * (1 + (optimizer_copies if training else 0))
    activations = activation_bytes(model_config, rows) if rows else 0
    need = weights + activations
    free, where = available_bytes(device)
    if need > free:
        parts = (f"weights{', gradients and optimizer state' if training else ''} {_gb(weights)}"
                 + (f" + activations for {rows} rows {_gb(activations)}" if activations else ""))
        raise ConfigError(
            f"{source}: this model would need about {_gb(need)} ({n_params:,} parameters: {parts}), "
            f"but {where} {_gb(free)} free; make model.d_model, d_mlp, n_layers (or the batch) smaller"
        )
    return need
