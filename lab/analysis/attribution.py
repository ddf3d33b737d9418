"""Direct logit attribution (DLA): how much each head, each MLP (and, on request, each MLP neuron) writes
directly towards the answer, at the task's read position.

    lab.logit_attribution(run)                         # mean over the test split, one row per component
    lab.logit_attribution(run, "a cab")                # one input
    lab.logit_attribution(run, "12 + 5 =", against="18", neurons=True)

The definition is TransformerLens's `ActivationCache.logit_attrs`: a component's output at the read
position, passed through the final LayerNorm with the full residual stream's scale (centred, divided by
the cached `ln_final.hook_scale`, times its weight: TransformerLens folds that weight into W_U by default,
and its `logit_attrs` assumes it folded, so these numbers equal TransformerLens's on the folded model),
dotted with the answer's unembedding direction
`W_U[:, answer]`, or `W_U[:, answer] - W_U[:, wrong]` for a logit difference. Components are
TransformerLens's: `embed`, `pos_embed` and each layer's `mlp_out` as in `cache.decompose_resid()`, each
head's output `z @ W_O` as in `cache.stack_head_results()` (the attention bias `b_O`, which no head owns,
is a row of its own), and each neuron `post[n] * W_out[n]` (the MLP bias `b_out` its own row), so the
rows add up to the direct logit (difference) less the unembedding bias. tests/test_circuits.py compares
the numbers with TransformerLens on the exported bridge of the same weights.

By default the direction is the logit difference between the right answer and the other class for
two-class tasks (a_and_b: yes vs no, signed by the label) and the right answer's logit otherwise.
Everything is read from one hooked `run_with_hooks` forward per chunk of inputs (only the read position
is kept).
"""

from __future__ import annotations

import torch
from einops import einsum

from lab.analysis.ablation import _chunks, private_target
from lab.analysis.probe import Target, encode_input
from lab.models.architectures import require_attention

SPLITS = ("train", "test")


@torch.no_grad()
def read_activations(target: Target, tokens: torch.Tensor, names: list[str]) -> tuple[torch.Tensor, dict]:
    """One hooked forward of the model over `tokens` (batch, pos), in chunks: the logits at the read position
    (batch, vocab) and each named activation at the read position (batch, ...), on CPU."""
    model, read = target.model, target.task.read_position
    logits, grabbed = [], {name: [] for name in names}
    for _, chunk in _chunks(model, tokens):
        hooks = [(name, lambda act, hook: grabbed[hook.name].append(act[:, read].float().cpu())) for name in names]
        logits.append(model.run_with_hooks(chunk.to(model.device), fwd_hooks=hooks)[:, read].float().cpu())
    return torch.cat(logits), {name: torch.cat(parts) for name, parts in grabbed.items()}


def inputs_and_answers(target: Target, text: str | None, split: str, against: str | None):
    """(tokens (batch, pos), answers (batch,), wrong answers (batch,) or None) for one text or a split."""
    task = target.task
    if text is not None:
        tokens = encode_input(target, text)
        answers = torch.tensor([task.label(tokens[0])])
    else:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {', '.join(map(repr, SPLITS))}")
        data = task.split(split)
        tokens, answers = data.tokens, data.labels
    if against is not None:
        if against not in task.label_names:
            shown = task.label_names if len(task.label_names) <= 12 else task.label_names[:12] + ["..."]
            raise ValueError(f"against={against!r} is not an answer of this task; valid: {', '.join(shown)}")
        wrong = torch.full_like(answers, task.label_names.index(against))
        if (wrong == answers).any():
            raise ValueError(f"against={against!r} is the right answer here: a logit difference needs another answer")
    elif task.d_vocab_out == 2:
        wrong = 1 - answers  # the other class
    else:
        wrong = None
    return tokens, answers, wrong


def unembed_directions(model, answers: torch.Tensor, wrong: torch.Tensor | None) -> torch.Tensor:
    """(batch, d_model): W_U[:, answer] (- W_U[:, wrong]), times the final LayerNorm's weight when there is one."""
    W_U = model.W_U.detach().float().cpu()
    directions = W_U[:, answers].T
    if wrong is not None:
        directions = directions - W_U[:, wrong].T
    if hasattr(model.ln_final, "w"):
        directions = directions * model.ln_final.w.detach().float().cpu()
    return directions


def through_final_ln(model, stack: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """stack (component, batch, d_model) as the unembedding sees it (TransformerLens's `apply_ln_to_stack`):
    centred and divided by the full residual stream's final LayerNorm scale (batch, 1); unchanged without LN."""
    if scale is None:
        return stack
    return (stack - stack.mean(-1, keepdim=True)) / scale


@torch.no_grad()
def logit_attribution(run_or_model, text: str | None = None, *, split: str = "test", step: int | None = None,
                      task=None, against: str | None = None, neurons: bool = False):
    """One row per component (embed, pos_embed, each head, each layer's attention bias, each MLP; with
    `neurons=True` each MLP neuron and MLP bias too): its direct contribution to the answer's logit (or logit
    difference), for one `text` or averaged over a `split` (see the module docstring for the definition).
    Columns: component, kind, layer, head, neuron, attribution. `frame.attrs`: direction, n_inputs, total."""
    import pandas as pd

    target = private_target(run_or_model, step, task)
    require_attention(target.model, "direct logit attribution")
    model, cfg = target.model, target.model.cfg
    tokens, answers, wrong = inputs_and_answers(target, text, split, against)
    has_ln = hasattr(model.ln_final, "w")
    names = ["hook_embed"] + (["hook_pos_embed"] if model.W_pos is not None else []) + (["ln_final.hook_scale"] if has_ln else [])
    for layer in range(cfg.n_layers):
        names.append(f"blocks.{layer}.attn.hook_z")
        if not cfg.attn_only:
            names.append(f"blocks.{layer}.hook_mlp_out")
            if neurons:
                names.append(f"blocks.{layer}.mlp.hook_post")
    _, acts = read_activations(target, tokens, names)
    scale = acts.get("ln_final.hook_scale")  # (batch, 1)
    directions = unembed_directions(model, answers, wrong)  # (batch, d_model)
    batch = len(answers)

    labels, stack = [], []  # component rows and their (batch, d_model) outputs
    labels.append(("embed", "embed", None, None, None))
    stack.append(acts["hook_embed"])
    if model.W_pos is not None:
        labels.append(("pos_embed", "embed", None, None, None))
        stack.append(acts["hook_pos_embed"])
    neuron_rows: list[tuple] = []
    neuron_values: list[torch.Tensor] = []
    for layer, block in enumerate(model.blocks):
        W_O = block.attn.W_O.detach().float().cpu()
        results = einsum(acts[f"blocks.{layer}.attn.hook_z"], W_O, "batch head d_head, head d_head d_model -> head batch d_model")
        for head in range(cfg.n_heads):
            labels.append((f"L{layer}H{head}", "head", layer, head, None))
            stack.append(results[head])
        labels.append((f"L{layer} attn bias", "bias", layer, None, None))
        stack.append(block.attn.b_O.detach().float().cpu().expand(batch, -1))
        if block.mlp is None:
            continue
        labels.append((f"L{layer} mlp", "mlp", layer, None, None))
        stack.append(acts[f"blocks.{layer}.hook_mlp_out"])
        if neurons:
            labels.append((f"L{layer} mlp bias", "bias", layer, None, None))
            stack.append(block.mlp.b_out.detach().float().cpu().expand(batch, -1))
            # neuron n writes post[n] * W_out[n]; through the final LN that is post[n] * (centred W_out[n]) / scale
            W_out = block.mlp.W_out.detach().float().cpu()  # (neuron, d_model)
            if scale is not None:
                W_out = W_out - W_out.mean(-1, keepdim=True)
            per_input = einsum(W_out, directions, "neuron d_model, batch d_model -> batch neuron")
            values = acts[f"blocks.{layer}.mlp.hook_post"] * per_input / (scale if scale is not None else 1.0)
            neuron_values.append(values.mean(0))
            neuron_rows += [(f"L{layer}N{n}", "neuron", layer, None, n) for n in range(values.shape[1])]

    scaled = through_final_ln(model, torch.stack(stack), scale)  # (component, batch, d_model)
    attributions = einsum(scaled, directions, "component batch d_model, batch d_model -> component batch").mean(1)
    values = attributions.tolist() + (torch.cat(neuron_values).tolist() if neuron_values else [])
    rows = [dict(zip(("component", "kind", "layer", "head", "neuron"), label), attribution=value)
            for label, value in zip(labels + neuron_rows, values)]
    frame = pd.DataFrame(rows, columns=["component", "kind", "layer", "head", "neuron", "attribution"])
    for column in ("layer", "head", "neuron"):
        frame[column] = frame[column].astype("Int64")
    names_out = target.task.label_names
    if text is not None:
        what = f"logit of {names_out[int(answers[0])]!r}" + (f" - logit of {names_out[int(wrong[0])]!r}" if wrong is not None else "")
    else:
        what = "logit of the right answer" + (" - logit of " + (repr(against) if against else "the other class") if wrong is not None else "")
    whole = [i for i, label in enumerate(labels) if not label[0].endswith("mlp bias")]  # neurons + bias = the mlp row
    frame.attrs.update(direction=what, n_inputs=batch, step=target.step, total=float(attributions[whole].sum()))
    return frame
