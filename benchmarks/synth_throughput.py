"""Throughput of the built-in synthetic generators on this machine, in images per second.

    uv run python benchmarks/synth_throughput.py --kind nfurcated|fewshot --size 84 --images 2000
"""

from __future__ import annotations

import argparse
import itertools
import math
import time

import numpy as np

from metallo_core.data.synthetic import fewshot_classes, nfurcated_batches, render_images

FEWSHOT_IMAGES_PER_CALL = 32


def time_nfurcated(size: int, images: int, seed: int) -> int:
    combinations = 70
    batches = nfurcated_batches(images_per_combination=math.ceil(images / combinations), size=size, seed=seed)
    rendered = 0
    for batch in batches:
        rendered += len(batch.images)
        if rendered >= images:
            break
    return rendered


def time_fewshot(size: int, images: int, seed: int) -> int:
    """Cycles over all classes (so every family counts), FEWSHOT_IMAGES_PER_CALL images per call."""
    classes = fewshot_classes(seed=seed)
    rendered = 0
    for class_index in itertools.cycle(range(len(classes))):
        count = min(FEWSHOT_IMAGES_PER_CALL, images - rendered)
        rendered += len(render_images(classes[class_index], class_index, count, size=size, seed=seed))
        if rendered >= images:
            return rendered
    raise AssertionError("unreachable")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=("nfurcated", "fewshot"), required=True)
    parser.add_argument("--size", type=int, default=84)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    generate = time_nfurcated if args.kind == "nfurcated" else time_fewshot
    started = time.perf_counter()
    rendered = generate(args.size, args.images, args.seed)
    seconds = time.perf_counter() - started
    print(f"kind: {args.kind}  size: {args.size}  images: {rendered}  seconds: {seconds:.2f}  numpy: {np.__version__}")
    print(f"images/s: {rendered / seconds:.1f}")


if __name__ == "__main__":
    main()
