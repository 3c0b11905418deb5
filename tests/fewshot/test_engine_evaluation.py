"""Scoring many tasks through the engine (what `metallo evaluate`'s actors and the searches run, without Ray):
the split is prepared once, any chunking of the task list gives the same predictions, and ProtoNet equals
fine-tuning at lr 0."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metallo_core import tracking
from metallo_core.config import from_dict, to_dict
from metallo_core.fewshot.config import EvaluateConfig
from metallo_core.fewshot.episodes import episodes_to_json, fixed_episodes
from metallo_core.fewshot.evaluation import PreparedImages, engine_predictions
from metallo_core.fewshot.finetune import FinetuneEngine, FinetuneSettings
from metallo_core.models.backbones import BackboneSpec
from tests.fewshot.test_finetune import NORMALIZER
from tests.fewshot.test_finetune_engine import small_resnet_protonet
from tests.fewshot_fixtures import TINY_SPEC, register_untrained_protonet, write_tiny_fewshot

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("form", ["trunk_maps", "pixels"])
def test_chunks_in_any_order_predict_as_one_pass_on_a_split_prepared_once(form):
    images = np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(4), 6)
    episodes = fixed_episodes([np.flatnonzero(labels == c) for c in range(4)], 3, 2, 2, 6, seed=0)
    engine = FinetuneEngine(small_resnet_protonet(), FinetuneSettings(pseudo_queries=form, update="last_stage",
                                                                      steps=2, lr=1e-2), NORMALIZER)
    calls = []
    prepare = engine.prepare
    engine.prepare = lambda images, *args: calls.append(len(images)) or prepare(images, *args)  # type: ignore
    prepared = PreparedImages(engine, images, precision="fp32")
    prepared_calls = list(calls)

    whole = engine_predictions(engine, prepared, episodes, "finetune", seed=3, precision="fp32")
    chunked = {start: engine_predictions(engine, prepared, episodes[start:start + 2], "finetune", seed=3,
                                         precision="fp32", first_task=start) for start in (4, 0, 2)}
    assert [task.tolist() for task in whole] == [task.tolist() for start in (0, 2, 4) for task in chunked[start]]
    assert calls == prepared_calls == ([24] if form == "trunk_maps" else [])  # every task indexes the one cache

    plain = engine_predictions(engine, prepared, episodes, "protonet", seed=3, precision="fp32")
    at_lr_zero = engine_predictions(engine, prepared, episodes, "finetune", seed=3, lr=0.0, precision="fp32")
    assert [task.tolist() for task in plain] == [task.tolist() for task in at_lr_zero]
    assert [task.tolist() for task in plain] != [task.tolist() for task in whole]  # fine-tuning changed some
    other_cache = engine.with_settings(pseudo_queries="trunk_maps", cache_stage=2)
    with pytest.raises(ValueError, match="images prepared for"):
        engine_predictions(other_cache, prepared, episodes, "protonet", seed=3)


def test_the_evaluation_actor_prepares_its_split_once_and_chunks_do_not_matter(tmp_path):
    from metallo_core.train.evaluate import TaskScorer, plan_tasks

    data_uri = write_tiny_fewshot(tmp_path)
    model_uri = register_untrained_protonet(from_dict(BackboneSpec, TINY_SPEC))
    config = from_dict(EvaluateConfig, {"model": model_uri, "data": {"uri": data_uri},
                                        "episodes": {"way": 3, "shot": 2, "query": 3},
                                        "finetune": {"steps": 2, "lr": 0.05, "bn_mode": "train"}})
    tasks, _ = plan_tasks(data_uri, config.split, config, 6, seed=0)
    settings = to_dict(config.finetune)
    threads = torch.get_num_threads()
    try:
        scorer = TaskScorer(model_uri, data_uri, config.split, 0, "fp32", tracking.tracking_uri(), threads=1)
        [whole] = scorer.predict("finetune", episodes_to_json(tasks, {}), settings, 3, 0.05)
        [prepared] = scorer.prepared.values()
        chunked = [task for start in (0, 3) for task in scorer.predict(
            "finetune", episodes_to_json(tasks[start:start + 3], {}), settings, 3, 0.05, first_task=start)[0]]
        [plain] = scorer.predict("protonet", episodes_to_json(tasks, {}), settings, 3, None)
        [again] = scorer.prepared.values()
    finally:
        torch.set_num_threads(threads)
    assert whole == chunked
    assert again is prepared  # the same trunk maps served every call
    assert len(plain) == len(whole) == 6
