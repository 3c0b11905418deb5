"""DINO multi-crop throughput in base images per second: batched tensor ops (CPU, CUDA) vs PIL per image.

    uv run python benchmarks/augment_throughput.py --batch-size 32 --base-size 256 --global-size 224 \\
        --local-size 96 --local-crops 6 [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections.abc import Callable

import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

from metallo_core.ssl.multicrop import MultiCropAugment, MultiCropConfig


class PilGaussianBlur:
    """DINO's blur: PIL's GaussianBlur with a radius drawn from [0.1, 2.0], applied with probability p."""

    def __init__(self, p: float, radius: tuple[float, float] = (0.1, 2.0)):
        self.p, self.radius = p, radius

    def __call__(self, image: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return image
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.radius)))


def dino_pil_views(config: MultiCropConfig) -> Callable[[Image.Image], list[torch.Tensor]]:
    """facebookresearch/dino's DataAugmentationDINO with torchvision transforms, sized by `config`."""
    flip_and_color_jitter = T.Compose([
        T.RandomHorizontalFlip(p=config.hflip_p),
        T.RandomApply([T.ColorJitter(config.brightness, config.contrast, config.saturation, config.hue)],
                      p=config.color_jitter_p),
        T.RandomGrayscale(p=config.grayscale_p),
    ])
    to_normalized_tensor = T.Compose([T.ToTensor(), T.Normalize(config.mean, config.std)])
    bicubic = T.InterpolationMode.BICUBIC

    def crop(size: int, scale: tuple[float, float]) -> T.RandomResizedCrop:
        return T.RandomResizedCrop(size, scale=scale, interpolation=bicubic)

    first_global = T.Compose([crop(config.global_size, config.global_scale), flip_and_color_jitter,
                              PilGaussianBlur(config.blur_p[0]), to_normalized_tensor])
    second_global = T.Compose([crop(config.global_size, config.global_scale), flip_and_color_jitter,
                               PilGaussianBlur(config.blur_p[1]), T.RandomSolarize(128, p=config.solarize_p),
                               to_normalized_tensor])
    local = T.Compose([crop(config.local_size, config.local_scale), flip_and_color_jitter,
                       PilGaussianBlur(config.blur_p[2]), to_normalized_tensor])

    def views(image: Image.Image) -> list[torch.Tensor]:
        return [first_global(image), second_global(image)] + [local(image) for _ in range(config.local_crops)]

    return views


def seconds_per_call(run: Callable[[], object], calls: int, synchronize: Callable[[], None] = lambda: None) -> float:
    run()  # warm-up: allocator, kernels, lazy imports
    synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        run()
    synchronize()
    return (time.perf_counter() - started) / calls


def time_tensor_ops(augment: MultiCropAugment, base: torch.Tensor, batches: int, seed: int) -> float:
    generator = torch.Generator().manual_seed(seed)
    synchronize = torch.cuda.synchronize if base.is_cuda else (lambda: None)
    return seconds_per_call(lambda: augment(base, generator), batches, synchronize)


def time_pil(config: MultiCropConfig, base: torch.Tensor, batches: int, seed: int) -> float:
    random.seed(seed)
    torch.manual_seed(seed)
    images = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in base]
    views = dino_pil_views(config)
    return seconds_per_call(lambda: [views(image) for image in images], batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--base-size", type=int, default=256)
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--local-crops", type=int, default=6)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batches", type=int, default=5, help="timed batches per measurement")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")

    config = MultiCropConfig(global_size=args.global_size, local_size=args.local_size, local_crops=args.local_crops)
    augment = MultiCropAugment(config)
    base = torch.randint(0, 256, (args.batch_size, 3, args.base_size, args.base_size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(args.seed))
    batch = args.batch_size
    cores = os.cpu_count() or 1
    print(f"batch {batch}, base {args.base_size}px -> 2x{args.global_size}px + {args.local_crops}x{args.local_size}px"
          f"  torch {torch.__version__}, {cores} CPU cores, load average {os.getloadavg()[0]:.1f}")

    rates = {}
    for threads in sorted({cores, 1}, reverse=True):
        torch.set_num_threads(threads)
        seconds = time_tensor_ops(augment, base, args.batches, args.seed)
        rates[f"cpu{threads}"] = batch / seconds
        print(f"tensor ops, cpu, {threads} thread(s): {batch / seconds:8.1f} images/s  ({seconds * 1000:.0f} ms/batch)")
    torch.set_num_threads(1)  # one data worker's share
    seconds = time_pil(config, base, args.batches, args.seed)
    print(f"PIL per image (DINO's torchvision pipeline), 1 process, 1 thread: {batch / seconds:8.1f} images/s"
          f"  ({seconds * 1000:.0f} ms/batch)")
    torch.set_num_threads(cores)
    if args.device == "cuda":
        seconds = time_tensor_ops(augment, base.cuda(), args.batches, args.seed)
        rates["cuda"] = batch / seconds
        print(f"tensor ops, {torch.cuda.get_device_name()}: {batch / seconds:8.1f} images/s"
              f"  ({seconds * 1000:.1f} ms/batch, uint8 base already on the device)")
    print(f"images/s: {rates['cuda' if args.device == 'cuda' else f'cpu{cores}']:.1f}")


if __name__ == "__main__":
    main()
