"""Training schedules as arrays indexed by the global step, so a resumed run continues exactly."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def cosine_schedule(
    base_value: float,
    final_value: float,
    epochs: int,
    steps_per_epoch: int,
    *,
    warmup_epochs: float = 0,
    warmup_start_value: float = 0.0,
) -> np.ndarray:
    """Linear warm-up from `warmup_start_value` to `base_value`, then a cosine decay to `final_value`."""
    total = epochs * steps_per_epoch
    warmup_steps = min(int(round(warmup_epochs * steps_per_epoch)), total)
    warmup = np.linspace(warmup_start_value, base_value, warmup_steps, endpoint=False)
    decay_steps = total - warmup_steps
    progress = np.arange(decay_steps) / max(decay_steps, 1)
    decay = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * progress))
    return np.concatenate([warmup, decay]).astype(np.float64)


def linear_warmup_then_constant(start: float, end: float, warmup_epochs: float, epochs: int,
                                steps_per_epoch: int) -> np.ndarray:
    total = epochs * steps_per_epoch
    warmup_steps = min(int(round(warmup_epochs * steps_per_epoch)), total)
    return np.concatenate([np.linspace(start, end, warmup_steps, endpoint=False),
                           np.full(total - warmup_steps, end)]).astype(np.float64)


@dataclass
class DinoSchedules:
    learning_rate: np.ndarray
    weight_decay: np.ndarray
    teacher_momentum: np.ndarray
    teacher_temperature: np.ndarray

    @property
    def total_steps(self) -> int:
        return len(self.learning_rate)

    def at(self, step: int) -> dict[str, float]:
        return {
            "lr": float(self.learning_rate[step]),
            "weight_decay": float(self.weight_decay[step]),
            "teacher_momentum": float(self.teacher_momentum[step]),
            "teacher_temperature": float(self.teacher_temperature[step]),
        }


def dino_schedules(
    *,
    epochs: int,
    steps_per_epoch: int,
    total_batch_size: int,
    base_lr: float,
    min_lr: float,
    warmup_epochs: float,
    weight_decay: float,
    weight_decay_end: float,
    momentum_teacher: float,
    teacher_temperature: float,
    warmup_teacher_temperature: float,
    warmup_teacher_temperature_epochs: float,
) -> DinoSchedules:
    """DINO's schedules: lr scaled by total batch / 256; wd and EMA momentum on cosines; teacher temperature warm-up."""
    return DinoSchedules(
        learning_rate=cosine_schedule(base_lr * total_batch_size / 256.0, min_lr, epochs, steps_per_epoch,
                                      warmup_epochs=warmup_epochs),
        weight_decay=cosine_schedule(weight_decay, weight_decay_end, epochs, steps_per_epoch),
        teacher_momentum=cosine_schedule(momentum_teacher, 1.0, epochs, steps_per_epoch),
        teacher_temperature=linear_warmup_then_constant(
            warmup_teacher_temperature, teacher_temperature, warmup_teacher_temperature_epochs, epochs, steps_per_epoch
        ),
    )
