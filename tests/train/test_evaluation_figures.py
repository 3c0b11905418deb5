"""An evaluation run on Ray carries its pictures: a confusion heatmap per meta-test mode, as a PNG next to the
confusion JSON, so the MLflow run page shows the matrix and not only numbers."""


import numpy as np
import pytest
from PIL import Image

from metallo_core import tracking
from metallo_core.config import from_dict
from metallo_core.fewshot.config import EvaluateConfig
from metallo_core.models.backbones import BackboneSpec
from metallo_core.train.evaluate import run_evaluation
from tests.fewshot_fixtures import TINY_SPEC, register_untrained_protonet, write_tiny_fewshot

pytestmark = pytest.mark.ray


def test_an_evaluation_run_logs_a_confusion_heatmap_per_mode(ray_cluster, tmp_path):
    data = write_tiny_fewshot(tmp_path)
    model = register_untrained_protonet(from_dict(BackboneSpec, TINY_SPEC))
    evaluation = run_evaluation(from_dict(EvaluateConfig, {
        "model": model,
        "data": {"uri": data},
        "episodes": {"way": 5, "shot": 1, "query": 5},
        "tasks": 8,
        "modes": ["protonet"],
        "parallelism": 1,
    }))
    client = tracking.client()
    logged = {item.path: item.file_size for item in client.list_artifacts(evaluation.run_id, "confusion")}
    assert set(logged) == {"confusion/protonet.json", "confusion/protonet.png"}
    assert logged["confusion/protonet.png"] > 10_000  # a drawn chart, not an empty canvas
    image = Image.open(client.download_artifacts(evaluation.run_id, "confusion/protonet.png")).convert("RGB")
    assert min(image.size) > 300
    pixels = np.asarray(image).reshape(-1, 3).astype(int)
    red, green, blue = pixels[:, 0], pixels[:, 1], pixels[:, 2]
    # green right answers on the diagonal and red confusions off it (an untrained model makes plenty of both)
    assert ((green > red + 30) & (green > blue + 30)).mean() > 0.005
    assert ((red > green + 60) & (red > blue + 60)).mean() > 0.005
