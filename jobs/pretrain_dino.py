"""Ray job: DINO pretraining of a ResNet backbone on Ray Train.

    python -m jobs.pretrain_dino --config configs/pretrain/tiny_cpu.yaml [key=value ...]
"""

import sys

from metallo_core.entrypoint import job_main
from metallo_core.ssl.config import DinoConfig
from metallo_core.train.dino import describe_result, run_dino_pretraining


def main(argv: list[str] | None = None) -> int:
    return job_main("pretrain_dino", DinoConfig, run_dino_pretraining, describe_result, argv)


if __name__ == "__main__":
    sys.exit(main())
