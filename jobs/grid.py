"""Ray job: seed 000's experiment grid (backbones x meta-training sets x PN/PN+FT x shots) as one table.

    python -m jobs.grid --config configs/grid/seed000_synthetic.yaml [key=value ...]   (= metallo grid)
"""

import sys

from metallo_core.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("jobs.grid"))
