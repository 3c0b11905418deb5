"""`metallo classify` throughput: N query micrographs against a 5-way 5-shot support set, on CPU.

Registers a ProtoNet with a randomly initialised backbone (the weights do not change the cost) in a
throw-away MLflow store, writes the images, then times `classify` end to end and the embedding pass
alone (decode excluded), to show what bounds it.

    uv run python benchmarks/classify_throughput.py --arch resnet50 --queries 1000 --size 224
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--size", type=int, default=224, help="model input size")
    parser.add_argument("--image-size", type=int, default=512, help="side of the micrographs on disk")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="classify-bench-"))
    os.environ["METALLO_HOME"] = str(work / "home")
    import mlflow
    import torch

    from metallo_core import tracking
    from metallo_core.commands.classify_app import ClassifySettings, classify, load_tiles
    from metallo_core.fewshot.evaluation import embed_images
    from metallo_core.fewshot.protonet import ImageNormalizer, ProtoNet
    from metallo_core.models.backbones import BackboneSpec, build_backbone
    from metallo_core.tracking.backbone_store import log_backbone
    from metallo_core.tracking.protonet_store import load_protonet, protonet_metadata

    spec = BackboneSpec(arch=args.arch, image_size=args.size)
    model = ProtoNet(build_backbone(spec))
    tracking.configure()
    with mlflow.start_run() as run:
        pass
    log_backbone(run.info.run_id, model.backbone, spec, registered_name="bench-protonet", tags={}, alias="bench",
                 artifact_name="protonet", metadata=protonet_metadata(model))

    rng = np.random.default_rng(0)
    side = args.image_size
    for label in range(5):
        (work / "support" / f"class{label}").mkdir(parents=True)
        for shot in range(5):
            Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8)).save(
                work / "support" / f"class{label}" / f"{shot}.png")
    (work / "query").mkdir()
    for index in range(args.queries):
        Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8)).save(work / "query" / f"{index:05d}.png")

    started = time.perf_counter()
    result = classify("models:/bench-protonet@bench", work / "support", work / "query", work / "predictions.csv",
                      ClassifySettings(batch_size=args.batch_size))
    total = time.perf_counter() - started

    loaded, spec, _ = load_protonet("models:/bench-protonet@bench")
    files = sorted((work / "query").glob("*.png"))[: 4 * args.batch_size]
    tiles = load_tiles(files, spec.image_size, 0).tiles
    normalizer = ImageNormalizer.for_backbone(spec)
    embed_images(loaded, tiles[: args.batch_size], normalizer, torch.device("cpu"))  # warm-up
    started = time.perf_counter()
    embed_images(loaded, tiles, normalizer, torch.device("cpu"), batch_size=args.batch_size)
    embedding_rate = len(tiles) / (time.perf_counter() - started)
    print(f"{args.arch} @ {args.size}px, {args.queries} queries of {side}px, torch threads {torch.get_num_threads()}")
    print(f"embedding only (bf16 autocast): {embedding_rate:.1f} images/s")
    print(f"classify end to end (incl. model download, support, decode, CSV): {args.queries / total:.1f} images/s "
          f"({total:.1f} s); query loop {result.query_images_per_s:.1f} images/s")


if __name__ == "__main__":
    main()
