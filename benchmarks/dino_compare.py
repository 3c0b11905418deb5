"""DINO end to end, metallo vs facebookresearch/dino on the same JPEGs and recipe, interleaved rounds.

Each round runs, as separate processes one after the other: metallo's `dino_throughput.py` with 2 and
with 1 CPU thread(s), and facebookresearch/dino's own loop (`ref_dino_bench.py`, ImageFolder + DataLoader
with 2 workers + DataAugmentationDINO). Prints per-round images/s, then the medians of
metallo / reference, and of metallo's 2-thread / 1-thread speed-up (scaling efficiency = speed-up / 2).

    uv run --frozen python benchmarks/dino_compare.py --dino-git /path/to/dino/.git \\
        --reference ../shared/bench/ref_dino_bench.py --rounds 2
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.read_throughput import make_jpeg_folder

RECIPE = ["--arch", "resnet18", "--batch-size", "16", "--local-crops", "6", "--out-dim", "4096", "--steps", "6"]


def images_per_s(command: list[str], env: dict[str, str]) -> float:
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    match = re.search(r"images/s: ([0-9.]+)", result.stdout)
    if result.returncode != 0 or match is None:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return float(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dino-git", required=True, help="a git directory of facebookresearch/dino")
    parser.add_argument("--reference", required=True, type=Path, help="ref_dino_bench.py")
    parser.add_argument("--images", type=Path, default=None,
                        help="class-folder JPEG tree (default: 128 x 320 px made here)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    here = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as scratch:
        images = args.images
        if images is None:
            images = Path(scratch) / "jpegs"
            make_jpeg_folder(images, 128, classes=4, side=320)
        ours = [sys.executable, str(here / "dino_throughput.py"), "--images", str(images), *RECIPE]
        reference = [sys.executable, str(args.reference), "--dino-git", args.dino_git, "--images", str(images),
                     "--workers", "2", *RECIPE]
        env = dict(os.environ)
        rates: dict[str, list[float]] = {"metallo-2": [], "metallo-1": [], "reference": []}
        for round_index in range(args.rounds):
            rates["metallo-2"].append(images_per_s(ours + ["--threads", "2", "--decode-threads", "2"], env))
            rates["reference"].append(images_per_s(reference, env))
            rates["metallo-1"].append(images_per_s(ours + ["--threads", "1", "--decode-threads", "1"], env))
            print(f"round {round_index + 1}: " + ", ".join(f"{name} {values[-1]:.2f}" for name, values in rates.items())
                  + f" images/s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
        versus = [ours_rate / ref for ours_rate, ref in zip(rates["metallo-2"], rates["reference"])]
        scaling = [two / one for two, one in zip(rates["metallo-2"], rates["metallo-1"])]
        print(f"metallo / facebookresearch/dino (2 CPUs each): median {statistics.median(versus):.2f}x "
              f"(per round {', '.join(f'{v:.2f}' for v in versus)})")
        print(f"metallo 1 -> 2 CPUs: median speed-up {statistics.median(scaling):.2f}x, efficiency "
              f"{statistics.median(scaling) / 2:.0%} (per round {', '.join(f'{v:.2f}' for v in scaling)})")


if __name__ == "__main__":
    main()
