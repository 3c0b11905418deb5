"""DINO's pieces checked against independent re-derivations: loss, centre, schedules, EMA, head, k-NN."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metallo_core.ssl.ema import update_teacher
from metallo_core.ssl.head import DINOHead
from metallo_core.ssl.health import collapse_warning, teacher_output_stats
from metallo_core.ssl.knn import knn_accuracy, knn_predict, split_bank_and_queries
from metallo_core.ssl.loss import TeacherCenter, dino_loss
from metallo_core.ssl.schedules import cosine_schedule, dino_schedules


def official_dino_loss(student_output, teacher_output, center, student_temp, teacher_temp, n_crops):
    """The formula of facebookresearch/dino's DINOLoss.forward, re-derived as explicit loops."""
    student_chunks = (student_output / student_temp).chunk(n_crops)
    teacher_chunks = F.softmax((teacher_output - center) / teacher_temp, dim=-1).chunk(2)
    total, terms = 0.0, 0
    for teacher_view, q in enumerate(teacher_chunks):
        for student_view in range(n_crops):
            if student_view == teacher_view:
                continue
            loss = torch.sum(-q * F.log_softmax(student_chunks[student_view], dim=-1), dim=-1)
            total += loss.mean()
            terms += 1
    return total / terms


@pytest.mark.parametrize("local_crops", [0, 1, 6])
def test_loss_matches_the_official_formula(local_crops):
    torch.manual_seed(local_crops)
    batch, out_dim, n_crops = 5, 64, 2 + local_crops
    student = torch.randn(n_crops * batch, out_dim)
    teacher = torch.randn(2 * batch, out_dim)
    center = torch.randn(1, out_dim) * 0.1
    ours = dino_loss(student, teacher, center, student_temperature=0.1, teacher_temperature=0.04)
    expected = official_dino_loss(student, teacher, center, 0.1, 0.04, n_crops)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_loss_gradient_flows_to_student_only():
    student = torch.randn(8, 16, requires_grad=True)
    teacher = torch.randn(4, 16, requires_grad=True)
    dino_loss(student, teacher, torch.zeros(1, 16), student_temperature=0.1, teacher_temperature=0.04).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_uniform_outputs_give_ln_out_dim():
    out_dim = 4096
    loss = dino_loss(torch.zeros(8, out_dim), torch.zeros(4, out_dim), torch.zeros(1, out_dim),
                     student_temperature=0.1, teacher_temperature=0.04)
    assert loss.item() == pytest.approx(math.log(out_dim), rel=1e-4)


def test_center_is_an_ema_of_the_batch_mean():
    center = TeacherCenter(out_dim=3, momentum=0.9)
    first = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    center.update(first)
    torch.testing.assert_close(center.center, 0.1 * first.mean(0, keepdim=True))
    second = torch.tensor([[10.0, 0.0, 0.0]])
    center.update(second)
    torch.testing.assert_close(center.center, 0.9 * 0.1 * first.mean(0, keepdim=True) + 0.1 * second)


def test_cosine_schedule_values_at_known_steps():
    schedule = cosine_schedule(1.0, 0.0, epochs=10, steps_per_epoch=10, warmup_epochs=2, warmup_start_value=0.0)
    assert len(schedule) == 100
    assert schedule[0] == 0.0
    assert schedule[10] == pytest.approx(0.5)  # half-way through the linear warm-up
    assert schedule[20] == pytest.approx(1.0)  # warm-up ends at the base value
    assert schedule[60] == pytest.approx(0.5)  # half-way through the cosine
    assert schedule[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 79 / 80)))
    assert np.all(np.diff(schedule[20:]) <= 0)


def test_dino_schedules():
    schedules = dino_schedules(epochs=4, steps_per_epoch=5, total_batch_size=512, base_lr=5e-4, min_lr=1e-6,
                               warmup_epochs=1, weight_decay=0.04, weight_decay_end=0.4, momentum_teacher=0.996,
                               teacher_temperature=0.07, warmup_teacher_temperature=0.04,
                               warmup_teacher_temperature_epochs=2)
    assert schedules.total_steps == 20
    assert schedules.learning_rate[5] == pytest.approx(5e-4 * 512 / 256)  # scaled by total batch / 256
    assert schedules.weight_decay[0] == pytest.approx(0.04)
    assert schedules.weight_decay[10] == pytest.approx(0.04 + 0.5 * (0.4 - 0.04))
    assert schedules.teacher_momentum[0] == pytest.approx(0.996)
    assert schedules.teacher_momentum[-1] > 0.9999
    assert schedules.teacher_temperature[0] == pytest.approx(0.04)
    assert schedules.teacher_temperature[5] == pytest.approx(0.04 + 0.5 * 0.03)
    assert schedules.teacher_temperature[10:].tolist() == [0.07] * 10
    assert schedules.at(7)["lr"] == schedules.learning_rate[7]


def test_ema_update():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    teacher = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    student(torch.randn(8, 3))  # the student's BN running statistics move; the teacher's do not
    student_state = {name: value.clone() for name, value in student.state_dict().items()}
    before = [p.clone() for p in teacher.parameters()]
    update_teacher(student, teacher, momentum=0.75)
    for old, new, source in zip(before, teacher.parameters(), student.parameters()):
        torch.testing.assert_close(new, 0.75 * old + 0.25 * source)

    # Momentum 1 keeps the teacher exactly, although it still differs from the student (so a teacher
    # overwritten by the student would fail here).
    kept = [p.clone() for p in teacher.parameters()]
    update_teacher(student, teacher, momentum=1.0)
    for old, new in zip(kept, teacher.parameters()):
        assert torch.equal(new, old)
    assert not torch.equal(teacher[0].weight, student[0].weight)
    # Momentum 0 copies the student; buffers (BN statistics) are never averaged.
    update_teacher(student, teacher, momentum=0.0)
    for new, source in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(new, source)
    assert torch.equal(teacher[1].running_mean, torch.zeros(2)) and not torch.equal(
        student[1].running_mean, torch.zeros(2))
    # The student is read, never written.
    for name, value in student.state_dict().items():
        assert torch.equal(value, student_state[name]), name
    assert all(p.requires_grad for p in student.parameters())


def test_head_shapes_normalisation_and_frozen_gain():
    head = DINOHead(32, out_dim=100, hidden_dim=64, bottleneck_dim=16, norm_last_layer=True)
    output = head(torch.randn(4, 32))
    assert output.shape == (4, 100)
    assert not head.last_layer.weight_g.requires_grad
    # With g = 1 every output unit is a dot product of two unit vectors.
    assert output.abs().max() <= 1.0 + 1e-5
    trainable = DINOHead(32, out_dim=100, hidden_dim=64, bottleneck_dim=16, norm_last_layer=False, use_bn=True)
    assert trainable.last_layer.weight_g.requires_grad


def test_weight_norm_matches_torch_weight_norm():
    head = DINOHead(8, out_dim=10, hidden_dim=16, bottleneck_dim=4)
    reference = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(4, 10, bias=False))
    reference.parametrizations.weight.original0.data.fill_(1.0)
    reference.parametrizations.weight.original1.data.copy_(head.last_layer.weight_v.data)
    features = torch.randn(3, 4)
    torch.testing.assert_close(head.last_layer(features), reference(features))


def test_last_layer_stays_frozen_when_gradients_are_cancelled():
    head = DINOHead(8, out_dim=10, hidden_dim=16, bottleneck_dim=4)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    last_before = head.last_layer.weight_v.clone()
    mlp_before = head.mlp[0].weight.clone()
    head(torch.randn(5, 8)).pow(2).sum().backward()
    head.cancel_last_layer_gradients()
    optimizer.step()
    torch.testing.assert_close(head.last_layer.weight_v, last_before)
    assert not torch.equal(head.mlp[0].weight, mlp_before)


def test_knn_probe():
    torch.manual_seed(0)
    centres = torch.randn(4, 16) * 3
    labels = torch.arange(4).repeat_interleave(25)
    features = centres[labels] + torch.randn(100, 16)
    bank, queries = split_bank_and_queries(labels, 0.4, seed=0)
    assert set(bank.tolist()).isdisjoint(queries.tolist()) and len(bank) + len(queries) == 100
    accuracy = knn_accuracy(features[bank], labels[bank], features[queries], labels[queries], 4)
    assert accuracy > 0.9
    random_accuracy = knn_accuracy(torch.randn(60, 16), labels[bank], torch.randn(40, 16), labels[queries], 4)
    assert random_accuracy < 0.6
    # One neighbour at similarity 1 outvotes many weaker ones through exp(sim / T).
    bank_features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0], [0.2, 1.0]])
    predicted = knn_predict(bank_features, torch.tensor([0, 1, 1, 1]), torch.tensor([[1.0, 0.05]]), 2, k=4)
    assert predicted.tolist() == [0]


def test_collapse_detection():
    out_dim = 1024
    uniform = teacher_output_stats(torch.zeros(16, out_dim), torch.zeros(1, out_dim), 0.04)
    assert "uniform" in collapse_warning(math.log(out_dim), **uniform, out_dim=out_dim)
    same_unit = torch.zeros(16, out_dim)
    same_unit[:, 3] = 10.0
    stats = teacher_output_stats(same_unit, torch.zeros(1, out_dim), 0.04)
    assert "few output units" in collapse_warning(1.0, **stats, out_dim=out_dim)
    healthy = torch.zeros(16, out_dim)
    healthy[torch.arange(16), torch.arange(16) * 7] = 10.0
    assert collapse_warning(3.0, **teacher_output_stats(healthy, torch.zeros(1, out_dim), 0.04),
                            out_dim=out_dim) is None
