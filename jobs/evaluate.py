"""Ray job: meta-testing over many fixed tasks (ProtoNet, fine-tuning), run in parallel Ray actors.

    python -m jobs.evaluate --config configs/evaluate/tiny_cpu.yaml [key=value ...]
"""

import sys

from metallo_core.entrypoint import job_main
from metallo_core.fewshot.config import EvaluateConfig
from metallo_core.train.evaluate import describe_result, run_evaluation


def main(argv: list[str] | None = None) -> int:
    return job_main("evaluate", EvaluateConfig, run_evaluation, describe_result, argv)


if __name__ == "__main__":
    sys.exit(main())
