"""Ray job: DINO pretraining of a ResNet backbone on Ray Train.

    python -m jobs.pretrain_dino --config configs/pretrain/tiny_cpu.yaml [key=value ...]   (= metallo pretrain)
"""

import sys

from metallo_core.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("jobs.pretrain_dino"))
