"""The fast path is exact: `forward_at` gives `forward(tokens)[:, position]` and the same gradients;
its two steps as analyses call them (`read_at`: the last block's residual, z and pattern at the
position; `logits_at`, with heads or neurons replaced) equal the hooked forward; and the training
loop's shortcuts (train metrics from the update's forward pass, stop after grok) change no number."""

import json

import pytest
import torch
from conftest import TINY

import lab
from lab.config import ModelConfig, validate_experiment
from lab.models.transformer import Transformer, hooks_attached
from lab.runs.storage import read_jsonl
from lab.training.trainer import Trainer


def model(**overrides) -> Transformer:
    cfg = dict(n_layers=1, d_model=24, n_heads=3, d_head=8, d_mlp=40, d_vocab=10, d_vocab_out=7, n_ctx=5, causal=True, seed=3)
    cfg.update(overrides)
    m = Transformer(ModelConfig(**cfg)).double()
    with torch.no_grad():  # biases start at 0; give them values so their paths are tested too
        for name, p in m.named_parameters():
            if not name.rsplit(".", 1)[-1].startswith("W_"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name)), dtype=p.dtype) * 0.3)
    return m


def tokens(batch=6, n=5, vocab=10, seed=0):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


CASES = {
    "nanda-like, causal": {},
    "two layers": {"n_layers": 2},
    "layernorm": {"normalization": "LN", "n_layers": 2},
    "bidirectional, no positions": {"causal": False, "positional": "none"},
    "attention only": {"attn_only": True},
    "gelu": {"act_fn": "gelu"},
}


@pytest.fixture
def forward_refused(monkeypatch):
    """`Transformer.forward` raises: the fast path must compute on its own, not fall back to it
    (otherwise forward_at == forward would hold trivially)."""
    plain_forward = Transformer.forward

    def refuse(*args, **kwargs):
        raise AssertionError("the fast path called Transformer.forward")

    monkeypatch.setattr(Transformer, "forward", refuse)
    return lambda m, x: plain_forward(m, x)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("position", [-1, 0, 2])
def test_forward_at_equals_forward_at_that_position(case, position, forward_refused):
    m = model(**CASES[case])
    x = tokens()
    torch.testing.assert_close(m.forward_at(x, position), forward_refused(m, x)[:, position], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch", [6, 13, 40])  # vocab^2 = 100 against batch * d_head: per-row scores, then the score table
@pytest.mark.parametrize("positional", ["learned", "none"])
def test_one_layer_scores_by_row_or_by_table_equal_forward(batch, positional, forward_refused):
    """A one-layer model looks attention scores up in a (query token, key, key token) table once the
    batch is large enough; logits and every gradient equal forward's either way."""
    m, x = model(positional=positional), tokens(batch=batch)
    fast = m.forward_at(x, 3)
    slow = forward_refused(m, x)[:, 3]
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    weights = torch.randn(fast.shape, generator=torch.Generator().manual_seed(1), dtype=fast.dtype)
    params = list(m.parameters())
    for name, g_fast, g_slow in zip([n for n, _ in m.named_parameters()], torch.autograd.grad((fast * weights).sum(), params, allow_unused=True),
                                    torch.autograd.grad((slow * weights).sum(), params, allow_unused=True)):
        if g_slow is not None:
            torch.testing.assert_close(g_fast, g_slow, rtol=1e-10, atol=1e-12, msg=name)


def test_the_cases_are_the_models_they_name():
    """Each case changes the model (a gelu case that silently built a relu MLP would test nothing twice)."""
    x = tokens()
    reference = model()(x)
    for case, overrides in CASES.items():
        if overrides:
            assert not torch.allclose(model(**overrides)(x), reference), case
    gelu = model(act_fn="gelu")
    assert gelu.blocks[0].mlp.act_fn is torch.nn.functional.gelu
    _, cache = gelu.run_with_cache(x)
    torch.testing.assert_close(cache["post", 0], torch.nn.functional.gelu(cache["pre", 0]))
    assert (cache["post", 0] < 0).any()  # gelu's negative lobe: not a relu


def test_forward_at_takes_the_same_inputs_as_forward():
    """One input preparation for both: a single sequence, explicit key padding, the n_ctx limit."""
    m = model(causal=False)
    x = tokens()
    torch.testing.assert_close(m.forward_at(x[0], 1), m(x[0])[:, 1], rtol=1e-12, atol=1e-12)
    padding = torch.zeros_like(x, dtype=torch.bool)
    padding[:, 3:] = True
    torch.testing.assert_close(m.forward_at(x, 1, padding), m(x, padding)[:, 1], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(m.forward_at(x, 1, padding), m.forward_at(x, 1))
    too_long = tokens(n=6)
    for run in (m, lambda t: m.forward_at(t, 0)):
        with pytest.raises(ValueError, match="input of 6 positions is longer than this model's n_ctx of 5"):
            run(too_long)


@pytest.mark.parametrize("case", CASES)
def test_forward_at_gives_the_same_gradients(case, forward_refused):
    m = model(**CASES[case])
    x, labels = tokens(), torch.arange(6) % 7

    def grads(logits):
        loss = torch.nn.functional.cross_entropy(logits, labels)
        return torch.autograd.grad(loss, list(m.parameters()), allow_unused=True)

    fast, plain = grads(m.forward_at(x, -1)), grads(forward_refused(m, x)[:, -1])
    for (name, _), a, b in zip(m.named_parameters(), fast, plain):
        if b is None:
            assert a is None or not a.any(), name
            continue
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_forward_at_respects_padding():
    m = model(causal=False, positional="none", pad_token_id=9)
    x = tokens()
    x[:3, 3:] = 9  # rows 0-2: three tokens, then two of padding
    torch.testing.assert_close(m.forward_at(x, 0), m(x)[:, 0], rtol=1e-12, atol=1e-12)
    # a padded row answers as its unpadded tokens alone do ...
    torch.testing.assert_close(m.forward_at(x[:3], 0), m.forward_at(x[:3, :3], 0), rtol=1e-12, atol=1e-12)
    # ... because the padding is masked: the same keys attended to change the answer
    attended = torch.zeros(3, 5, dtype=torch.bool)
    assert not torch.allclose(m.forward_at(x[:3], 0, attended), m.forward_at(x[:3], 0))


def test_forward_at_runs_hooks_when_attached():
    m = model()
    x = tokens()
    seen = []

    def kill_mlp(act, hook):
        seen.append(hook.name)
        return torch.zeros_like(act)

    plain = m.forward_at(x, -1)
    with m.hooks(fwd_hooks=[("blocks.0.mlp.hook_post", kill_mlp)]):
        assert hooks_attached(m)
        hooked = m.forward_at(x, -1)
        expected = m(x)[:, -1]
    assert seen and not hooks_attached(m)
    torch.testing.assert_close(hooked, expected)
    assert not torch.allclose(hooked, plain)


def test_forward_at_runs_backward_and_permanent_hooks():
    m = model()
    x, seen = tokens(), []
    with m.hooks(bwd_hooks=[("blocks.0.hook_resid_mid", lambda grad, hook: seen.append(hook.name))]):
        assert hooks_attached(m)
        m.forward_at(x, -1).sum().backward()
    assert seen == ["blocks.0.hook_resid_mid"] and not hooks_attached(m)
    m.blocks[0].mlp.hook_post.add_perma_hook(lambda act, hook: torch.zeros_like(act))
    assert hooks_attached(m)
    torch.testing.assert_close(m.forward_at(x, -1), m(x)[:, -1])
    m.reset_hooks(including_permanent=True)
    assert not hooks_attached(m)


# --- the same path in two steps, as the analyses call it: read_at, then logits_at ------------------

READ_CASES = {**{case: (overrides, 5) for case, overrides in CASES.items()},
              # a_and_b's shape: one layer, no positions, more keys than the vocabulary has tokens, padding
              "one layer, longer than the vocabulary": ({"causal": False, "positional": "none", "pad_token_id": 9}, 16),
              "the same with LayerNorm": ({"causal": False, "positional": "none", "pad_token_id": 9,
                                           "normalization": "LN"}, 16)}


@pytest.mark.parametrize("case", READ_CASES)
@pytest.mark.parametrize("position", [-1, 0, 2])
def test_read_at_gives_the_last_blocks_residual_z_and_pattern_there_and_logits_at_the_logits(case, position):
    overrides, n_pos = READ_CASES[case]
    m = model(**overrides)
    x = tokens(n=n_pos)
    x[:2, n_pos - 2 :] = 9  # padding, where the case has a pad token (else an ordinary token)
    last, pos = m.cfg.n_layers - 1, position % n_pos
    logits, cache = m.run_with_cache(x)
    read = m.read_at(x, position)
    n_keys = read.pattern.shape[-1]
    assert n_keys == (pos + 1 if m.cfg.causal else n_pos)
    torch.testing.assert_close(read.resid, cache["resid_pre", last][:, pos], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(read.z, cache["z", last][:, pos], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(read.pattern, cache["pattern", last][:, :, pos, :n_keys], rtol=1e-12, atol=1e-12)
    assert not cache["pattern", last][:, :, pos, n_keys:].any()  # the keys left out get no attention
    torch.testing.assert_close(m.logits_at(read.resid, read.z), logits[:, pos], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ["two layers", "layernorm", "one layer, longer than the vocabulary"])
def test_logits_at_with_a_head_or_neurons_replaced_is_the_hooked_forward(case):
    overrides, n_pos = READ_CASES[case]
    m = model(**overrides)
    x, last = tokens(n=n_pos), m.cfg.n_layers - 1
    read = m.read_at(x, -1)
    without_head_1 = read.z.clone()
    without_head_1[:, 1] = 0.0
    hooked = m.run_with_hooks(x, fwd_hooks=[(f"blocks.{last}.attn.hook_z",
                                             lambda z, hook: z.index_fill(2, torch.tensor([1]), 0.0))])[:, -1]
    assert not torch.allclose(hooked, m(x)[:, -1])
    torch.testing.assert_close(m.logits_at(read.resid, without_head_1), hooked, rtol=1e-12, atol=1e-12)
    # several variants in one call: leading (variant, batch) dimensions
    both = m.logits_at(read.resid.expand(2, *read.resid.shape), torch.stack([read.z, without_head_1]))
    torch.testing.assert_close(both, torch.stack([m(x)[:, -1], hooked]), rtol=1e-12, atol=1e-12)

    def kill(post):  # neurons 0 and 5 of the last MLP
        return post.index_fill(-1, torch.tensor([0, 5]), 0.0)

    hooked = m.run_with_hooks(x, fwd_hooks=[(f"blocks.{last}.mlp.hook_post", lambda post, hook: kill(post))])[:, -1]
    assert not torch.allclose(hooked, m(x)[:, -1])
    torch.testing.assert_close(m.logits_at(read.resid, read.z, replace_post=kill), hooked, rtol=1e-12, atol=1e-12)


def test_read_at_applies_hooks_on_earlier_blocks_and_refuses_the_ones_it_would_skip():
    m = model(n_layers=2)
    x = tokens()

    def zero_head_0(z, hook):
        return z.index_fill(2, torch.tensor([0]), 0.0)

    with m.hooks(fwd_hooks=[("blocks.0.attn.hook_z", zero_head_0)]):
        read = m.read_at(x, -1)
        hooked = m(x)[:, -1]
    assert not torch.allclose(hooked, m(x)[:, -1])
    torch.testing.assert_close(m.logits_at(read.resid, read.z), hooked, rtol=1e-12, atol=1e-12)
    for name in ("blocks.1.attn.hook_z", "blocks.1.hook_resid_pre", "hook_embed"):
        with m.hooks(fwd_hooks=[(name, lambda act, hook: act)]):
            with pytest.raises(ValueError, match=f"a hook on {name} would not run: read_at runs hook points only in blocks 0..0"):
                m.read_at(x, -1)


def test_forward_at_rejects_a_position_outside_the_input():
    with pytest.raises(IndexError, match="outside"):
        model().forward_at(tokens(), 5)


def test_train_metrics_from_the_update_forward_equal_a_separate_evaluation(tmp_path):
    """A row's train loss/acc comes from the update's forward pass; it must be the model-at-that-step's, as
    anyone computes it from the saved checkpoint: the full forward at the read position, cross-entropy."""
    Trainer(validate_experiment(TINY).resolve(), tmp_path / "run", progress=False).run()
    run = lab.load_run(tmp_path / "run")
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    split = run.task.split("train")
    assert [row["step"] for row in rows[:-1]] == run.checkpoint_steps[:-1] == [0, 10, 20]
    for row in rows[:-1]:  # the last row has no update after it and is evaluated directly
        with torch.no_grad():
            logits = run.model(row["step"])(split.tokens)[:, run.task.read_position]
        assert row["train_acc"] == (logits.argmax(-1) == split.labels).double().mean().item()
        assert row["train_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits.double(), split.labels).item(), rel=1e-6)


def test_stop_after_grok_ends_the_run_at_the_first_eval_that_far_past_grok(tmp_path, monkeypatch):
    import lab.runs.outcomes

    # "grokked" = test acc >= 0 here: grok at step 0, so the test is about where the run stops
    monkeypatch.setattr(lab.runs.outcomes, "GROK_ACC", 0.0)
    data = json.loads(json.dumps(TINY))
    data["train"].update(steps=400, lr=1e-2, eval_every=5, checkpoint_every=1000, stop_after_grok=12)
    summary = Trainer(validate_experiment(data), tmp_path / "run", progress=False).run()
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    grok = summary["grok_step"]
    assert grok == next(r["step"] for r in rows if r["test_acc"] >= 0.0) == 0
    assert summary["status"] == "finished"
    assert summary["step"] == rows[-1]["step"] == grok + 15 < 400  # the first eval >= 12 steps after grok
    assert (tmp_path / "run" / "checkpoints" / f"step_{grok + 15:07d}.safetensors").is_file()
    # resuming a run that stopped after grokking does nothing more
    again = Trainer.resume(tmp_path / "run", progress=False).run(resume=True)
    assert again["step"] == summary["step"] and read_jsonl(tmp_path / "run" / "metrics.jsonl") == rows
