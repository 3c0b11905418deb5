"""The Ray-free ProtoNet meta-trainer: it learns (held-out classes, fixed tasks, a margin the untrained-weights
guard does not reach), resumes exactly from its state, keeps the best weights, and stops on a non-finite loss."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from metallo_core.config import from_dict
from metallo_core.data.class_index import ClassIndexedImages
from metallo_core.data.synthetic.fewshot import fewshot_classes, render_images
from metallo_core.fewshot.config import MetaTrainConfig
from metallo_core.fewshot.episodes import fixed_episodes
from metallo_core.fewshot.trainer import ProtoNetTrainer
from metallo_core.models.backbones import BackboneSpec, build_backbone

SIZE = 20
SPEC = BackboneSpec(arch="resnet18", small_input=True, image_size=SIZE)
# Measured (fp32, seed 0, 60 val tasks 5-way 1-shot): untrained 0.267; after 60 episodes at lr 1e-3 0.421;
# after 40 episodes at lr 1e-9 0.307 (BatchNorm statistics alone move it).
LEARNING_MARGIN = 0.08


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def synthetic_images(first_class: int, num_classes: int, per_class: int, seed: int) -> ClassIndexedImages:
    """(per_class * num_classes, SIZE, SIZE, 3) uint8 synthetic micrographs of the given classes."""
    classes = fewshot_classes(24, seed=0)[first_class:first_class + num_classes]
    images, labels = [], []
    for index, spec in enumerate(classes):
        gray = render_images(spec, first_class + index, per_class, size=SIZE, seed=seed)
        images.append(np.repeat(gray[..., None], 3, axis=-1))
        labels += [index] * per_class
    return ClassIndexedImages(np.concatenate(images), np.array(labels), [c.name for c in classes],
                              ["in-memory"] * len(labels))


def make_config(steps: int, lr: float, **overrides) -> MetaTrainConfig:
    return from_dict(MetaTrainConfig, {
        "data": {"uri": "in-memory"},
        "episodes": {"way": 5, "shot": 1, "query": 5},
        "episodes_per_epoch": steps, "epochs": 1,
        "optim": {"name": "adam", "lr": lr, "weight_decay": 0},
        "compute": {"precision": "fp32", "channels_last": False},
        **overrides,
    })


def trainer_for(config: MetaTrainConfig, seed: int = 0) -> ProtoNetTrainer:
    torch.manual_seed(seed)
    return ProtoNetTrainer(config, build_backbone(SPEC), SPEC, steps_per_epoch=config.episodes_per_epoch)


def validation_gain(lr: float, steps: int) -> tuple[float, float]:
    """(accuracy before, after) meta-training on 16 classes, scored on 60 fixed tasks of 8 held-out classes."""
    train, held_out = synthetic_images(0, 16, 20, seed=0), synthetic_images(16, 8, 20, seed=1)
    tasks = fixed_episodes(held_out.indices_by_class, 5, 1, 5, 60, seed=3)
    trainer = trainer_for(make_config(steps, lr))
    before, _ = trainer.validate(held_out, tasks)
    trainer.train_epoch(train, 0)
    after, _ = trainer.validate(held_out, tasks)
    return before, after


def test_metatraining_beats_the_untrained_backbone_on_held_out_classes():
    before, after = validation_gain(lr=1e-3, steps=60)
    assert after - before >= LEARNING_MARGIN, (before, after)


def test_the_learning_margin_is_not_reached_without_weight_updates():
    before, after = validation_gain(lr=1e-9, steps=40)
    assert after - before < LEARNING_MARGIN, (before, after)


def test_a_restored_trainer_takes_the_same_next_step():
    train = synthetic_images(0, 6, 8, seed=0)
    config = make_config(steps=3, lr=1e-3, epochs=2)
    first = trainer_for(config)
    first.train_epoch(train, 0)
    first.note_validation(0.5, 0)
    saved = copy.deepcopy(first.state_dict())  # what a checkpoint holds: the optimiser state moves on in place
    continued = first.train_epoch(train, 1)

    resumed = trainer_for(config, seed=1)  # other initial weights: everything must come from the state
    resumed.load_state_dict(saved, best_val_accuracy=0.5, best_epoch=0)
    again = resumed.train_epoch(train, 1)
    assert again["train_loss"] == pytest.approx(continued["train_loss"], rel=1e-5)
    for name, value in first.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value)
    assert resumed.best_epoch == 0 and resumed.best_state is not None


def test_the_best_weights_are_kept_and_a_worse_epoch_does_not_replace_them():
    trainer = trainer_for(make_config(steps=2, lr=1e-3))
    assert trainer.note_validation(0.6, epoch=0)
    kept = {k: v.clone() for k, v in trainer.best_state.items()}
    trainer.train_epoch(synthetic_images(0, 6, 8, seed=0), 0)
    assert not trainer.note_validation(0.4, epoch=1)
    assert (trainer.best_val_accuracy, trainer.best_epoch) == (0.6, 0)
    for name, value in kept.items():
        torch.testing.assert_close(trainer.best_state[name], value)
    changed = [name for name, value in trainer.model.state_dict().items()
               if value.dtype.is_floating_point and not torch.equal(value.cpu(), kept[name])]
    assert changed, "training did not change the live weights, so the test shows nothing"


def test_the_learning_rate_follows_the_schedule():
    trainer = trainer_for(make_config(steps=4, lr=1e-2, optim={"name": "sgd", "lr": 1e-2, "min_lr": 1e-4}))
    seen = []
    trainer.train_epoch(synthetic_images(0, 6, 8, seed=0), 0, on_step=lambda step, m: seen.append((step, m["lr"])))
    assert [step for step, _ in seen] == [0, 1, 2, 3]
    assert [lr for _, lr in seen] == pytest.approx([float(v) for v in trainer.schedule[:4]])
    assert seen[0][1] == pytest.approx(1e-2) and seen[-1][1] < seen[0][1]


def test_a_non_finite_loss_stops_training_with_the_step_named():
    trainer = trainer_for(make_config(steps=2, lr=1e-3))
    with torch.no_grad():
        next(trainer.model.backbone.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="at step 0"):
        trainer.train_epoch(synthetic_images(0, 6, 8, seed=0), 0)
