"""DINO's self-distillation loss and the running centre of the teacher outputs."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def dino_loss(
    student_output: torch.Tensor,
    teacher_output: torch.Tensor,
    center: torch.Tensor,
    *,
    student_temperature: float,
    teacher_temperature: float,
    num_global_views: int = 2,
) -> torch.Tensor:
    """Cross-entropy between the centred, sharpened teacher softmax and the student softmax.

    `student_output` holds all views (V*B rows, view-major), `teacher_output` the global views only
    (G*B rows). Every (teacher view i, student view j) pair with i != j contributes; pairs that
    compare a view with itself are skipped, and the loss is the mean over the remaining pairs.
    """
    num_views = student_output.shape[0] * num_global_views // teacher_output.shape[0]
    batch = teacher_output.shape[0] // num_global_views
    student_log_probs = F.log_softmax(student_output.float() / student_temperature, dim=-1)
    teacher_probs = F.softmax((teacher_output.float() - center) / teacher_temperature, dim=-1).detach()
    student_log_probs = student_log_probs.reshape(num_views, batch, -1)
    teacher_probs = teacher_probs.reshape(num_global_views, batch, -1)
    # pair_losses[i, j] = mean over the batch of CE(teacher view i, student view j)
    pair_losses = -torch.einsum("ibk,jbk->ij", teacher_probs, student_log_probs) / batch
    same_view = torch.zeros_like(pair_losses, dtype=torch.bool)
    same_view[:, :num_global_views] = torch.eye(num_global_views, dtype=torch.bool, device=pair_losses.device)
    return pair_losses[~same_view].mean()


def batch_center(teacher_output: torch.Tensor) -> torch.Tensor:
    """The mean teacher output over the global batch (all workers), shape (1, K)."""
    total = teacher_output.float().sum(dim=0, keepdim=True)
    count = torch.tensor([teacher_output.shape[0]], dtype=torch.float32, device=teacher_output.device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
        dist.all_reduce(count)
    return total / count


class TeacherCenter(nn.Module):
    """EMA of the batch-mean teacher output; subtracting it keeps the teacher from collapsing to one unit."""

    def __init__(self, out_dim: int, momentum: float = 0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def update(self, teacher_output: torch.Tensor) -> None:
        self.center.mul_(self.momentum).add_(batch_center(teacher_output), alpha=1 - self.momentum)
