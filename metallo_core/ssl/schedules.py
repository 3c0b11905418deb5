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


def short_run_warnings(schedules: DinoSchedules, *, epochs: int, warmup_epochs: float,
                       warmup_teacher_temperature_epochs: float, pretrained_start: bool = False) -> list[str]:
    """What makes DINO's ImageNet schedules learn little in a short run, in words (empty when none applies).

    The teacher after the run is prod(m_t) parts its initialisation: with m = 0.996 (DINO's, for runs of
    ~100k steps) and a run of a few hundred steps it stays mostly the random network, and the k-NN probe,
    which reads the teacher, sees little of what the student learnt. With `pretrained_start` (domain-adaptive
    DINO from pretrained weights) a teacher that stays close to its start is the intent, so that is not warned.
    """
    messages = []
    initial_share = float(np.prod(schedules.teacher_momentum))
    if initial_share > 0.5 and not pretrained_start:
        horizon = 1 / max(1 - float(schedules.teacher_momentum[0]), 1e-12)
        messages.append(
            f"the teacher keeps {initial_share:.0%} of its initial weights after the run's {schedules.total_steps} "
            f"steps (optim.momentum_teacher {schedules.teacher_momentum[0]:g} averages over ~{horizon:.0f} steps); "
            "lower optim.momentum_teacher (e.g. 0.99 for a few hundred steps) or train longer"
        )
    if warmup_epochs >= epochs:
        messages.append(f"optim.warmup_epochs ({warmup_epochs:g}) >= epochs ({epochs}): the learning rate never "
                        "reaches its peak")
    if warmup_teacher_temperature_epochs >= epochs:
        messages.append(f"loss.warmup_teacher_temperature_epochs ({warmup_teacher_temperature_epochs:g}) >= epochs "
                        f"({epochs}): the teacher temperature never reaches loss.teacher_temperature")
    return messages
