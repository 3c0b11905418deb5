"""Ray job: ProtoNet meta-training on Ray Train.

    python -m jobs.metatrain --config configs/metatrain/tiny_cpu.yaml [key=value ...]   (= metallo metatrain)
"""

import sys

from metallo_core.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("jobs.metatrain"))
