"""Ray job: multi-label training (seed 002's n-furcated head on a frozen backbone), or its experiment grid.

    python -m jobs.multilabel --config configs/multilabel/seed002_bifurcated.yaml [key=value ...]
    python -m jobs.multilabel experiments --config configs/multilabel/seed002_experiments.yaml [key=value ...]
"""

import sys

from metallo_core.entrypoint import job_main
from metallo_core.multilabel.config import ExperimentsConfig, MultilabelConfig
from metallo_core.multilabel.experiments import describe_experiments, run_experiments
from metallo_core.multilabel.pipeline import describe_result, run_multilabel_training


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["experiments"]:
        return job_main("multilabel", ExperimentsConfig, run_experiments, describe_experiments, argv[1:])
    return job_main("multilabel", MultilabelConfig, run_multilabel_training, describe_result, argv)


if __name__ == "__main__":
    sys.exit(main())
