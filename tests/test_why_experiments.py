"""The "Why is the transformer built this way?" experiments (issue 17): each experiments/why_*.toml
validates, its sweep expands into models that build, its base point trains, and the parameter budgets
its comments promise hold. Plus `lab.analysis.gradients`, which the skip-connection answer reads."""

import math
from pathlib import Path

import pytest
import torch

import lab
from lab.analysis.gradients import gradient_norms_per_layer
from lab.models.architectures import build_model, n_params
from lab.sweeps.sweep import SweepSpec
from lab.tasks.base import Split, make_task
from lab.training.losses import task_loss

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
WHY = sorted(path.stem for path in EXPERIMENTS.glob("why_*.toml"))


def test_every_question_has_its_experiment():
    assert WHY == ["why_attention_score", "why_positions", "why_positions_length", "why_recurrence",
                   "why_recurrence_text", "why_shared_blocks", "why_shared_blocks_text", "why_skip_connections"]


@pytest.mark.parametrize("experiment", WHY)
def test_why_sweep_expands_and_its_base_point_trains(experiment, tmp_path):
    spec = SweepSpec.build(experiment)
    assert spec.seeds >= 2 and spec.axes, "a question is answered by a sweep with seeds"
    members = spec.members()  # validates and resolves every point
    assert len(members) == math.prod(len(values) for values in spec.axes.values()) * spec.seeds
    tasks = {}
    for member in members[:: spec.seeds]:  # one model per point (seeds are innermost): every variant builds and runs
        config = member.config
        key = config.task.model_dump_json()
        if key not in tasks:
            tasks[key] = make_task(config.task)
        task = tasks[key]
        tokens = task.split("test").tokens[:2]
        with torch.no_grad():
            logits = build_model(config.model).forward_at(tokens, task.read_position)
        expected = (2, tokens.shape[1], task.d_vocab_out) if task.read_position is None else (2, task.d_vocab_out)
        assert logits.shape == expected and torch.isfinite(logits).all(), member.name
    config = lab.load_experiment(experiment, ["train.steps=5", "train.eval_every=5", "train.checkpoint_every=5"])
    summary = lab.Trainer(config, tmp_path / experiment, progress=False).run()
    assert summary["status"] == "finished" and summary["step"] == 5, summary
    assert math.isfinite(summary["final"]["train_loss"])


def params(experiment: str, *overrides: str) -> int:
    return n_params(lab.load_experiment(experiment, list(overrides)).resolve().model)


def test_recurrence_compares_matched_parameters_at_every_length():
    for seq_len in SweepSpec.build("why_recurrence").axes["task.seq_len"]:
        transformer = params("why_recurrence", "model.arch=transformer", f"task.seq_len={seq_len}")
        lstm = params("why_recurrence", "model.arch=lstm", f"task.seq_len={seq_len}")
        assert abs(transformer - lstm) <= 0.05 * transformer, (seq_len, transformer, lstm)


def test_recurrence_on_text_compares_matched_parameters_on_characters():
    transformer, lstm = params("why_recurrence_text", "model.arch=transformer"), params("why_recurrence_text", "model.arch=lstm")
    assert (transformer, lstm) == (114_125, 114_189)  # the figures the README's table names
    config = lab.load_experiment("why_recurrence_text").resolve()
    assert config.task.level == "char" and SweepSpec.build("why_recurrence_text").axes == {"model.arch": ["transformer", "lstm"]}
    # why_shared_blocks_text's own-blocks point at d_mlp 256 is this transformer, so the two tables share a row
    shared = lab.load_experiment("why_shared_blocks_text").resolve()
    assert (shared.task, shared.train) == (config.task, config.train)
    assert shared.model.model_dump(exclude={"lstm_hidden", "lstm_layers"}) == config.model.model_dump(exclude={"lstm_hidden", "lstm_layers"})


@pytest.mark.parametrize("experiment, expected", [
    ("why_shared_blocks", {("false", 256): 104_085, ("false", 640): 203_157, ("true", 256): 54_101, ("true", 640): 103_637}),
    ("why_shared_blocks_text", {("false", 256): 114_125, ("false", 640): 213_197, ("true", 256): 64_141, ("true", 640): 113_677}),
])
def test_shared_blocks_budgets_are_the_ones_the_experiment_states(experiment, expected):
    counts = {(shared, d_mlp): params(experiment, f"model.shared_blocks={shared}", f"model.d_mlp={d_mlp}")
              for shared in ("false", "true") for d_mlp in (256, 640)}
    assert counts == expected
    # matched parameters: the shared block at d_mlp 640 against separate blocks at d_mlp 256
    assert abs(counts["true", 640] - counts["false", 256]) <= 0.01 * counts["false", 256]


def fresh_model(*overrides: str, n: int = 256):
    """(task, why_skip_connections' model at initialisation, its first `n` training sequences)."""
    config = lab.load_experiment("why_skip_connections", list(overrides)).resolve()
    task, model = make_task(config.task), build_model(config.model)
    train = task.split("train")
    return task, model, Split(train.tokens[:n], train.labels[:n])


def init_gradients(*overrides: str) -> dict[str, float]:
    task, model, batch = fresh_model(*overrides)
    return gradient_norms_per_layer(model, batch, task.read_position)


def test_gradient_norms_per_layer_cover_every_weight_once_and_leave_grad_alone():
    task, model, batch = fresh_model("model.n_layers=3", n=64)
    norms = gradient_norms_per_layer(model, batch, task.read_position)
    assert list(norms) == ["embed", "blocks.0", "blocks.1", "blocks.2", "unembed"]
    assert all(p.grad is None for p in model.parameters())
    task_loss(model.forward_at(batch.tokens, None), batch.labels).backward()
    whole = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters()))
    assert math.sqrt(sum(norm**2 for norm in norms.values())) == pytest.approx(whole, rel=1e-6)
    block_1 = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.blocks[1].parameters()))
    assert norms["blocks.1"] == pytest.approx(block_1, rel=1e-6)
    with pytest.raises(ValueError, match="shared_blocks"):
        _, shared, _ = fresh_model("model.shared_blocks=true", n=1)
        gradient_norms_per_layer(shared, batch, task.read_position)


def test_without_skips_or_layernorm_the_gradient_vanishes_towards_the_input():
    # 8 blocks, no LayerNorm: with skips the first block's gradient is within 2x of the last one's;
    # without, each block's backward multiplies by its small-init Jacobian (measured: 25x smaller).
    skips = init_gradients("model.n_layers=8", "model.normalization=none", "model.residual=true")
    no_skips = init_gradients("model.n_layers=8", "model.normalization=none", "model.residual=false")
    assert skips["blocks.0"] > 0.5 * skips["blocks.7"], skips
    assert no_skips["blocks.0"] < 0.1 * no_skips["blocks.7"], no_skips
    assert torch.isfinite(torch.tensor(list(no_skips.values()))).all()
