"""The evaluation's actor pool: tasks scored in many small chunks, by whichever actor is idle, come back in
task order and equal to scoring every task in one process (per-task accuracies are paired across methods)."""

import numpy as np
import pytest
import torch

from metallo_core import tracking
from metallo_core.config import from_dict, to_dict
from metallo_core.fewshot.config import EvaluateConfig
from metallo_core.fewshot.episodes import episodes_to_json
from metallo_core.fewshot.evaluation import task_accuracy
from metallo_core.models.backbones import BackboneSpec
from metallo_core.train.evaluate import (
    ParallelScorer,
    TaskScorer,
    chunk_bounds,
    plan_tasks,
)
from tests.fewshot_fixtures import (
    TINY_SPEC,
    register_untrained_protonet,
    write_tiny_fewshot,
)


def test_chunks_cover_every_task_once_and_stay_small():
    for tasks, actors in [(1, 1), (12, 2), (600, 4), (601, 3), (5, 8)]:
        bounds = chunk_bounds(tasks, actors)
        assert [start for start, _ in bounds] == sorted(start for start, _ in bounds)
        assert [index for start, stop in bounds for index in range(start, stop)] == list(range(tasks))
        assert all(0 < stop - start <= 8 for start, stop in bounds)
    assert len(chunk_bounds(600, 4)) == 75  # progress every 8 tasks of 600


@pytest.mark.ray
def test_pool_returns_per_task_results_in_task_order_equal_to_one_serial_pass(tmp_path, ray_cluster, capfd):
    data_uri = write_tiny_fewshot(tmp_path)
    model_uri = register_untrained_protonet(from_dict(BackboneSpec, TINY_SPEC))
    config = from_dict(EvaluateConfig, {
        "model": model_uri,
        "data": {"uri": data_uri},
        "episodes": {"way": 3, "shot": 2, "query": 4},
        "tasks": 12,
        "finetune": {"steps": 3, "lr": 0.05, "bn_mode": "train"},
        "parallelism": 2,
        "precision": "fp32",
    })
    tasks, _ = plan_tasks(data_uri, config.split, config, config.tasks, seed=config.seed)
    settings = to_dict(config.finetune)
    assert len(chunk_bounds(len(tasks), config.parallelism)) == 12  # one task per chunk: order is all the pool's

    scorer = ParallelScorer(config, config.split, progress_every_s=0.0)
    try:
        pooled = {mode: scorer.predict(mode, tasks, settings, seed=3, lr=0.05)[0] for mode in ("protonet", "finetune")}
        accuracies, rate = scorer.score("finetune", tasks, settings, seed=3, lr=0.05)
        # Several inference settings on one adaptation per task: the plain one is the same as scored alone.
        by_inference, _ = scorer.predict_by_inference("finetune", tasks, settings, 3, 0.05,
                                                      [{}, {"transductive": "soft_kmeans", "power": 0.5}])
    finally:
        scorer.close()
    progress = capfd.readouterr().err
    assert "[evaluate finetune] 12/12" in progress and "ETA" in progress  # a line per chunk, then the total
    assert rate > 0

    threads = torch.get_num_threads()
    try:  # the same scorer class, in this process, every task in one call
        serial = TaskScorer(model_uri, data_uri, config.split, config.data.image_size, config.precision,
                            tracking.tracking_uri(), threads=1)
        tasks_json = episodes_to_json(tasks, {})
        for mode in ("protonet", "finetune"):
            expected = serial.predict(mode, tasks_json, settings, 3, 0.05)[0]
            assert [predicted.tolist() for predicted in pooled[mode]] == expected, mode
        transductive = serial.predict("finetune", tasks_json, settings, 3, 0.05, 0,
                                      [{"transductive": "soft_kmeans", "power": 0.5}])[0]
    finally:
        torch.set_num_threads(threads)
    assert accuracies == [task_accuracy(predicted, task) for predicted, task in zip(pooled["finetune"], tasks)]
    assert [predicted.tolist() for predicted in by_inference[0]] == [p.tolist() for p in pooled["finetune"]]
    assert [predicted.tolist() for predicted in by_inference[1]] == transductive
    assert len(set(accuracies)) > 1  # tasks differ, so a shuffled order could not pass
    assert all(isinstance(task, np.ndarray) and task.dtype == np.int64 for task in pooled["finetune"])
