"""DINO's optimiser set-up (metallo_core/ssl/optim.py), Ray-free: which parameters decay, LARS against the
official DINO implementation, and gradient clipping per parameter (DINO's) versus global."""

import pytest
import torch
from torch import nn

from metallo_core.ssl.optim import LARS, build_optimizer, clip_gradients, parameter_groups


class Small(nn.Module):
    """One of each kind of parameter the DINO networks hold: conv and linear weights and biases, BatchNorm
    and LayerNorm affine parameters, a frozen weight."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.linear = nn.Linear(4, 5)
        self.norm = nn.LayerNorm(5)
        self.frozen = nn.Linear(5, 2, bias=False)
        self.frozen.weight.requires_grad_(False)


def test_only_weight_matrices_decay_not_biases_norms_or_frozen_parameters():
    model = Small()
    decayed, not_decayed = parameter_groups(model)
    names = {id(p): name for name, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decayed["params"]) == ["conv.weight", "linear.weight"]
    assert sorted(names[id(p)] for p in not_decayed["params"]) == [
        "bn.bias", "bn.weight", "conv.bias", "linear.bias", "norm.bias", "norm.weight"]
    assert not_decayed["weight_decay"] == 0.0 and "weight_decay" not in decayed


def test_adamw_step_shrinks_weights_by_the_decay_and_leaves_biases_and_norms_alone():
    """With zero gradients, AdamW's only change is the decoupled decay: w <- w * (1 - lr * wd) on group 0,
    nothing on group 1 (the trainer schedules group 0's decay, never group 1's)."""
    torch.manual_seed(0)
    model = Small()
    for parameter in model.bn.parameters():  # BatchNorm starts at weight 1, bias 0; make them visible
        parameter.data.uniform_(0.5, 1.5)
    optimizer = build_optimizer("adamw", parameter_groups(model))
    for group in optimizer.param_groups:
        group["lr"] = 0.1
    optimizer.param_groups[0]["weight_decay"] = 0.5
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter) if parameter.requires_grad else None
    optimizer.step()
    for name, parameter in model.named_parameters():
        expected = before[name] * (1 - 0.1 * 0.5) if name in ("conv.weight", "linear.weight") else before[name]
        torch.testing.assert_close(parameter.detach(), expected, msg=name)


def test_the_trainer_schedules_decay_on_the_weight_group_only():
    from metallo_core.config import from_dict
    from metallo_core.ssl.config import DinoConfig
    from metallo_core.ssl.trainer import DinoTrainer

    config = from_dict(DinoConfig, {
        "data": {"uri": "unused", "base_size": 20},
        "backbone": {"arch": "resnet18", "small_input": True, "image_size": 16},
        "head": {"out_dim": 16, "hidden_dim": 16, "bottleneck_dim": 8},
        "multicrop": {"global_size": 16, "local_size": 8, "local_crops": 0, "micrograph": True},
        "optim": {"name": "lars", "batch_size_per_worker": 2, "warmup_epochs": 0, "momentum_teacher": 0.5,
                  "weight_decay": 0.04,
                  "weight_decay_end": 0.4},
        "epochs": 2,
    })
    trainer = DinoTrainer(config, steps_per_epoch=2, world_size=1, rank=0, device=torch.device("cpu"))
    assert isinstance(trainer.optimizer, LARS)
    images = torch.randint(0, 256, (2, 20, 20, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    metrics = trainer.train_step(images, step=3, epoch=1)
    decayed, not_decayed = trainer.optimizer.param_groups
    assert decayed["weight_decay"] == pytest.approx(metrics["weight_decay"]) and metrics["weight_decay"] > 0.04
    assert not_decayed["weight_decay"] == 0.0
    assert decayed["lr"] == not_decayed["lr"] == pytest.approx(metrics["lr"])


class OfficialLARS(torch.optim.Optimizer):
    """facebookresearch/dino utils.LARS, verbatim but for names of locals (the oracle)."""

    def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim != 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                if p.ndim != 1:
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0,
                                    torch.where(update_norm > 0, (g["eta"] * param_norm / update_norm), one), one)
                    dp = dp.mul(q)
                param_state = self.state[p]
                if "mu" not in param_state:
                    param_state["mu"] = torch.zeros_like(p)
                mu = param_state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def test_lars_matches_the_official_dino_lars_over_several_steps():
    torch.manual_seed(1)
    shapes = [(6, 4), (3, 2, 3, 3), (5,), (4, 4)]
    start = [torch.randn(shape) for shape in shapes]
    start[3].zero_()  # a zero weight: trust ratio 1 (no division by zero)
    ours = [nn.Parameter(t.clone()) for t in start]
    theirs = [nn.Parameter(t.clone()) for t in start]

    def groups(parameters):
        return [{"params": [parameters[0], parameters[1], parameters[3]], "weight_decay": 0.3},
                {"params": [parameters[2]], "weight_decay": 0.0}]

    optimizer = LARS(groups(ours), lr=0.5, momentum=0.9, eta=0.02)
    oracle = OfficialLARS(groups(theirs), lr=0.5, momentum=0.9, eta=0.02)
    for _ in range(4):
        gradients = [torch.randn(shape) for shape in shapes]
        for ours_p, theirs_p, gradient in zip(ours, theirs, gradients):
            ours_p.grad, theirs_p.grad = gradient.clone(), gradient.clone()
        optimizer.step()
        oracle.step()
        for ours_p, theirs_p in zip(ours, theirs):
            torch.testing.assert_close(ours_p, theirs_p, rtol=1e-6, atol=1e-7)
    assert not torch.equal(ours[0], start[0]) and not torch.equal(ours[3], start[3])


def test_lars_step_is_the_trust_ratio_times_the_gradient_for_matrices_and_plain_sgd_for_vectors():
    weight = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # norm 5
    bias = nn.Parameter(torch.tensor([1.0, 1.0]))
    weight.grad, bias.grad = torch.tensor([[0.0, 10.0]]), torch.tensor([2.0, -2.0])  # weight's gradient: norm 10
    optimizer = LARS([{"params": [weight, bias]}], lr=1.0, momentum=0.0, eta=0.1)
    optimizer.step()
    # trust = eta * |w| / |g| = 0.1 * 5 / 10 = 0.05, so the step is 0.05 * g; the vector takes the raw gradient.
    torch.testing.assert_close(weight.detach(), torch.tensor([[3.0, 3.5]]))
    torch.testing.assert_close(bias.detach(), torch.tensor([-1.0, 3.0]))


def gradients_of(norms: list[float], seed: int = 0) -> list[nn.Parameter]:
    """Parameters whose gradients have the given norms (random directions)."""
    generator = torch.Generator().manual_seed(seed)
    parameters = []
    for index, norm in enumerate(norms):
        parameter = nn.Parameter(torch.zeros(3 + index, 2))
        direction = torch.randn(3 + index, 2, generator=generator)
        parameter.grad = direction / direction.norm() * norm
        parameters.append(parameter)
    return parameters


def official_clip_gradients(parameters, clip):
    """facebookresearch/dino utils.clip_gradients (the oracle), over parameters instead of a model."""
    for p in parameters:
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)


def test_per_parameter_clipping_is_dinos_each_gradient_on_its_own():
    norms = [0.5, 3.0, 12.0, 40.0]
    ours, theirs = gradients_of(norms), gradients_of(norms)
    before = [p.grad.clone() for p in ours]
    total = clip_gradients(ours, 3.0, "per_parameter")
    official_clip_gradients(theirs, 3.0)
    assert total == pytest.approx(sum(n * n for n in norms) ** 0.5, rel=1e-5)  # the norm before clipping
    for ours_p, theirs_p in zip(ours, theirs):
        torch.testing.assert_close(ours_p.grad, theirs_p.grad)
    after = [p.grad.norm().item() for p in ours]
    assert after == pytest.approx([0.5, 3.0, 3.0, 3.0], rel=1e-5)  # small gradients untouched
    for gradient, original in zip((p.grad for p in ours), before):  # directions kept
        assert torch.nn.functional.cosine_similarity(gradient.flatten(), original.flatten(), dim=0) > 0.9999


def test_global_clipping_scales_all_gradients_together_to_the_norm():
    norms = [0.5, 3.0, 12.0, 40.0]
    parameters = gradients_of(norms)
    before = [p.grad.clone() for p in parameters]
    total = clip_gradients(parameters, 3.0, "global")
    expected_total = sum(n * n for n in norms) ** 0.5
    assert total == pytest.approx(expected_total, rel=1e-5)
    after_total = torch.stack([p.grad.norm() for p in parameters]).norm().item()
    assert after_total == pytest.approx(3.0, rel=1e-4)
    for parameter, original in zip(parameters, before):  # one factor for all: the small gradients shrink too
        torch.testing.assert_close(parameter.grad, original * (3.0 / expected_total), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("mode", ["per_parameter", "global"])
def test_clipping_leaves_gradients_under_the_limit_and_off_means_off(mode):
    small = gradients_of([0.1, 0.2])
    before = [p.grad.clone() for p in small]
    assert clip_gradients(small, 3.0, mode) == pytest.approx((0.01 + 0.04) ** 0.5, rel=1e-5)
    for parameter, original in zip(small, before):
        assert torch.equal(parameter.grad, original)
    large = gradients_of([10.0, 20.0])
    before = [p.grad.clone() for p in large]
    assert clip_gradients(large, 0.0, mode) == pytest.approx(500 ** 0.5, rel=1e-5)  # clip_grad 0: disabled
    for parameter, original in zip(large, before):
        assert torch.equal(parameter.grad, original)
    assert clip_gradients([nn.Parameter(torch.zeros(2))], 3.0, mode) == 0.0  # no gradients at all
