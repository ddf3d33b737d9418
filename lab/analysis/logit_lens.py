"""The logit lens: read the answer from the residual stream part-way through the model.

    lab.logit_lens(run)              # over the test split: mean probability and rank of the answer, accuracy
    lab.logit_lens(run, "a cab")     # one input: the answer's logit, probability, rank, and the top guess

At the read position, after the embeddings and after each layer's attention and MLP, the residual stream
is passed through the final LayerNorm (its statistics recomputed on that partial stream, as nostalgebraist's
logit lens and TransformerLens's `apply_ln_to_stack(..., recompute_ln=True)` do) and the unembedding
(`W_U`, `b_U`). The last stage is the model's own output. Without LayerNorm this is exactly
`cache.accumulated_resid(incl_mid=True) @ W_U + b_U` in TransformerLens (tests/test_circuits.py).
Meaningful for multi-layer models; for one layer it still shows what attention alone gets right before the MLP.
"""

from __future__ import annotations

import torch

from lab.analysis.ablation import private_target
from lab.analysis.attribution import SPLITS, inputs_and_answers, read_activations
from lab.models.architectures import require_attention


def stages(cfg) -> list[tuple[str, str, int | None]]:
    """(stage label, hook name, layer) of every point the lens reads, in order."""
    out = [("embed", "blocks.0.hook_resid_pre", None)]
    for layer in range(cfg.n_layers):
        out.append((f"L{layer} attn", f"blocks.{layer}.hook_resid_mid", layer))
        if not cfg.attn_only:
            out.append((f"L{layer} mlp", f"blocks.{layer}.hook_resid_post", layer))
    return out


@torch.no_grad()
def logit_lens(run_or_model, text: str | None = None, *, split: str = "test", step: int | None = None, task=None):
    """One row per stage (embed, then each layer's attn and mlp): the right answer's mean probability and
    rank (1 = the top guess) read from the residual stream there, and the accuracy of that reading; for one
    `text` also its logit and the top guess. See the module docstring for the definition."""
    import pandas as pd

    target = private_target(run_or_model, step, task)
    require_attention(target.model, "the logit lens")
    if text is None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(map(repr, SPLITS))}")
    model = target.model
    tokens, answers, _ = inputs_and_answers(target, text, split, None)
    points = stages(model.cfg)
    _, acts = read_activations(target, tokens, [hook for _, hook, _ in points])
    rows = []
    for stage, hook, layer in points:
        resid = acts[hook].to(model.device)  # (batch, d_model)
        logits = (model.ln_final(resid) @ model.W_U + model.b_U).float().cpu()  # (batch, vocab)
        right = logits.gather(1, answers[:, None])[:, 0]
        rank = (logits > right[:, None]).sum(1) + 1
        row = {"stage": stage, "layer": layer, "answer_prob": float(logits.softmax(-1).gather(1, answers[:, None]).mean()),
               "answer_rank": float(rank.double().mean()), "accuracy": float((rank == 1).double().mean())}
        if text is not None:
            row.update(answer_logit=float(right[0]), top=target.task.label_names[int(logits[0].argmax())])
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame["layer"] = frame["layer"].astype("Int64")
    frame.attrs.update(n_inputs=len(answers), step=target.step,
                       answer=target.task.label_names[int(answers[0])] if text is not None else "the right answer")
    return frame
