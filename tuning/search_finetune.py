"""Ray job: Optuna search over meta-test fine-tuning settings, scored on fixed meta-validation tasks.

    python -m tuning.search_finetune --config tuning/configs/finetune_synthetic.yaml [key=value ...] \
  (= metallo tune finetune)

Run it again with the same `search.name` to resume an interrupted search, or with a larger
`search.num_samples` to extend it; other changed settings are refused (metallo_core/tuning/resume.py).
"""

import sys

from metallo_core.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("tuning.search_finetune"))
