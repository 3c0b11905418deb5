"""Ray job: ASHA search over ProtoNet meta-training hyperparameters (each trial a Ray Train run).

    python -m tuning.search_metatrain --config tuning/configs/metatrain_tiny_cpu.yaml [key=value ...] \
  (= metallo tune metatrain)

Run it again with the same `search.name` to resume an interrupted search, or with a larger
`search.num_samples` to extend it; other changed settings are refused (metallo_core/tuning/resume.py).
"""

import sys

from metallo_core.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("tuning.search_metatrain"))
