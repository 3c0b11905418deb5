"""Meta-test fine-tuning inside the caller's autocast region (issue 16): every forward pass sees the weights as
they are now, not autocast's cached bf16 copy from before the first step or from the task before."""

from __future__ import annotations

import pytest
import torch

from metallo_core.fewshot import finetune
from metallo_core.fewshot.finetune import FinetuneEngine, restored_afterwards
from tests.fewshot.test_finetune import NORMALIZER, pixels, protonet_task, random_task, seeded, tiny_protonet

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Adam at 1e-2 moves every conv weight of the tiny net by ~1e-2 per step: far more than bf16 rounding.
SETTINGS = pixels(steps=3, lr=1e-2, bn_mode="eval")


def bf16_region():
    """What `evaluation.engine_predictions` opens around a whole task (precision bf16, on the CPU)."""
    return torch.autocast("cpu", dtype=torch.bfloat16)


def embeddings_inside_and_after(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(before, inside, fresh): the tiny net's bf16 embedding of `images` before fine-tuning, then after
    fine-tuning computed in the same autocast region as the steps, and in a new region."""
    model = tiny_protonet().eval()
    task, _ = random_task()
    with bf16_region(), torch.no_grad():
        before = model.embed(NORMALIZER.normalize(images))
    with bf16_region():
        FinetuneEngine(model, SETTINGS, NORMALIZER).adapt(task.support, seeded())
        with torch.no_grad():
            inside = model.embed(NORMALIZER.normalize(images))
    with bf16_region(), torch.no_grad():  # a new region casts the current fp32 weights afresh
        fresh = model.embed(NORMALIZER.normalize(images))
    return before, inside, fresh


def test_forward_passes_in_the_callers_autocast_region_see_the_fine_tuned_weights():
    images = random_task(seed=3)[0].query
    before, inside, fresh = embeddings_inside_and_after(images)
    assert not torch.equal(fresh, before)  # fine-tuning changed the network, so the check below can tell
    assert torch.equal(inside, fresh)


def test_guard_without_forgetting_the_casts_the_region_keeps_the_old_weights(monkeypatch):
    """The check above fails when the cached casts are kept: torch reuses each weight's bf16 copy for the
    whole region (only BatchNorm's affine parameters, which autocast leaves in fp32, would really adapt)."""
    monkeypatch.setattr(finetune, "forget_autocast_casts", lambda: None)
    images = random_task(seed=3)[0].query
    before, inside, fresh = embeddings_inside_and_after(images)
    assert not torch.equal(inside, fresh)


@pytest.mark.parametrize("forget", [True, False], ids=["fixed", "guard-without-forgetting"])
def test_after_a_task_the_region_computes_with_the_restored_weights(forget, monkeypatch):
    """finetune_autolr fine-tunes once per lr candidate in one region: after each, the next forward must use
    the restored weights, not casts of the adapted ones made during the task."""
    if not forget:
        monkeypatch.setattr(finetune, "forget_autocast_casts", lambda: None)
    model = tiny_protonet()
    task, _ = random_task()
    with bf16_region():
        plain = protonet_task(model, task, normalizer=NORMALIZER)
    with bf16_region():
        with restored_afterwards(model), torch.no_grad():
            for parameter in model.backbone.parameters():
                parameter.add_(0.1)  # what an optimiser step does: in place
            shifted = protonet_task(model, task, normalizer=NORMALIZER)
        again = protonet_task(model, task, normalizer=NORMALIZER)
    assert not torch.equal(shifted, plain)
    assert torch.equal(again, plain) == forget
