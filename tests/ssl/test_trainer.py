"""DinoTrainer without Ray: a step runs and updates what it should, resume is exact, failures are loud."""

import pytest
import torch

from metallo_core.config import from_dict
from metallo_core.ssl.config import DinoConfig
from metallo_core.ssl.trainer import DinoTrainer, steps_per_epoch
from metallo_core.train.checkpoints import CheckpointError, load_checkpoint, save_checkpoint

TINY = {
    "data": {"uri": "unused", "base_size": 20},
    "backbone": {"arch": "resnet18", "small_input": True, "image_size": 16},
    "head": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16},
    "multicrop": {"global_size": 16, "local_size": 8, "local_crops": 2, "micrograph": True},
    "optim": {"batch_size_per_worker": 4, "warmup_epochs": 0, "lr": 0.005, "freeze_last_layer_epochs": 1},
    "epochs": 4,
}


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic reductions, so resumed runs match bit for bit
    yield
    torch.set_num_threads(previous)


def make_trainer(**overrides):
    config = from_dict(DinoConfig, {**TINY, **overrides})
    return DinoTrainer(config, steps_per_epoch=3, world_size=1, rank=0, device=torch.device("cpu"))


def batches(count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (4, 20, 20, 3), dtype=torch.uint8, generator=generator) for _ in range(count)]


def test_step_updates_student_and_teacher_but_not_frozen_last_layer():
    trainer = make_trainer()
    student_before = [p.clone() for p in trainer.student_module.backbone.parameters()]
    teacher_before = [p.clone() for p in trainer.teacher.backbone.parameters()]
    last_layer_before = trainer.student_module.head.last_layer.weight_v.clone()
    metrics = trainer.train_step(batches(1)[0], step=0, epoch=0, with_health=True)
    assert set(metrics) >= {"loss", "lr", "weight_decay", "teacher_momentum", "teacher_temperature",
                            "teacher_entropy", "teacher_batch_entropy", "grad_norm"}
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(student_before, trainer.student_module.backbone.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(teacher_before, trainer.teacher.backbone.parameters()))
    assert torch.equal(last_layer_before, trainer.student_module.head.last_layer.weight_v)  # epoch 0: frozen
    trainer.train_step(batches(1)[0], step=3, epoch=1)
    assert not torch.equal(last_layer_before, trainer.student_module.head.last_layer.weight_v)
    assert trainer.center.center.abs().sum() > 0


def batchnorm_buffers(network):
    return {name: value.clone() for name, value in network.state_dict().items()
            if "running_" in name or "num_batches_tracked" in name}


@pytest.mark.parametrize("setting, frozen", [("auto", False), ("batch", False), ("frozen", True)])
def test_backbone_batchnorm_frozen_keeps_running_statistics_and_batch_moves_them(setting, frozen):
    trainer = make_trainer(backbone_batchnorm=setting)  # from scratch (backbone.source's default)
    assert trainer.config.freezes_backbone_batchnorm is frozen
    student_before = batchnorm_buffers(trainer.student_module.backbone)
    teacher_before = batchnorm_buffers(trainer.teacher.backbone)
    affine_before = trainer.student_module.backbone.bn1.weight.clone()
    trainer.train_step(batches(1)[0], step=0, epoch=0)
    for network, before in ((trainer.student_module.backbone, student_before),
                            (trainer.teacher.backbone, teacher_before)):
        after = batchnorm_buffers(network)
        unchanged = [name for name in before if torch.equal(before[name], after[name])]
        if frozen:
            assert len(unchanged) == len(before)
        else:  # the guard: train-mode BatchNorm does move them, so the frozen check can fail
            assert not unchanged
    # The affine weights train either way (lr 0.005, no warm-up).
    assert not torch.equal(affine_before, trainer.student_module.backbone.bn1.weight)


def test_backbone_batchnorm_auto_freezes_for_a_pretrained_start(tmp_path):
    from metallo_core.models.backbones import build_backbone

    spec = from_dict(DinoConfig, TINY).backbone.spec
    weights = tmp_path / "pretrained.pth"
    torch.save(build_backbone(spec).state_dict(), weights)
    pretrained = {**TINY, "backbone": {**TINY["backbone"], "source": str(weights)}}
    assert from_dict(DinoConfig, pretrained).freezes_backbone_batchnorm
    assert not from_dict(DinoConfig, {**pretrained, "backbone_batchnorm": "batch"}).freezes_backbone_batchnorm


def test_resume_from_a_checkpoint_is_exact(tmp_path):
    data = batches(4)
    straight = make_trainer()
    for step, images in enumerate(data[:2]):
        straight.train_step(images, step, epoch=step // 3)
    save_checkpoint(tmp_path / "ck", straight.state_dict(), {"epoch": 0, "global_step": 2})
    expected = [straight.train_step(images, step, epoch=1)["loss"] for step, images in enumerate(data[2:], start=2)]

    resumed = make_trainer()
    state, record = load_checkpoint(tmp_path / "ck")
    resumed.load_state_dict(state)
    assert record["global_step"] == 2
    got = [resumed.train_step(images, step, epoch=1)["loss"] for step, images in enumerate(data[2:], start=2)]
    assert got == expected
    for a, b in zip(straight.teacher.parameters(), resumed.teacher.parameters()):
        assert torch.equal(a, b)


def test_non_finite_loss_raises_with_step_and_metrics():
    trainer = make_trainer()
    trainer.train_step(batches(1)[0], 0, 0)
    with torch.no_grad():
        next(trainer.student_module.backbone.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"at step 1 \(epoch 0\); last metrics: \{'loss'"):
        trainer.train_step(batches(1)[0], 1, 0)


def test_tampered_or_truncated_checkpoint_is_refused(tmp_path):
    trainer = make_trainer()
    save_checkpoint(tmp_path / "ck", trainer.state_dict(), {"epoch": 0})
    state_file = tmp_path / "ck" / "state.pt"
    data = state_file.read_bytes()
    state_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or altered"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "checkpoint.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(tmp_path / "ck")


def test_steps_per_epoch_uses_each_workers_share():
    assert steps_per_epoch(100, 8, 2) == 6  # 50 images per worker, 6 whole batches
    with pytest.raises(ValueError, match="fewer than one batch"):
        steps_per_epoch(10, 8, 2)


@pytest.mark.parametrize(("override", "message"), [
    ({"backbone": {"arch": "resnet18", "image_size": 32}}, "must equal multicrop.global_size"),
    ({"loss": {"teacher_temperature": 0.5}}, "teacher_temperature"),
    ({"data": {"uri": ""}}, "data.uri is required"),
    ({"compute": {"precision": "fp16"}}, "fp16 needs a GPU"),
])
def test_config_mistakes_are_caught_before_training(override, message):
    with pytest.raises(Exception, match=message):
        from_dict(DinoConfig, {**TINY, **override})
