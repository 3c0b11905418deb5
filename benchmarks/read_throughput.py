"""Shard read + decode throughput through Ray Data, against torchvision ImageFolder + DataLoader.

Both paths decode the same JPEG images to (size, size, 3) uint8 tensors (shorter side resized to
`size`, centre crop) on the same number of CPU processes, and are timed over whole epochs after a
warm-up epoch. Prints each path's images/s and the ratio (Ray Data / DataLoader) last.

    uv run python benchmarks/read_throughput.py --images 4000 --size 224 --workers 2
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_jpeg_folder(root: Path, images: int, classes: int, side: int, seed: int = 0) -> None:
    """Textured JPEGs in class folders (smooth noise, so they compress like micrographs, not like white noise)."""
    rng = np.random.default_rng(seed)
    per_class = images // classes
    for class_index in range(classes):
        folder = root / f"class_{class_index:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            coarse = rng.random((side // 8, side // 8, 3)).astype(np.float32)
            pixels = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((side, side), Image.BICUBIC))
            noisy = np.clip(pixels + rng.normal(0, 12, pixels.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(folder / f"{i:05d}.jpg", quality=90)


def time_dataloader(src: Path, size: int, workers: int, batch_size: int, epochs: int) -> float:
    import torch
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.PILToTensor()])
    dataset = datasets.ImageFolder(str(src), transform=transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=True
    )
    return _time_epochs(lambda: (len(images) for images, _ in loader), epochs)


def time_ray_data(uri: str, size: int, workers: int, batch_size: int, epochs: int) -> float:
    import ray

    from metallo_core.data.stream import DecodeImages, read_split

    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    dataset = read_split(uri, "train").map_batches(DecodeImages(size), batch_size=batch_size)

    def one_epoch():
        for batch in dataset.iter_torch_batches(batch_size=batch_size, prefetch_batches=4):
            yield len(batch["image"])

    try:
        return _time_epochs(one_epoch, epochs)
    finally:
        ray.shutdown()


def _time_epochs(epoch_fn, epochs: int) -> float:
    sum(epoch_fn())  # warm-up: worker start-up, file cache
    started, seen = time.perf_counter(), 0
    for _ in range(epochs):
        seen += sum(epoch_fn())
    return seen / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000, help="images to generate (ignored with --src)")
    parser.add_argument("--src", type=Path, default=None, help="an existing class-folder tree of images")
    parser.add_argument("--source-side", type=int, default=256, help="side of generated JPEGs")
    parser.add_argument("--size", type=int, default=224, help="decoded square size")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="CPU processes for each path")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs after one warm-up epoch")
    args = parser.parse_args()

    from metallo_core.data.ingest import IngestOptions, ingest

    with tempfile.TemporaryDirectory() as scratch:
        src = args.src or Path(scratch) / "images"
        if args.src is None:
            make_jpeg_folder(src, args.images, classes=10, side=args.source_side)
        uri = str(Path(scratch) / "shards")
        manifest = ingest("imagefolder", str(src), uri, IngestOptions())
        print(f"{manifest.num_images} images, {len(manifest.shards)} shard(s), size {args.size}, "
              f"{args.workers} worker process(es)")
        loader_rate = time_dataloader(src, args.size, args.workers, args.batch_size, args.epochs)
        print(f"torchvision ImageFolder + DataLoader: {loader_rate:.1f} images/s")
        ray_rate = time_ray_data(uri, args.size, args.workers, args.batch_size, args.epochs)
        print(f"metallo shards + Ray Data:            {ray_rate:.1f} images/s")
        print(f"ratio (Ray Data / DataLoader): {ray_rate / loader_rate:.2f}")


if __name__ == "__main__":
    main()
