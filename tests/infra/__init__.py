"""Tests of the cluster configs, the storage bootstrap and the local stack.

The commands below are the ones the tests run; test_cluster_configs checks that cluster/README.md
shows users exactly these, so the guide cannot drift from what is tested.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

LOCAL_STACK = "uv run --frozen python -m infra.local_stack"
LOCAL_STACK_ACTIONS = ("up", "env", "status", "down")
BOOTSTRAP_STORAGE = "uv run --frozen python -m infra.bootstrap_storage"
# How every job is submitted (followed by `-- python -m jobs.<stage> --config FILE ...`).
JOB_SUBMIT = ("ray", "job", "submit", "--working-dir", ".", "--runtime-env", "cluster/runtime_env.yaml")
JOB_FOLLOW = ("ray", "job", "logs", "--follow")
JOB_LIST = ("ray", "job", "list")
