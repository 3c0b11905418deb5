"""Ray job: multi-label training (seed 002's n-furcated head on a frozen backbone), or its experiment grid.

    python -m jobs.multilabel --config configs/multilabel/seed002_bifurcated.yaml [key=value ...] \
  (= metallo multilabel train)
    python -m jobs.multilabel experiments --config configs/multilabel/seed002_experiments.yaml [key=value ...]
"""

import sys

from metallo_core.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("jobs.multilabel"))
