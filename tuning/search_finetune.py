"""Ray job: Optuna search over meta-test fine-tuning settings, scored on fixed meta-validation tasks.

    python -m tuning.search_finetune --config tuning/configs/finetune_synthetic.yaml [key=value ...]

Run it again with the same `search.name` to resume an interrupted search, or with a larger
`search.num_samples` to extend it; other changed settings are refused (metallo_core/tuning/resume.py).
"""

import sys

from metallo_core.entrypoint import job_main
from metallo_core.tuning.config import FinetuneSearchConfig
from metallo_core.tuning.finetune_search import describe_result, run_finetune_search


def main(argv: list[str] | None = None) -> int:
    return job_main("search_finetune", FinetuneSearchConfig, run_finetune_search, describe_result, argv)


if __name__ == "__main__":
    sys.exit(main())
