"""End-to-end DINO training throughput in one process, through metallo's own data path.

Reads the images of DIR (a class-folder tree) by ingesting them into shards first (not timed), then
times training steps: shard read -> decode (threads ahead of the model on a CPU, nvJPEG on a GPU) \
-> multi-crop as tensor ops
(2 x 224 global, N x 96 local) -> student/teacher ResNet + DINO head -> loss -> optimiser -> EMA.
Mixed precision (bf16 autocast) and channels-last are part of the recipe on every device.

    uv run python benchmarks/dino_throughput.py --images DIR --arch resnet18 --batch-size 16 \
        --local-crops 6 --out-dim 4096 --steps 6

Prints `images/s: X` last (images of the dataset per second, every crop of each image included),
the figure shared/bench/ref_dino_bench.py prints for facebookresearch/dino's own loop.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metallo_core.config import from_dict
from metallo_core.data.ingest import IngestOptions, ingest
from metallo_core.data.local_stream import LocalBatchStream
from metallo_core.ssl.config import DinoConfig
from metallo_core.ssl.trainer import DinoTrainer


def benchmark_config(args: argparse.Namespace, uri: str) -> DinoConfig:
    return from_dict(DinoConfig, {
        "data": {"uri": uri, "base_size": args.base_size},
        "backbone": {"arch": args.arch, "image_size": args.global_size},
        "head": {"out_dim": args.out_dim},
        "multicrop": {"global_size": args.global_size, "local_size": args.local_size,
                      "local_crops": args.local_crops, "global_scale": [0.4, 1.0], "local_scale": [0.05, 0.4]},
        "optim": {"name": "adamw", "batch_size_per_worker": args.batch_size, "warmup_epochs": 0},
        "compute": {"precision": args.precision, "channels_last": not args.no_channels_last},
        "epochs": 1000,
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="class-folder tree of images")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--local-crops", type=int, default=6)
    parser.add_argument("--out-dim", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--base-size", type=int, default=256, help="decoded square size crops are cut from")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--decode-threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as scratch:
        uri = str(Path(scratch) / "shards")
        ingest("imagefolder", args.images, uri, IngestOptions())
        config = benchmark_config(args, uri)
        # On a GPU the JPEGs are decoded there too (nvJPEG), next to the multi-crop; on a CPU by threads.
        stream = LocalBatchStream(uri, "train", batch_size=args.batch_size, image_size=args.base_size,
                                  prefetch_batches=4, decode_threads=args.decode_threads, device=args.device)
        if len(stream) == 0:
            sys.exit(f"{args.images} holds fewer than one batch of {args.batch_size} images")
        trainer = DinoTrainer(config, steps_per_epoch=len(stream), world_size=1, rank=0,
                              device=torch.device(args.device))
        done, seen, started = 0, 0, None
        step_times = []
        while done < args.warmup + args.steps:
            for batch in stream:
                if done == args.warmup:
                    started, seen = time.perf_counter(), 0
                step_started = time.perf_counter()
                metrics = trainer.train_step(batch["image"], done, epoch=1)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                step_times.append(time.perf_counter() - step_started)
                done += 1
                seen += len(batch["image"])
                if done >= args.warmup + args.steps:
                    break
        elapsed = time.perf_counter() - started
        timed = step_times[args.warmup:]
        print(f"device {args.device}, {args.threads} thread(s), {args.arch}, batch {args.batch_size}, "
              f"2x{args.global_size} + {args.local_crops}x{args.local_size} crops, out_dim {args.out_dim}, "
              f"{args.precision}{'' if args.no_channels_last else ' channels-last'}")
        print(f"loss: {metrics['loss']:.4f}")
        print(f"mean step {sum(timed) / len(timed):.3f}s (model + augmentation; data waits are the rest)")
        print(f"images/s: {seen / elapsed:.3f}")


if __name__ == "__main__":
    main()
