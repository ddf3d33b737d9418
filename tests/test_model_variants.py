"""The transformer's variants (issue 17) and its fused attention (issue 16): attention scores (dot,
general, additive), shared blocks, no skip connections, sinusoidal positions; SDPA against the hooked path."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_data
from safetensors.torch import load_file, save_file
from test_model import HOOKS_PER_LAYER
from test_training import without_time
from torch.func import functional_call, stack_module_state, vmap

import lab
from lab.config import validate_experiment
from lab.errors import ConfigError
from lab.models.transformer import Transformer, sinusoidal_positions
from lab.runs.storage import read_jsonl
from lab.tasks import make_task
from lab.training.trainer import Trainer

SMALL = {"d_model": 16, "n_heads": 2, "d_head": 8, "d_mlp": 32}
VARIANTS = {
    "dot": {"attn_score": "dot"},
    "general": {"attn_score": "general"},
    "additive": {"attn_score": "additive"},
    "shared_blocks": {"shared_blocks": True, "n_layers": 3},
    "no_residual": {"residual": False, "n_layers": 2},
    "sinusoidal": {"positional": "sinusoidal"},
}
TASKS = {  # causal without padding; bidirectional with padding
    "modular": {"name": "modular", "p": 7},
    "a_and_b": {"name": "a_and_b"},
}


def build(task: dict = TASKS["modular"], **model) -> tuple[Transformer, object]:
    config = lab.ExperimentConfig.model_validate({"task": task, "model": {**SMALL, **model}}).resolve()
    return Transformer(config.model), make_task(config.task)


def inputs(task_name: str, task) -> torch.Tensor:
    if task_name == "a_and_b":
        tokens = task.encode_batch(["a cab", "ab", "bca c", "c"])  # padded
        assert (tokens == task.pad_token_id).any()
        return tokens
    return task.split("train").tokens[:6]


def watch(model: Transformer, hook: str = "hook_pattern"):
    """A no-op hook on every layer's `hook`: forces the explicit attention path, changes nothing."""
    return model.hooks(fwd_hooks=[(lambda name: name.endswith(hook), lambda t, hook: t)])


@pytest.fixture
def sdpa_calls(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


# --- fused attention (SDPA) against the hooked path -------------------------------------------------


@pytest.mark.parametrize("task_name", TASKS)
@pytest.mark.parametrize("score", ["scaled_dot", "dot", "general"])
def test_fused_attention_equals_the_hooked_path_logits_and_gradients(task_name, score, sdpa_calls):
    model, task = build(TASKS[task_name], attn_score=score, n_layers=2, normalization="LN")
    tokens = inputs(task_name, task)

    def logits_and_grads():
        model.zero_grad()
        logits = model(tokens)
        (logits.float().pow(2).mean()).backward()
        return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    fused, fused_grads = logits_and_grads()
    assert len(sdpa_calls) == 2  # one per layer
    with watch(model):
        hooked, hooked_grads = logits_and_grads()
    assert len(sdpa_calls) == 2  # the hook sent both layers down the explicit path
    assert fused.abs().max() > 0.1
    torch.testing.assert_close(fused, hooked, atol=2e-6, rtol=1e-5)
    for name, grad in hooked_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, atol=2e-6, rtol=1e-4, msg=name)


def test_hooks_on_q_k_v_z_keep_the_fused_path_and_fire(sdpa_calls):
    model, task = build(n_layers=2)
    tokens = task.split("train").tokens[:6]
    seen = []
    hooks = [(lambda name: name.split(".")[-1] in ("hook_q", "hook_k", "hook_v", "hook_z"),
              lambda t, hook: seen.append(hook.name))]
    plain = model(tokens)
    patched = model.run_with_hooks(tokens, fwd_hooks=hooks)
    assert len(sdpa_calls) == 4 and len(seen) == 8
    torch.testing.assert_close(patched, plain, atol=0, rtol=0)
    zero_z = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_z", lambda z, hook: z * 0)])
    assert len(sdpa_calls) == 6 and not torch.allclose(zero_z, plain)  # patching z works on the fused path


def test_under_vmap_the_explicit_path_runs_without_a_warning(sdpa_calls):
    """The sweeps vmap each member's forward: SDPA has no batching rule on CPU (a per-member loop and a
    UserWarning); the explicit path gives the members' own logits, silently."""
    models = [build(n_layers=2, seed=seed)[0] for seed in range(3)]
    task = build()[1]
    tokens = task.split("train").tokens[:6]
    params, buffers = stack_module_state(models)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stacked = vmap(lambda p, b: functional_call(models[0], (p, b), (tokens,)))(params, buffers)
    assert sdpa_calls == []  # the members' own forwards below do use it
    for member, model in enumerate(models):
        torch.testing.assert_close(stacked[member], model(tokens), atol=2e-6, rtol=1e-5)


# --- every variant: trains, hooks, cache, the one-position path --------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_trains_and_resumes_to_the_bit(tmp_path, variant):
    data = tiny_data(steps=8, eval_every=4, checkpoint_every=4, warmup_steps=0)
    data["model"].update(VARIANTS[variant])
    config = validate_experiment(data)
    Trainer(config, tmp_path / "straight", progress=False).run()
    rows = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    assert all(math.isfinite(row[key]) for row in rows for key in ("train_loss", "test_loss"))
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]

    half = config.model_copy(update={"train": config.train.model_copy(update={"steps": 4})})
    Trainer(half, tmp_path / "half", progress=False).run()
    saved = json.loads((tmp_path / "half" / "config.json").read_text())
    saved["train"]["steps"] = 8
    (tmp_path / "half" / "config.json").write_text(json.dumps(saved))
    Trainer.resume(tmp_path / "half", progress=False).run(resume=True)
    assert without_time(read_jsonl(tmp_path / "half" / "metrics.jsonl")) == without_time(rows)  # to the bit

    run = lab.load_run(tmp_path / "straight")  # the checkpoint loads into the variant's model
    tokens = run.task.split("test").tokens
    model = run.model()
    assert model.cfg.model_dump() == config.resolve().model.model_dump()
    logits = model(tokens)
    assert torch.isfinite(logits).all() and logits.shape == (len(tokens), 3, 11)


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_keeps_the_hook_names_and_cache_shapes(variant):
    model, task = build(**VARIANTS[variant])
    tokens = task.split("train").tokens[:5]
    logits, cache = model.run_with_cache(tokens)
    n_layers = model.cfg.n_layers
    for layer in range(n_layers):
        assert {f"blocks.{layer}.{hook}" for hook in HOOKS_PER_LAYER} <= set(cache.keys())
        assert cache["pattern", layer].shape == cache["attn_scores", layer].shape == (5, 2, 3, 3)
        torch.testing.assert_close(cache["pattern", layer].sum(-1), torch.ones(5, 2, 3))
        assert cache["z", layer].shape == (5, 3, 2, 8) and cache["resid_post", layer].shape == (5, 3, 16)
    assert ("hook_pos_embed" in cache) == (model.cfg.positional != "none")
    torch.testing.assert_close(logits, model(tokens), atol=2e-6, rtol=1e-5)  # the hooked path is the same function
    if n_layers > 1:  # every layer's hooks fire with that layer's own activations
        assert not torch.allclose(cache["pattern", 0], cache["pattern", n_layers - 1])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("task_name", TASKS)
def test_forward_at_equals_forward_for_each_variant(variant, task_name):
    model, task = build(TASKS[task_name], **VARIANTS[variant])
    tokens = inputs(task_name, task)
    full = model(tokens)
    for position in (0, -1):
        at = model.forward_at(tokens, position)
        torch.testing.assert_close(at, full[:, position], atol=2e-6, rtol=1e-5)
    at.float().pow(2).sum().backward()  # gradients flow through whichever path ran
    assert all(p.grad is not None for name, p in model.named_parameters() if "W_pos" not in name)
    torch.testing.assert_close(model.forward_at(tokens, None), full)


@pytest.mark.parametrize("variant, phrase", [("dot", "model.attn_score = 'dot'"), ("general", "model.attn_score = 'general'"),
                                             ("additive", "model.attn_score = 'additive'"),
                                             ("no_residual", "model.residual = false")])
def test_read_at_refuses_a_variant_it_does_not_implement_in_one_line(variant, phrase):
    model, task = build(**VARIANTS[variant])
    with pytest.raises(ValueError, match=f"^read_at does not implement {phrase}; use model.run_with_cache") as err:
        model.read_at(task.split("train").tokens[:4], -1)
    assert "\n" not in str(err.value)


# --- what each variant computes -------------------------------------------------------------------


def test_scores_are_the_named_formulas():
    """dot: q.k; general: q W_score k, starting as the scaled dot product; additive: v_score . tanh(q + k)
    (Bahdanau et al. 2015), each against the cached q and k."""
    task = build()[1]
    tokens = task.split("train").tokens[:5]
    future = torch.ones(3, 3, dtype=torch.bool).triu(1)

    def cached(score):
        model = build(attn_score=score)[0]
        logits, cache = model.run_with_cache(tokens)
        return model, logits, cache["q", 0], cache["k", 0], cache["attn_scores", 0]

    _, scaled_logits, q, k, scores = cached("scaled_dot")
    torch.testing.assert_close(scores[..., ~future], (torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(8))[..., ~future])
    assert (scores[..., future] == float("-inf")).all()
    _, _, q, k, scores = cached("dot")
    torch.testing.assert_close(scores[..., ~future], torch.einsum("bqhd,bkhd->bhqk", q, k)[..., ~future])
    general, general_logits, q, k, scores = cached("general")
    torch.testing.assert_close(general_logits, scaled_logits)  # at init W_score = I / sqrt(d_head): the scaled dot product
    with torch.no_grad():
        general.blocks[0].attn.W_score.copy_(torch.randn(2, 8, 8))
    _, cache = general.run_with_cache(tokens)
    W = general.blocks[0].attn.W_score
    expected = torch.einsum("bqhd,hde,bkhe->bhqk", cache["q", 0], W, cache["k", 0])
    torch.testing.assert_close(cache["attn_scores", 0][..., ~future], expected[..., ~future])
    additive, _, q, k, scores = cached("additive")
    v_score = additive.blocks[0].attn.v_score
    assert v_score.shape == (2, 8) and v_score.abs().max() > 0
    expected = torch.einsum("bqkhd,hd->bhqk", torch.tanh(q[:, :, None] + k[:, None]), v_score)
    torch.testing.assert_close(scores[..., ~future], expected[..., ~future])


def test_shared_blocks_hold_one_blocks_parameters_and_save_through_safetensors(tmp_path):
    shared, task = build(n_layers=3, shared_blocks=True)
    one_layer, _ = build(n_layers=1)
    assert sum(p.numel() for p in shared.parameters()) == sum(p.numel() for p in one_layer.parameters())
    assert shared.blocks[2].attn.W_Q is shared.blocks[0].attn.W_Q and shared.blocks[1].mlp.W_out is shared.blocks[0].mlp.W_out
    state = shared.state_dict()
    assert not any(key.startswith(("blocks.1.", "blocks.2.")) for key in state)
    save_file(state, tmp_path / "weights.safetensors")  # refuses aliased tensors, so none may remain
    loaded = Transformer(shared.cfg.model_copy(update={"seed": 1}))
    tokens = task.split("train").tokens[:5]
    assert not torch.allclose(loaded(tokens), shared(tokens))
    loaded.load_state_dict(load_file(tmp_path / "weights.safetensors"))
    torch.testing.assert_close(loaded(tokens), shared(tokens), atol=0, rtol=0)
    assert loaded.blocks[2].attn.W_K is loaded.blocks[0].attn.W_K  # still tied after loading


def test_without_residual_each_sublayer_replaces_the_stream():
    model, task = build(n_layers=2, residual=False, normalization="LN")
    tokens = task.split("train").tokens[:5]
    logits, cache = model.run_with_cache(tokens)
    for layer in range(2):
        torch.testing.assert_close(cache["resid_mid", layer], cache["attn_out", layer], atol=0, rtol=0)
        torch.testing.assert_close(cache["resid_post", layer], cache["mlp_out", layer], atol=0, rtol=0)
    with torch.no_grad():  # the last MLP writes nothing: no path around it reaches the logits
        model.blocks[1].mlp.W_out.zero_()
        model.blocks[1].mlp.b_out.zero_()
    expected = model.ln_final(torch.zeros(5, 3, 16)) @ model.W_U + model.b_U
    torch.testing.assert_close(model(tokens), expected, atol=0, rtol=0)
    with_residual, _ = build(n_layers=2, normalization="LN")
    with torch.no_grad():
        with_residual.blocks[1].mlp.W_out.zero_()
        with_residual.blocks[1].mlp.b_out.zero_()
    assert not torch.allclose(with_residual(tokens), expected)  # the skip connections carry the input around


def test_sinusoidal_positions_are_vaswanis_fixed_table_and_extend_past_n_ctx():
    model, task = build(positional="sinusoidal", d_model=6)
    assert "W_pos" not in dict(model.named_parameters()) and "W_pos" not in model.state_dict()
    table = sinusoidal_positions(8, 6)
    for pos, i in ((0, 0), (3, 0), (5, 1), (7, 2)):
        angle = pos / 10000 ** (2 * i / 6)
        assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
        assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    n_ctx = model.cfg.n_ctx
    torch.testing.assert_close(model.W_pos, table[:n_ctx], atol=0, rtol=0)
    longer = torch.randint(0, 7, (2, n_ctx + 10), generator=torch.Generator().manual_seed(0))  # past n_ctx: the table extends
    _, cache = model.run_with_cache(longer)
    torch.testing.assert_close(cache["hook_pos_embed"][0], sinusoidal_positions(longer.shape[1], 6))
    torch.testing.assert_close(model.forward_at(longer, -1), model(longer)[:, -1])
    learned, _ = build(positional="learned")
    with pytest.raises(ValueError, match="longer than this model's n_ctx"):
        learned(longer)


# --- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, default", [("attn_score", "dot", "'scaled_dot'"), ("shared_blocks", True, "False"),
                                                   ("residual", False, "True"), ("positional", "sinusoidal", "'learned'")])
def test_variants_are_refused_for_other_architectures_in_one_line(field, value, default):
    data = tiny_data()
    data["model"].update({"arch": "mlp", field: value})
    with pytest.raises(ConfigError) as err:
        validate_experiment(data)
    message = str(err.value)
    assert f"{field} = {value!r} is a transformer setting (arch = 'transformer'), not arch = 'mlp'; leave it at {default}" in message
    assert "\n" not in message


def test_cli_names_the_bad_variant_value_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lab.cli", "train", "modadd_quick", "--runs-dir", str(tmp_path),
                             "--set", "model.attn_score=cosine"], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "model.attn_score" in result.stderr and "'cosine'" in result.stderr and "'additive'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
