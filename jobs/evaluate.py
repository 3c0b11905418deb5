"""Ray job: meta-testing over many fixed tasks (ProtoNet, fine-tuning), run in parallel Ray actors.

    python -m jobs.evaluate --config configs/evaluate/tiny_cpu.yaml [key=value ...]   (= metallo evaluate)
"""

import sys

from metallo_core.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("jobs.evaluate"))
