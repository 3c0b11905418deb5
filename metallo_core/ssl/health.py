"""Collapse detection for DINO: the two ways self-distillation fails, measured and explained.

Uniform collapse: every output is the uniform distribution, the loss sits at ln(out_dim).
Dimensional collapse: every image maps to the same few output units, the batch-mean distribution
has near-zero entropy. Healthy training has sharp per-image outputs (low entropy) that differ across
images (high batch-mean entropy).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

REMEDIES = (
    "known remedies: lower the teacher temperature (loss.teacher_temperature 0.02-0.04), raise the teacher "
    "momentum for small batches (optim.momentum_teacher 0.9995), keep the last layer frozen longer "
    "(optim.freeze_last_layer_epochs), use a smaller head.out_dim on small datasets, or lower the learning rate"
)


@torch.no_grad()
def teacher_output_stats(teacher_output: torch.Tensor, center: torch.Tensor, temperature: float) -> dict[str, float]:
    probs = F.softmax((teacher_output.float() - center) / temperature, dim=-1)
    per_image_entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1).mean()
    batch_mean = probs.mean(dim=0)
    batch_entropy = -(batch_mean * batch_mean.clamp_min(1e-12).log()).sum()
    return {"teacher_entropy": float(per_image_entropy), "teacher_batch_entropy": float(batch_entropy)}


def collapse_warning(loss: float, teacher_entropy: float, teacher_batch_entropy: float, out_dim: int,
                     *, tolerance: float = 0.02) -> str | None:
    """A message naming the kind of collapse and the remedies, or None when training looks healthy."""
    uniform = math.log(out_dim)
    if abs(loss - uniform) < tolerance * uniform and teacher_entropy > (1 - tolerance) * uniform:
        return (f"DINO looks collapsed to uniform outputs: loss {loss:.4f} sits at ln(out_dim) = {uniform:.4f} "
                f"and the teacher's outputs carry no information; {REMEDIES}")
    if teacher_batch_entropy < 0.05 * uniform:
        return (f"DINO looks collapsed to a few output units: the batch-mean teacher distribution has entropy "
                f"{teacher_batch_entropy:.3f} (uniform would be {uniform:.2f}), so all images look alike; {REMEDIES}")
    return None
