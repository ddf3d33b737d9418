"""A model's answer for one input: text or token ids in, a `Prediction` out.

Below both `lab.runs.run` (`Run.predict`) and `lab.analysis.probe` (`lab.predict`, which also takes bare models),
so that reading runs and probing them share one way of encoding an input and reading the answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, repr=False)
class Prediction:
    """The model's answer for one input: `label` (its name), `label_id`, `probability`, and all `probabilities`
    (float64: a confident model's 1 - 1e-9 is not rounded to 1, as float32 would)."""

    label: str
    label_id: int
    probability: float
    probabilities: torch.Tensor  # (d_vocab_out,) float64

    def __repr__(self) -> str:  # the answer, not the whole distribution: that is `.probabilities`
        return (f"Prediction(label={self.label!r}, label_id={self.label_id}, "
                f"probability={probability_text(self.probability)})")


def probability_text(p: float) -> str:
    """4 significant digits, and near 1 enough for 1 - p to keep two: 0.9974, 0.99999999919 (1 - 8.1e-10),
    never "1" for a probability below 1. Only a probability that is 1 in float64 (a logit gap above ~37) reads "1"."""
    import math

    digits = 4 if p >= 1.0 or p < 0.999 else min(17, max(4, math.floor(-math.log10(1.0 - p)) + 2))
    return f"{p:.{digits}g}"


def encode_tokens(task, text_or_tokens, model=None) -> torch.Tensor:
    """A text (encoded by the task) or a sequence of token ids -> (1, pos) int64, checked against vocab and length."""
    if isinstance(text_or_tokens, str):
        ids = task.encode(text_or_tokens)  # raises ValueError with the task's one-line message
    else:
        ids = token_ids(text_or_tokens)
        if not ids:
            raise ValueError("no tokens given")
        bad = [t for t in ids if not 0 <= t < task.d_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range: this task's token ids are 0..{task.d_vocab - 1}")
    if model is not None and getattr(model, "W_pos", None) is not None and len(ids) > model.cfg.n_ctx:
        raise ValueError(f"input of {len(ids)} tokens is longer than this model's n_ctx of {model.cfg.n_ctx}")
    return torch.tensor([ids], dtype=torch.long)


def token_ids(tokens) -> list[int]:
    """A list, tuple, array or tensor of integer token ids -> list[int]. Floats (1.0 included: an id is not a
    measurement), bools and anything that is not a sequence raise TypeError saying what is expected."""

    expected = "a text (str) or a sequence of integer token ids"
    if isinstance(tokens, torch.Tensor):
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise TypeError(f"token ids must be integers, got a tensor of {tokens.dtype}; expected {expected}")
        return [int(t) for t in tokens.flatten().tolist()]
    if hasattr(tokens, "dtype") and hasattr(tokens, "tolist"):  # a numpy array
        tokens = tokens.tolist()
    if isinstance(tokens, (bytes, dict, set)) or not hasattr(tokens, "__iter__"):
        raise TypeError(f"expected {expected}, got {type(tokens).__name__} {tokens!r:.40}")
    return integer_list(tokens, "token id", expected)


def integer_list(values, what: str, expected: str = "a list of integers") -> list[int]:
    """[3, numpy.int64(4)] -> [3, 4]; 1.9, 1.0, True or "3" raise TypeError naming the value (nothing is truncated)."""
    import numbers

    if isinstance(values, torch.Tensor) or (hasattr(values, "dtype") and hasattr(values, "tolist")):
        if isinstance(values, torch.Tensor) and (values.is_floating_point() or values.dtype == torch.bool):
            raise TypeError(f"{what}s must be integers, got a tensor of {values.dtype}; expected {expected}")
        values = values.tolist()
    if isinstance(values, (str, bytes, dict, set)) or not hasattr(values, "__iter__"):
        raise TypeError(f"expected {expected}, got {type(values).__name__} {values!r:.40}")
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{what} {value!r} is not an integer; expected {expected}")
        out.append(int(value))
    return out


def prediction_from_logits(task, logits: torch.Tensor) -> Prediction:
    """logits (d_vocab_out,) at the read position -> Prediction."""
    probs = logits.double().softmax(-1)  # float64 throughout: see Prediction
    label_id = int(probs.argmax())
    return Prediction(task.label_names[label_id], label_id, float(probs[label_id]), probs)


@torch.no_grad()
def predict_with(model, task, text_or_tokens) -> Prediction:
    """The answer `model` (in eval mode) gives for one input of `task`: for a next-token task, the next
    token after the whole input."""
    tokens = encode_tokens(task, text_or_tokens, model).to(model.device)
    read = -1 if task.read_position is None else task.read_position
    logits = model(tokens)[0, read].cpu()
    return prediction_from_logits(task, logits)


# --- sampling a continuation (next-token models) -----------------------------------------------------


def check_sampling(n, temperature, seed=None) -> tuple[int, float]:
    """(n, temperature) checked: n a whole number >= 1, temperature a finite number >= 0 (0 = greedy), seed
    a whole number or None. A bad value is one ValueError line naming it and what is valid."""
    import math
    import numbers

    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n={n!r} is not a number of tokens to sample: give a whole number >= 1")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature={temperature!r} is not valid: give a number >= 0 "
                         "(0 = always the most likely token, 1 = the model's own distribution)")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise ValueError(f"seed={seed!r} is not valid: give a whole number (the same one, the same sample), or None")
    return int(n), float(temperature)


@torch.no_grad()
def sample_tokens(model, prompt: list[int], n: int, temperature: float = 1.0, seed: int | None = None) -> list[int]:
    """`n` tokens a next-token model (in eval mode) writes after `prompt` (token ids), one at a time.

    Each step reads the logits at the last position (`model.forward_at(context, -1)`), divides them by
    `temperature` and draws from their softmax; temperature 0 takes the argmax (greedy). The context is
    the last `model.cfg.n_ctx` tokens (nanoGPT's crop: learned positions exist only up to n_ctx, and no
    model saw a longer context in training). `seed` makes the draws repeatable (a CPU torch.Generator,
    so the same seed gives the same tokens on any device); None draws fresh ones."""
    n, temperature = check_sampling(n, temperature, seed)
    if not prompt:
        raise ValueError("the prompt encodes to no tokens: give at least one word (or character) to continue")
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    if model.cfg.d_vocab_out != model.cfg.d_vocab:
        raise ValueError(f"this model's outputs ({model.cfg.d_vocab_out}) are not its input tokens ({model.cfg.d_vocab}): "
                         "only a next-token model can continue a text")
    device = next(model.parameters()).device
    n_ctx = model.cfg.n_ctx
    tokens = list(prompt)
    for _ in range(n):
        context = torch.tensor([tokens[-n_ctx:]], dtype=torch.long, device=device)  # (1, pos <= n_ctx)
        logits = model.forward_at(context, -1)[0].double().cpu()  # (d_vocab_out,)
        scaled = logits / temperature if temperature > 0 else None  # (d_vocab_out,)
        if scaled is None or not torch.isfinite(scaled).all():  # greedy: 0, or so close to 0 that the logits overflow
            next_token = int(logits.argmax())
        else:
            next_token = int(torch.multinomial(scaled.softmax(-1), 1, generator=generator))
        tokens.append(next_token)
    return tokens[len(prompt):]
