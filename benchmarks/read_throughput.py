"""Shard read + decode + resize into training batches, against torchvision ImageFolder + DataLoader.

Every path turns the same JPEG images into (batch, size, size, 3) uint8 batches (shorter side resized to
`size`, centre crop) with the same number of CPU workers (processes for the DataLoader and Ray, decode
threads for the row-group stream), timed over whole epochs after a warm-up epoch. The paths run
interleaved, `--repeats` rounds of each, so load from other processes hits them alike; the ratios to
the DataLoader are printed per round and as medians at the end.

- `dataloader`: torchvision ImageFolder + DataLoader (PIL decode + Resize + CenterCrop), the baseline;
- `stream`: metallo's per-worker row-group stream (`local_stream.LocalBatchStream`) with the batched
  fast decode (`batch_decode`: torchvision libjpeg-turbo + torch uint8 antialiased resize);
- `stream-pil`: the same stream decoding image by image with PIL (the careful path), to show what the
  decoder alone is worth;
- `ray`: Ray Data (`stream.decoded_split`: Arrow batches, batched decode, iter_torch_batches prefetch);
- `stream-ingest-size`: the stream over shards ingested with `--size` (images stored at the training
  size: decode only, no resize), only with --ingest-size.

    uv run --frozen python benchmarks/read_throughput.py --images 8000 --size 224 --workers 2
"""

from __future__ import annotations

import argparse
import os
import statistics
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


def dataloader_epochs(src: Path, size: int, workers: int, batch_size: int):
    """A function running one epoch of ImageFolder + DataLoader, returning the images it produced."""
    import torch
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.PILToTensor()])
    dataset = datasets.ImageFolder(str(src), transform=transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=True
    )
    return lambda: sum(len(images) for images, _ in loader)


def stream_epochs(uri: str, size: int, workers: int, batch_size: int, careful: bool = False):
    import torch

    from metallo_core.data.images import decode_resized
    from metallo_core.data.local_stream import LocalBatchStream

    class PilStream(LocalBatchStream):
        def _decode(self, images):
            return torch.from_numpy(np.stack([decode_resized(view.tobytes(), self.image_size) for view in images]))

    kind = PilStream if careful else LocalBatchStream
    stream = kind(uri, "train", batch_size=batch_size, image_size=size, decode_threads=workers, prefetch_batches=4)
    return lambda: sum(len(batch["image"]) for batch in stream)


def ray_epochs(uri: str, size: int, workers: int, batch_size: int):
    # A loaded 2-core machine can take longer than Ray's default 60 s to bring up a raylet.
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "300")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from metallo_core.data.stream import decoded_split

    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    dataset = decoded_split(uri, "train", size)
    return lambda: sum(len(batch["image"]) for batch in dataset.iter_torch_batches(
        batch_size=batch_size, prefetch_batches=4, drop_last=True))


def timed_rate(epoch_fn, epochs: int) -> float:
    started, seen = time.perf_counter(), 0
    for _ in range(epochs):
        seen += epoch_fn()
    return seen / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000, help="images to generate (ignored with --src)")
    parser.add_argument("--src", type=Path, default=None, help="an existing class-folder tree of images")
    parser.add_argument("--source-side", type=int, default=256, help="side of generated JPEGs")
    parser.add_argument("--size", type=int, default=224, help="decoded square size")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="CPU workers for each path")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs per path per round")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--paths", default="dataloader,stream,stream-pil,ray",
                        help="comma-separated: dataloader,stream,stream-pil,ray")
    parser.add_argument("--ingest-size", action="store_true",
                        help="also time the stream over shards ingested with --size SIZE (decode only, no resize)")
    args = parser.parse_args()

    import torch

    from metallo_core.data.ingest import IngestOptions, ingest

    # One intra-op thread per decode thread: the workers are the parallelism being compared.
    torch.set_num_threads(1)
    paths = [name for name in args.paths.split(",") if name]
    if "dataloader" not in paths:
        sys.exit("--paths must include dataloader (the baseline the ratios are taken against)")
    with tempfile.TemporaryDirectory() as scratch:
        src = args.src or Path(scratch) / "images"
        if args.src is None:
            make_jpeg_folder(src, args.images, classes=10, side=args.source_side)
        uri = str(Path(scratch) / "shards")
        manifest = ingest("imagefolder", str(src), uri, IngestOptions())
        runners = {
            "dataloader": lambda: dataloader_epochs(src, args.size, args.workers, args.batch_size),
            "stream": lambda: stream_epochs(uri, args.size, args.workers, args.batch_size),
            "stream-pil": lambda: stream_epochs(uri, args.size, args.workers, args.batch_size, careful=True),
            "ray": lambda: ray_epochs(uri, args.size, args.workers, args.batch_size),
        }
        if args.ingest_size:
            sized_uri = str(Path(scratch) / "shards-sized")
            ingest("imagefolder", str(src), sized_uri, IngestOptions(size=args.size))
            runners["stream-ingest-size"] = lambda: stream_epochs(sized_uri, args.size, args.workers, args.batch_size)
            paths.append("stream-ingest-size")
        print(f"{manifest.num_images} images ({manifest.image_encoding}, {args.source_side} px), "
              f"{len(manifest.shards)} shard(s), size {args.size}, {args.workers} worker(s), batch {args.batch_size}, "
              f"{args.repeats} interleaved round(s) of {args.epochs} epoch(s); load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
        epoch_fns = {}
        for name in list(paths):
            try:
                epoch_fns[name] = runners[name]()
            except Exception as exc:
                if name != "ray":
                    raise
                print(f"ray: not measured, Ray did not start ({str(exc).splitlines()[0]})", flush=True)
                paths.remove(name)
                continue
            epoch_fns[name]()  # warm-up: worker start-up, file cache, imports
        rates: dict[str, list[float]] = {name: [] for name in paths}
        for round_index in range(args.repeats):
            for name in paths:
                rates[name].append(timed_rate(epoch_fns[name], args.epochs))
            line = ", ".join(f"{name} {rates[name][-1]:.0f}/s ({rates[name][-1] / rates['dataloader'][-1]:.2f}x)"
                             for name in paths)
            print(f"round {round_index + 1}: {line}; load average {os.getloadavg()[0]:.1f}", flush=True)
        print("median images/s and ratio to ImageFolder + DataLoader:")
        for name in paths:
            ratios = [rate / base for rate, base in zip(rates[name], rates["dataloader"])]
            print(f"  {name:20s} {statistics.median(rates[name]):8.1f} images/s  "
                  f"ratio {statistics.median(ratios):.2f}x (per round {', '.join(f'{r:.2f}' for r in ratios)})")
        if "ray" in paths:
            import ray

            ray.shutdown()


if __name__ == "__main__":
    main()
