"""Ray job: ASHA search over ProtoNet meta-training hyperparameters (each trial a Ray Train run).

    python -m tuning.search_metatrain --config tuning/configs/metatrain_tiny_cpu.yaml [key=value ...]

Run it again with the same `search.name` to resume an interrupted search, or with a larger
`search.num_samples` to extend it; other changed settings are refused (metallo_core/tuning/resume.py).
"""

import sys

from metallo_core.entrypoint import job_main
from metallo_core.tuning.config import MetaTrainSearchConfig
from metallo_core.tuning.metatrain_search import describe_result, run_metatrain_search


def main(argv: list[str] | None = None) -> int:
    return job_main("search_metatrain", MetaTrainSearchConfig, run_metatrain_search, describe_result, argv)


if __name__ == "__main__":
    sys.exit(main())
