"""The fast path is exact: `forward_at` gives `forward(tokens)[:, position]` and the same gradients,
and the training loop's shortcuts (train metrics from the update's forward pass, stop after grok)
change no number."""

import json

import pytest
import torch

from lab.config import ModelConfig, validate_experiment
from lab.model import Transformer
from lab.runs import read_jsonl
from lab.training import Trainer, evaluate


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


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("position", [-1, 0, 2])
def test_forward_at_equals_forward_at_that_position(case, position):
    m = model(**CASES[case])
    x = tokens()
    torch.testing.assert_close(m.forward_at(x, position), m(x)[:, position], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_forward_at_gives_the_same_gradients(case):
    m = model(**CASES[case])
    x, labels = tokens(), torch.arange(6) % 7

    def grads(logits):
        loss = torch.nn.functional.cross_entropy(logits, labels)
        return torch.autograd.grad(loss, list(m.parameters()), allow_unused=True)

    fast, plain = grads(m.forward_at(x, -1)), grads(m(x)[:, -1])
    for (name, _), a, b in zip(m.named_parameters(), fast, plain):
        if b is None:
            assert a is None or not a.any(), name
            continue
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_forward_at_respects_padding():
    m = model(causal=False, positional="none", pad_token_id=9)
    x = tokens()
    x[:3, 3:] = 9  # padded rows
    torch.testing.assert_close(m.forward_at(x, 0), m(x)[:, 0], rtol=1e-12, atol=1e-12)
    x2 = x.clone()
    x2[:3, 3:] = 9
    x2[:3, 4] = 9
    assert torch.allclose(m.forward_at(x2[:3, :3], 0), m.forward_at(x[:3], 0))  # padding changes nothing


def test_forward_at_runs_hooks_when_attached():
    m = model()
    x = tokens()
    seen = []

    def kill_mlp(act, hook):
        seen.append(hook.name)
        return torch.zeros_like(act)

    plain = m.forward_at(x, -1)
    with m.hooks(fwd_hooks=[("blocks.0.mlp.hook_post", kill_mlp)]):
        assert m.hooks_attached()
        hooked = m.forward_at(x, -1)
        expected = m(x)[:, -1]
    assert seen and not m.hooks_attached()
    torch.testing.assert_close(hooked, expected)
    assert not torch.allclose(hooked, plain)


def test_forward_at_rejects_a_position_outside_the_input():
    with pytest.raises(IndexError, match="outside"):
        model().forward_at(tokens(), 5)


TINY = {
    "name": "tiny",
    "task": {"name": "modular", "p": 11, "train_frac": 0.5},
    "model": {"d_model": 32, "n_heads": 2, "d_head": 16, "d_mlp": 64},
    "train": {"steps": 30, "lr": 3e-3, "eval_every": 10, "checkpoint_every": 10, "log_checkpoints": 0, "device": "cpu"},
}


def test_train_metrics_from_the_update_forward_equal_a_separate_evaluation(tmp_path):
    """A row's train loss/acc comes from the update's forward pass; it must be the model-at-that-step's."""
    config = validate_experiment(TINY).resolve()
    trainer = Trainer(config, tmp_path / "run", progress=False)
    trainer.run()
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    from lab.runs import load_tensors

    for row in rows[:-1]:  # the last row has no update after it and is evaluated directly
        weights, _ = load_tensors(tmp_path / "run" / "checkpoints" / f"step_{row['step']:07d}.safetensors")
        check = Transformer(config.model)
        check.load_state_dict(weights)
        loss, acc = evaluate(check, trainer.train_split, trainer.task, config)
        assert row["train_acc"] == acc
        assert row["train_loss"] == pytest.approx(loss, rel=1e-6)


def test_stop_after_grok_ends_the_run_at_the_first_eval_that_far_past_grok(tmp_path, monkeypatch):
    import lab.training

    # "grokked" = test acc >= 0 here: grok at step 0, so the test is about where the run stops
    monkeypatch.setattr(lab.training, "GROK_ACC", 0.0)
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
