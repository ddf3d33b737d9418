"""Each recipe's update rule against its paper's definition, on tiny hand-made examples."""

import math

import pytest
import torch

from conftest import tiny_data

from lab.config import GradFilterConfig, apply_overrides, load_experiment, validate_experiment
from lab.training.losses import stablemax, task_loss
from lab.training.recipes import RECIPES, GradFilter, orthogonalize_gradients, recipe_overrides
from lab.training.trainer import Trainer


def params_with_grads(grads: list[torch.Tensor]) -> list[tuple[str, torch.nn.Parameter]]:
    named = [(f"p{i}", torch.nn.Parameter(torch.zeros_like(g))) for i, g in enumerate(grads)]
    for (_, p), g in zip(named, grads):
        p.grad = g.clone()
    return named


def gradient_sequence(n: int, seed: int = 0) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(3, 2, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64)]
            for _ in range(n)]


def run_filter(config: GradFilterConfig, sequence, filt: GradFilter | None = None):
    """Feed each step's raw gradients through the filter; return the filtered gradients of every step."""
    named = params_with_grads(sequence[0])
    filt = filt or GradFilter(config, named)
    filt.named_params = named
    out = []
    for grads in sequence:
        for (_, p), g in zip(named, grads):
            p.grad = g.clone()
        filt.apply()
        out.append([p.grad.clone() for _, p in named])
    return out, filt


def test_grokfast_ema_matches_its_definition():
    alpha, lamb = 0.8, 2.0
    sequence = gradient_sequence(6)
    out, _ = run_filter(GradFilterConfig(kind="ema", alpha=alpha, lamb=lamb), sequence)
    mu = None
    for grads, got in zip(sequence, out):
        # Grokfast Algorithm 2: mu <- alpha mu + (1 - alpha) g (mu starts at the first g); g <- g + lamb mu
        mu = [g.clone() for g in grads] if mu is None else [alpha * m + (1 - alpha) * g for m, g in zip(mu, grads)]
        for g, m, o in zip(grads, mu, got):
            torch.testing.assert_close(o, g + lamb * m, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("window", [1, 3])
def test_grokfast_ma_matches_its_definition(window):
    lamb = 5.0
    sequence = gradient_sequence(8)
    out, _ = run_filter(GradFilterConfig(kind="ma", window=window, lamb=lamb), sequence)
    for t, (grads, got) in enumerate(zip(sequence, out)):
        for i, (g, o) in enumerate(zip(grads, got)):
            if t + 1 < window:  # Grokfast Algorithm 1 with warm-up: nothing added until the window is full
                torch.testing.assert_close(o, g, rtol=0, atol=0)
            else:
                mean = torch.stack([sequence[s][i] for s in range(t + 1 - window, t + 1)]).mean(0)
                torch.testing.assert_close(o, g + lamb * mean, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["ema", "ma"])
def test_filter_state_round_trip_continues_bit_for_bit(kind):
    config = GradFilterConfig(kind=kind, window=3, alpha=0.9, lamb=1.5)
    sequence = gradient_sequence(9, seed=1)
    straight, _ = run_filter(config, sequence)
    _, first = run_filter(config, sequence[:5])
    state = {k: v.clone() for k, v in first.state_tensors().items()}
    fresh = GradFilter(config, params_with_grads(sequence[0]))
    fresh.load_state_tensors(state)
    resumed, _ = run_filter(config, sequence[5:], filt=fresh)
    for a, b in zip(straight[5:], resumed):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_orthograd_matches_its_definition():
    w = torch.nn.Parameter(torch.tensor([[1.0, 2.0], [0.0, -1.0]], dtype=torch.float64))
    g = torch.tensor([[0.5, -1.0], [2.0, 1.0]], dtype=torch.float64)
    zero = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))  # w = 0: nothing to remove
    zero_grad = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    w.grad, zero.grad = g.clone(), zero_grad.clone()
    orthogonalize_gradients([w, zero])
    wf, gf = w.detach().reshape(-1), g.reshape(-1)
    perp = gf - (gf @ wf) / (wf @ wf) * wf  # Prieto et al. 2025: the part of g orthogonal to w ...
    expected = perp * gf.norm() / perp.norm()  # ... rescaled to |g|
    torch.testing.assert_close(w.grad.reshape(-1), expected, rtol=1e-12, atol=1e-12)
    assert abs(float(w.grad.reshape(-1) @ wf)) < 1e-12
    assert math.isclose(float(w.grad.norm()), float(g.norm()), rel_tol=1e-12)
    assert torch.equal(zero.grad, zero_grad)


def test_stablemax_matches_its_definition():
    x = torch.tensor([[0.0, 1.0, -1.0, 3.0]], dtype=torch.float64)
    s = torch.tensor([[1.0, 2.0, 0.5, 4.0]], dtype=torch.float64)  # x + 1 for x >= 0, 1 / (1 - x) below
    torch.testing.assert_close(stablemax(x), s / s.sum(), rtol=1e-12, atol=0)
    labels = torch.tensor([2])
    loss = task_loss(x, labels, "stablemax", torch.float64)
    assert math.isclose(float(loss), -math.log(0.5 / 7.5), rel_tol=1e-12)
    # no exp: huge logits give finite losses and gradients where softmax would saturate
    big = torch.tensor([[1e30, -1e30, 0.0]], dtype=torch.float64, requires_grad=True)
    loss = task_loss(big, torch.tensor([1]), "stablemax", torch.float64)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(big.grad).all()


def test_softmax_loss_is_cross_entropy():
    x = torch.tensor([[0.3, -1.2, 2.0]], dtype=torch.float64)
    expected = -(x[0, 2] - x[0].exp().sum().log())
    assert math.isclose(float(task_loss(x, torch.tensor([2]), "softmax", torch.float64)), float(expected), rel_tol=1e-12)


# three full-batch updates at a visible learning rate, with a float64 loss
THREE_STEPS = {"steps": 3, "lr": 1e-2, "warmup_steps": 0, "eval_every": 1, "loss_dtype": "float64"}


@pytest.mark.parametrize("recipe", ["grokfast_ema", "grokfast_ma", "stablemax_orthograd", "high_lr_wd"])
def test_trainer_update_applies_the_recipe(tmp_path, recipe):
    """Three Trainer updates equal a hand-written loop: loss -> backward -> ⊥Grad -> filter -> AdamW."""
    data = load_experiment_dict(recipe)
    trainer = Trainer(validate_experiment(data), tmp_path / "run", progress=False)
    # float64, so that gradient entries near 0 (which Adam's first steps scale up to +-lr) agree
    trainer.model.double()
    tc = trainer.config.train
    model = type(trainer.model)(trainer.config.model).double()
    model.load_state_dict(trainer.model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
    filt = GradFilter(tc.grad_filter, list(model.named_parameters())) if tc.grad_filter.kind != "none" else None
    split = trainer.train_split
    for _ in range(3):
        trainer.update()
        logits = model(split.tokens)[:, -1]
        loss = task_loss(logits, split.labels, tc.loss, trainer.loss_dtype)
        opt.zero_grad()
        loss.backward()
        if tc.orthograd:
            orthogonalize_gradients(model.parameters())
        if filt is not None:
            filt.apply()
        opt.step()
    for (name, a), b in zip(trainer.model.named_parameters(), model.parameters()):
        if name.endswith("b_K"):
            # softmax ignores a shift shared by all keys, so b_K's true gradient is 0 and its computed one
            # is rounding noise, which Adam scales up to +-lr: compare only parameters with a real gradient
            continue
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)
    # and the recipe really changed the update: the plain loop without it ends elsewhere
    if recipe != "high_lr_wd":
        plain = Trainer(validate_experiment(tiny_data(**THREE_STEPS)), tmp_path / "plain", progress=False)
        plain.update(), plain.update(), plain.update()
        assert any((a - b).abs().max() > 1e-4 for a, b in zip(plain.model.parameters(), trainer.model.parameters()))


def load_experiment_dict(recipe: str) -> dict:
    data = apply_overrides(tiny_data(**THREE_STEPS), recipe_overrides(recipe))
    if recipe == "grokfast_ma":  # a window of 2, so that two steps see the filter at work
        data["train"]["grad_filter"]["window"] = 2
    return data


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_every_recipe_has_an_experiment_config_that_is_nanda_plus_the_recipe(recipe):
    if recipe == "baseline":
        return
    config = load_experiment(f"nanda_{recipe}")
    expected = load_experiment("nanda_2023", recipe_overrides(recipe))
    assert config.model == expected.model and config.task == expected.task
    assert config.train.model_dump(exclude={"steps", "eval_every", "checkpoint_every", "stop_after_grok"}) == \
        expected.train.model_dump(exclude={"steps", "eval_every", "checkpoint_every", "stop_after_grok"})


def test_unknown_recipe_names_the_valid_ones():
    with pytest.raises(ValueError, match="grokfast_ema"):
        recipe_overrides("grokfast")


def test_fastest_recipe_is_the_base_point_of_its_sweep_on_five_seeds():
    """`lab sweep nanda_fastest` trains the `fastest` recipe (the file's base point, which `lab train
    nanda_fastest` trains) on the five seeds the recipe's claim is about, beside the points it is compared with."""
    from lab.sweeps.sweep import SweepSpec

    recipe = load_experiment("nanda_fastest").resolve()
    spec = SweepSpec.build("nanda_fastest")
    assert spec.seeds == 5 and spec.axes, "a sweep around the recipe"
    at_recipe = [m for m in spec.members() if same_but_seed(m.config, recipe)]
    assert sorted(m.config.model.seed for m in at_recipe) == [0, 1, 2, 3, 4]
    assert len(spec.members()) > len(at_recipe)


def same_but_seed(a, b) -> bool:
    return (a.task, a.train, a.model.model_copy(update={"seed": 0})) == (b.task, b.train, b.model.model_copy(update={"seed": 0}))


def test_fastest_recipe_groks_the_nanda_split_within_300_steps(tmp_path):
    """The `fastest` recipe on the Nanda et al. 2023 split (p = 113, 30% of pairs, full batch, their model):
    seed 0 memorises and then reaches test accuracy >= 0.99 within 300 steps (at step 130 when measured)."""
    config = load_experiment("nanda_fastest", ["train.steps=300", "train.stop_after_grok=0", "train.log_checkpoints=0",
                                               "train.checkpoint_every=300"])
    summary = Trainer(config, tmp_path / "run", progress=False).run()
    assert summary["grok_step"] is not None and summary["grok_step"] <= 300, summary
    assert summary["memorize_step"] is not None and summary["memorize_step"] <= summary["grok_step"]
    assert summary["final"]["test_acc"] >= 0.99
