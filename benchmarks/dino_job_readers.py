"""DINO through the pretraining job (Ray Train on a local cluster), one data reader against the other.

`benchmarks/read_throughput.py` times the readers alone and `benchmarks/dino_throughput.py` the training
step alone; this runs the real job (`train/dino.run_dino_pretraining`: Ray Train workers, checkpoints,
MLflow) on the same JPEG shards with each variant and reports its epoch throughput, the figure the job
logs as `epoch_images_per_s` (images of the dataset per second, all crops included), skipping the first
epoch (start-up, caches). Variants run interleaved, `--repeats` rounds, on one Ray cluster.

A variant is READER:WORKERS:CPUS, e.g. `stream:1:2` (workers decode their own row groups; 1 worker
holding 2 CPUs) or `ray_data:1:2` (Ray Data tasks decode on the cluster's CPUs). The local cluster
advertises twice the machine's cores (see `train/ray_setup.connect`), so Ray Data's tasks still find CPUs
while the worker holds its own: both readers share the same physical cores.

    uv run --frozen python benchmarks/dino_job_readers.py --images 1024 --variants stream:1:2,ray_data:1:2,stream:2:1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.read_throughput import make_jpeg_folder  # noqa: E402


def job_config(args: argparse.Namespace, uri: str, variant: str, name: str):
    from metallo_core.config import from_dict
    from metallo_core.ssl.config import DinoConfig

    reader, workers, cpus = variant.split(":")
    return from_dict(DinoConfig, {
        "data": {"uri": uri, "base_size": args.base_size, "reader": reader},
        "backbone": {"arch": args.arch, "image_size": args.global_size},
        "head": {"out_dim": args.out_dim},
        "multicrop": {"global_size": args.global_size, "local_size": args.local_size,
                      "local_crops": args.local_crops},
        "optim": {"batch_size_per_worker": args.batch_size // int(workers), "warmup_epochs": 0},
        "compute": {"num_workers": int(workers), "cpus_per_worker": float(cpus)},
        "registry": {"register": False},
        "run": {"name": name, "experiment": "bench-dino-job", "log_every_steps": 1000},
        "epochs": args.epochs,
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1024, help="JPEGs to generate")
    parser.add_argument("--source-side", type=int, default=160)
    parser.add_argument("--variants", default="stream:1:2,ray_data:1:2", help="comma-separated READER:WORKERS:CPUS")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=32, help="global batch (split over the workers)")
    parser.add_argument("--base-size", type=int, default=128)
    parser.add_argument("--global-size", type=int, default=112)
    parser.add_argument("--local-size", type=int, default=48)
    parser.add_argument("--local-crops", type=int, default=4)
    parser.add_argument("--out-dim", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=3, help="per job; the first is not counted")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.epochs < 2:
        sys.exit("--epochs must be >= 2: the first epoch is start-up and is not counted")
    variants = [variant for variant in args.variants.split(",") if variant]

    with tempfile.TemporaryDirectory() as scratch:
        os.environ["METALLO_HOME"] = str(Path(scratch) / "home")  # runs and checkpoints of this benchmark only
        from metallo_core import tracking
        from metallo_core.data.ingest import IngestOptions, ingest
        from metallo_core.train.dino import run_dino_pretraining

        src = Path(scratch) / "images"
        make_jpeg_folder(src, args.images, classes=10, side=args.source_side)
        uri = str(Path(scratch) / "shards")
        manifest = ingest("imagefolder", str(src), uri, IngestOptions())
        print(f"{manifest.num_images} JPEGs ({args.source_side} px) in {len(manifest.shards)} shard(s); {args.arch}, "
              f"global batch {args.batch_size}, 2x{args.global_size} + {args.local_crops}x{args.local_size} crops, "
              f"{args.epochs} epochs per job, {os.cpu_count()} CPUs", flush=True)
        rates: dict[str, list[float]] = {variant: [] for variant in variants}
        for round_index in range(args.repeats):
            for variant in variants:
                name = f"{variant.replace(':', '-')}-{round_index}"
                started = time.perf_counter()
                result = run_dino_pretraining(job_config(args, uri, variant, name))
                wall = time.perf_counter() - started
                history = tracking.client().get_metric_history(result.run_id, "epoch_images_per_s")
                warm = [metric.value for metric in sorted(history, key=lambda m: m.step)][1:]
                rates[variant].append(statistics.mean(warm))
                print(f"round {round_index + 1} {variant}: {rates[variant][-1]:.2f} images/s over epochs 2-"
                      f"{args.epochs}; job {wall:.0f} s; load average {os.getloadavg()[0]:.1f}", flush=True)
        baseline = variants[0]
        print(f"median epoch images/s (ratio to {baseline}):")
        for variant in variants:
            median = statistics.median(rates[variant])
            print(f"  {variant:14s} {median:7.2f}  ({median / statistics.median(rates[baseline]):.2f}x)")


if __name__ == "__main__":
    main()
