"""DINO's k-NN learning curve on CPU: does pretraining make the teacher's features better than random?

Trains the Ray-free `DinoTrainer` on in-memory images and probes the teacher (eval mode, k-NN k=20,
T=0.07, half of each probe class as the bank, half as queries) after every epoch; epoch 0 is the
untrained network. Prints epoch, loss, k-NN accuracy and writes the curve as JSON.

Two data sets:
  synthetic  the few-shot micrograph generator (metallo_core/data/synthetic/fewshot.py): DINO trains on
             the train classes' images; the probe uses the held-out val classes (class-disjoint,
             as `knn.split: val` does in the quickstart and tiny_cpu.yaml).
  xsdd       X-SDD (/work/shared/data/x-sdd, 7 classes of real steel-surface images, 128 px): DINO
             trains on a per-class 70% of the images (no labels used); the probe uses the other 30%.

Settings are configs/pretrain/tiny_cpu.yaml's (the quickstart's) unless overridden with key=value.

  nice -n 10 uv run --frozen python benchmarks/dino_knn_curve.py --data synthetic --epochs 30 \
      --out /tmp/dino_curve_synthetic.json
  nice -n 10 uv run --frozen python benchmarks/dino_knn_curve.py --data xsdd --epochs 30 \
      --out /tmp/dino_curve_xsdd.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from metallo_core.config import apply_overrides, from_dict, read_yaml, to_dict
from metallo_core.data.images import IMAGE_SUFFIXES, square_resized
from metallo_core.data.synthetic.fewshot import fewshot_classes, render_images, split_classes
from metallo_core.ssl.config import DinoConfig
from metallo_core.ssl.learning_curve import dino_learning_curve

REPO = Path(__file__).resolve().parents[1]
XSDD = Path("/work/shared/data/x-sdd")


def synthetic_data(base_size: int, probe_size: int, *, classes: int, images_per_class: int,
                   seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train (N, B, B, 3), probe (M, P, P, 3), probe labels (M,)): train classes vs held-out val classes."""
    specs = fewshot_classes(classes, seed=seed)
    index_of = {spec.name: index for index, spec in enumerate(specs)}
    splits = split_classes(specs, seed=seed)

    def render(members, size):
        grey = np.concatenate([render_images(spec, index_of[spec.name], images_per_class, size=size, seed=seed)
                               for spec in members])
        return np.repeat(grey[..., None], 3, axis=-1)

    train = render(splits["train"], base_size)
    probe = np.stack([square_resized(image, probe_size) for image in render(splits["val"], base_size)])
    labels = np.repeat(np.arange(len(splits["val"])), images_per_class)
    return train, probe, labels


def xsdd_data(base_size: int, probe_size: int, *, root: Path, probe_fraction: float,
              seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """X-SDD split per class into DINO's unlabelled training images and the labelled probe images."""
    from PIL import Image

    if not root.is_dir():
        sys.exit(f"X-SDD not found at {root}; pass --xsdd-root")
    rng = np.random.default_rng(seed)
    train, probe, labels = [], [], []
    for label, folder in enumerate(sorted(p for p in root.iterdir() if p.is_dir())):
        files = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)  # JPEG and PNG
        pixels = [np.asarray(Image.open(path).convert("RGB")) for path in files]
        order = rng.permutation(len(pixels))
        cut = round(len(pixels) * probe_fraction)
        probe += [square_resized(pixels[i], probe_size) for i in order[:cut]]
        labels += [label] * cut
        train += [square_resized(pixels[i], base_size) for i in order[cut:]]
    return np.stack(train), np.stack(probe), np.array(labels)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=["synthetic", "xsdd"], default="synthetic")
    parser.add_argument("--config", default=str(REPO / "configs/pretrain/tiny_cpu.yaml"))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--probe-every", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classes", type=int, default=40, help="synthetic: classes generated (train+val+test)")
    parser.add_argument("--images-per-class", type=int, default=40, help="synthetic: images per class")
    parser.add_argument("--xsdd-root", type=Path, default=XSDD)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the curve")
    parser.add_argument("overrides", nargs="*", help="DinoConfig settings as key=value, e.g. optim.lr=0.001")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    raw = apply_overrides(read_yaml(args.config), [f"epochs={args.epochs}", f"seed={args.seed}", *args.overrides])
    raw.setdefault("data", {})["uri"] = f"memory:{args.data}"
    config = from_dict(DinoConfig, raw)
    started = time.perf_counter()
    if args.data == "synthetic":
        train, probe, labels = synthetic_data(config.base_size, config.multicrop.global_size, classes=args.classes,
                                              images_per_class=args.images_per_class, seed=args.seed)
    else:
        train, probe, labels = xsdd_data(config.base_size, config.multicrop.global_size, root=args.xsdd_root,
                                         probe_fraction=0.3, seed=args.seed)
    print(f"{args.data}: {len(train)} training images at {config.base_size} px, {len(probe)} probe images "
          f"of {labels.max() + 1} classes at {config.multicrop.global_size} px ({time.perf_counter() - started:.0f} s)")
    print(f"{'epoch':>5} {'loss':>8} {'knn_acc':>8} {'seconds':>8}", flush=True)

    def show(point):
        loss = "-" if point.loss is None else f"{point.loss:.4f}"
        print(f"{point.epoch:>5} {loss:>8} {point.knn_accuracy:>8.3f} {point.seconds:>8.0f}", flush=True)

    curve = dino_learning_curve(config, train, probe, labels, probe_every=args.probe_every, on_point=show)
    result = {"data": args.data, "command": " ".join(sys.argv), "config": to_dict(config),
              "train_images": len(train), "probe_images": len(probe), **curve.to_dict()}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
