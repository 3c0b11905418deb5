"""Decode cost per image in CPU seconds of one thread: the per-core rate a cluster plan needs.

CPU time (not wall time) is what each decoder spends, so the figure holds on a machine other
processes share. For each source kind it times, on the same encoded images:

- `pil`: `images.decode_resized` image by image (PIL decode, DCT draft for large JPEGs, PIL resize);
- `fast`: `batch_decode.decode_batch_resized` (torchvision libjpeg-turbo + torch uint8 resize);
- `fast, ingest --size`: the fast path on bytes re-encoded at ingest with the shorter side at `size`
  (what `metallo data ingest --size` stores): decode + centre crop only.

    uv run --frozen python benchmarks/decode_per_core.py --size 256 --images 200
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (width, height, what it stands for)
SOURCES = [(256, 256, "256 px JPEG (read_throughput's images)"),
           (500, 375, "500x375 JPEG (ImageNet-1k's typical image)")]


def textured_jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    coarse = rng.random((height // 8, width // 8, 3)).astype(np.float32)
    pixels = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC))
    noisy = np.clip(pixels + rng.normal(0, 12, pixels.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def cpu_seconds_per_image(fn, images: list[bytes], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        fn(images)
        best = min(best, time.process_time() - started)
    return best / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="decoded square size (DINO's base size is 256)")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64, help="images per fast-path call")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many passes")
    args = parser.parse_args()

    import torch

    from metallo_core.data.batch_decode import decode_batch_resized
    from metallo_core.data.images import decode_resized, resize_encoded

    torch.set_num_threads(1)  # one core: the figure is per core

    def pil(images):
        for data in images:
            decode_resized(data, args.size)

    def fast(images):
        for start in range(0, len(images), args.batch):
            decode_batch_resized(images[start:start + args.batch], args.size)

    print(f"CPU seconds of one thread per image, decoded to {args.size}x{args.size} (best of {args.repeats})")
    for width, height, label in SOURCES:
        images = [textured_jpeg(width, height, seed) for seed in range(args.images)]
        sized = [resize_encoded(data, args.size, "bench")[0] for data in images]
        mean_kb = sum(map(len, images)) / len(images) / 1024
        pil_s = cpu_seconds_per_image(pil, images, args.repeats)
        fast_s = cpu_seconds_per_image(fast, images, args.repeats)
        sized_s = cpu_seconds_per_image(fast, sized, args.repeats)
        print(f"{label}, {mean_kb:.0f} KB:")
        print(f"  pil                  {1e3 * pil_s:6.2f} ms  {1 / pil_s:6.0f} images/s per core")
        print(f"  fast                 {1e3 * fast_s:6.2f} ms  {1 / fast_s:6.0f} images/s per core  "
              f"({pil_s / fast_s:.2f}x pil)")
        print(f"  fast, ingest --size  {1e3 * sized_s:6.2f} ms  {1 / sized_s:6.0f} images/s per core  "
              f"({pil_s / sized_s:.2f}x pil)")


if __name__ == "__main__":
    main()
