"""Ray job: seed 000's experiment grid (backbones x meta-training sets x PN/PN+FT x shots) as one table.

    python -m jobs.grid --config configs/grid/seed000_synthetic.yaml [key=value ...]
"""

import sys

from metallo_core.entrypoint import job_main
from metallo_core.fewshot.grid import GridConfig
from metallo_core.train.grid import run_grid


def main(argv: list[str] | None = None) -> int:
    return job_main("grid", GridConfig, run_grid, lambda result: f"{result['table']}\nfiles: {result['out']}", argv)


if __name__ == "__main__":
    sys.exit(main())
