"""Seconds per ProtoNet meta-training episode (forward + backward + SGD step) in each precision on this
CPU, to check what `precision: auto` (metallo_core/precision.py) decides.

    uv run python benchmarks/precision_cpu.py                       # the tests' tiny ResNet-18 episode
    uv run python benchmarks/precision_cpu.py --image-size 224 --no-small-input --shot 1 --query 5

Prints the CPU's bf16 support, then one line per precision/memory format with the median of --repeats
episodes (the first, warm-up episode is left out).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metallo_core.fewshot.protonet import ProtoNet
from metallo_core.models.backbones import BackboneSpec, build_backbone
from metallo_core.precision import autocast, cpu_has_native_bf16, resolve_precision


def episode_seconds(spec: BackboneSpec, precision: str, channels_last: bool, way: int, shot: int, query: int,
                    repeats: int) -> float:
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = ProtoNet(build_backbone(spec), distance="cosine").to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    size = spec.image_size
    support = torch.randn(way * shot, 3, size, size).contiguous(memory_format=memory_format)
    queries = torch.randn(way * query, 3, size, size).contiguous(memory_format=memory_format)
    support_labels = torch.arange(way).repeat_interleave(shot)
    query_labels = torch.arange(way).repeat_interleave(query)
    device = torch.device("cpu")
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        with autocast(device, precision):
            logits = model(support, support_labels, queries, way)
        loss = F.cross_entropy(logits.float(), query_labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=20)
    parser.add_argument("--no-small-input", dest="small_input", action="store_false")
    parser.add_argument("--way", type=int, default=5)
    parser.add_argument("--shot", type=int, default=5)
    parser.add_argument("--query", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = BackboneSpec(arch=args.arch, small_input=args.small_input, image_size=args.image_size)
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: {cpu_has_native_bf16()}, "
          f"precision auto -> {resolve_precision('auto', torch.device('cpu'))}, {args.threads} thread(s)")
    for precision in ("fp32", "bf16"):
        for channels_last in (False, True):
            seconds = episode_seconds(spec, precision, channels_last, args.way, args.shot, args.query, args.repeats)
            layout = "channels_last" if channels_last else "contiguous"
            print(f"{args.arch} {args.image_size}px {precision:>4} {layout:>13}: {seconds:.2f} s/episode")


if __name__ == "__main__":
    main()
