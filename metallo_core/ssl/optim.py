"""DINO's optimiser set-up: decay only on weights (not biases or norms), AdamW/SGD/LARS, gradient clipping."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn


def parameter_groups(model: nn.Module) -> list[dict]:
    """[weights with weight decay, biases and 1-D parameters without]; the trainer schedules group 0's decay."""
    regularised, not_regularised = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (not_regularised if name.endswith(".bias") or parameter.ndim <= 1 else regularised).append(parameter)
    return [{"params": regularised}, {"params": not_regularised, "weight_decay": 0.0}]


class LARS(torch.optim.Optimizer):
    """SGD with layer-wise trust ratios (You et al.), skipped for 1-D parameters as in DINO's version."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 eta: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                update = parameter.grad
                if parameter.ndim > 1:
                    update = update.add(parameter, alpha=group["weight_decay"])
                    parameter_norm, update_norm = torch.norm(parameter), torch.norm(update)
                    trust = torch.where(
                        (parameter_norm > 0) & (update_norm > 0), group["eta"] * parameter_norm / update_norm,
                        torch.ones_like(parameter_norm),
                    )
                    update = update.mul(trust)
                state = self.state[parameter]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(parameter)
                buffer = state["momentum_buffer"]
                buffer.mul_(group["momentum"]).add_(update)
                parameter.add_(buffer, alpha=-group["lr"])


def build_optimizer(name: Literal["adamw", "sgd", "lars"], groups: list[dict], momentum: float = 0.9):
    # lr and weight decay are set by the schedules before every step.
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=0.0)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=momentum)
    if name == "lars":
        return LARS(groups, momentum=momentum)
    raise ValueError(f"unknown optimiser {name!r}")


def clip_gradients(parameters: Iterable[nn.Parameter], max_norm: float,
                   mode: Literal["per_parameter", "global"]) -> float:
    """Clip gradients and return the global gradient norm before clipping (0 when clipping is off).

    `per_parameter` is what DINO does: each parameter's gradient is scaled to norm <= max_norm on its
    own. `global` scales all gradients together (torch's clip_grad_norm_).
    """
    gradients = [p.grad for p in parameters if p.grad is not None]
    if not gradients:
        return 0.0
    norms = torch.stack([g.detach().norm(2) for g in gradients])
    total = float(norms.norm(2))
    if max_norm <= 0:
        return total
    if mode == "global":
        # One factor for all, as torch's clip_grad_norm_ computes it (which takes parameters, not gradients:
        # handed the gradients it finds no `.grad` on them and clips nothing).
        torch._foreach_mul_(gradients, min(max_norm / (total + 1e-6), 1.0))
    else:
        scales = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(gradients, list(scales.unbind()))
    return total
