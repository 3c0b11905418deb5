"""`metallo quickstart` end to end on the session's Ray, at toy sizes on real X-SDD images: every stage runs
(DINO and meta-training on Ray Train, evaluation in Ray actors), each is judged on the selection tasks, the
model classify uses is registered under @quickstart with its fine-tuning settings and a description, and the
runs name the datasets they read (the test pool by the evaluation alone)."""

from __future__ import annotations

import shutil

import pytest

from metallo_core import tracking
from metallo_core.data.listing import list_folder
from metallo_core.datasets import xsdd_images

pytestmark = pytest.mark.ray

TOY = [
    "image_size=64", "pools.fractions=[0.25,0.25,0.5]",
    "base.classes=40", "base.images_per_class=6",
    "gate.query=2", "gate.tasks=6",
    "pretrain.epochs=1", "pretrain.optim.batch_size_per_worker=8", "pretrain.multicrop.local_crops=2",
    "pretrain.head.out_dim=256", "pretrain.head.hidden_dim=64", "pretrain.head.bottleneck_dim=32",
    "metatrain.epochs=1", "metatrain.episodes_per_epoch=2", "metatrain.val_episodes=2",
    "metatrain.episodes.shot=1", "metatrain.episodes.query=2",
    "evaluate.tasks=6", "evaluate.select_tasks=4", "evaluate.episodes.query=4", "evaluate.finetune.steps=2",
]


@pytest.fixture(scope="module")
def toy_xsdd(tmp_path_factory):
    """12 real X-SDD images of each of 5 classes (pools of 3 / 3 / 6 per class)."""
    root = tmp_path_factory.mktemp("xsdd-toy")
    groups, _ = list_folder(xsdd_images()).by_top_folder()
    for name in sorted(groups)[:5]:
        (root / name).mkdir()
        for relative in groups[name][:12]:
            shutil.copy(xsdd_images() / relative, root / name)
    return root


def test_quickstart_runs_the_gated_chain_and_registers_what_classify_uses(ray_cluster, toy_xsdd):
    from metallo_core.config import to_dict
    from metallo_core.fewshot.inference import InferenceSettings
    from metallo_core.quickstart import describe, run_quickstart
    from metallo_core.tracking.finetune_choice import recorded_for_model
    from metallo_core.tracking.registry import resolve_version

    result = run_quickstart(TOY, images=str(toy_xsdd), tag="toy")

    assert [stage["stage"] for stage in result.stages][:3] == ["start", "pretrain", "metatrain"]
    # The chain started from the network the selection tasks chose: the registered start is that network.
    from metallo_core.models.sources import offline_imagenet_spec

    assert resolve_version(result.models["start"]).tags["metallo.arch"] == offline_imagenet_spec(64, result.start).arch
    assert all(isinstance(stage["kept"], bool) and stage["reason"] for stage in result.stages)
    assert "| stage |" in result.stage_table
    version = resolve_version("models:/metallo-protonet@quickstart")
    assert result.models["protonet"].endswith(f"/{version.version}")
    assert "metallo classify --model models:/metallo-protonet@quickstart" in version.description
    assert "Test pool (6 tasks no stage saw)" in version.description
    recorded = recorded_for_model("models:/metallo-protonet@quickstart")
    assert recorded.settings.pseudo_queries == "trunk_maps"  # the engine's cached-trunk form, as evaluated
    levers_chosen = result.inference != to_dict(InferenceSettings())  # chosen on the toy selection tasks
    with_levers = {"finetune - finetune_plain", "finetune - protonet_plain"} if levers_chosen else set()
    assert set(result.test["gains"]) == {"protonet - imagenet_protonet", "finetune - imagenet_protonet",
                                         "finetune - protonet"} | with_levers
    assert ("finetune_plain" in result.test) == levers_chosen  # the same model scored plain, beside the levers
    assert "30 images of 5 classes" in result.pools["test"]  # 6 per class, used by the evaluation alone

    client = tracking.client()
    splits = {}
    for stage, run_id in result.runs.items():
        inputs = client.get_run(run_id).inputs.dataset_inputs
        splits[stage] = sorted(tag.value for entry in inputs for tag in entry.tags if tag.key == "split")
    assert splits["pretrain"] == ["train"]  # DINO saw the unlabelled pool only
    assert "test" not in splits["metatrain"] and "test" in splits["evaluate"]
    assert "registered model as classify runs it" in describe(result)
