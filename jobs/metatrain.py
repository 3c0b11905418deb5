"""Ray job: ProtoNet meta-training on Ray Train.

    python -m jobs.metatrain --config configs/metatrain/tiny_cpu.yaml [key=value ...]
"""

import sys

from metallo_core.entrypoint import job_main
from metallo_core.fewshot.config import MetaTrainConfig
from metallo_core.train.metatrain import describe_result, run_metatraining


def main(argv: list[str] | None = None) -> int:
    return job_main("metatrain", MetaTrainConfig, run_metatraining, describe_result, argv)


if __name__ == "__main__":
    sys.exit(main())
