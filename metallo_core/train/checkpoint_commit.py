"""Waiting until Ray Train has committed a reported checkpoint (tests and fault-injection use it).

`ray.train.report(..., checkpoint=...)` uploads the checkpoint, but Ray Train V2's controller registers
it only when it next polls the workers (every ~2 s by default), and only then rewrites
`<storage>/<run name>/checkpoint_manager_snapshot.json`, the file a restarted worker group resumes
from. A crash inside that window loses the checkpoint. So a deliberate crash (or a test that kills a
worker) waits for that file to name the checkpoint, instead of sleeping and hoping the poll came first.
"""

from __future__ import annotations

import json
import time

from metallo_core.errors import MetalloError
from metallo_core.storage import locate

# ray/train/v2/_internal/constants.py: CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


def committed_epoch(storage: str, run_name: str) -> int | None:
    """The `epoch` metric of the latest checkpoint Ray Train has committed for the run, or None when
    there is none yet (no snapshot, or a snapshot without a checkpoint). The epoch is the one the
    training loop reported alongside the checkpoint."""
    snapshot = locate(storage).join(run_name, SNAPSHOT_FILE)
    if not snapshot.exists():
        return None
    try:
        state = json.loads(snapshot.read_bytes())
    except ValueError:  # caught mid-rewrite: not committed as far as we can tell yet
        return None
    latest = state.get("latest_checkpoint_result") or {}
    epoch = (latest.get("metrics") or {}).get("epoch")
    return None if epoch is None else int(epoch)


def wait_for_committed_checkpoint(storage: str, run_name: str, epoch: int, *, timeout_s: float = 300.0,
                                  poll_s: float = 0.5) -> None:
    """Block until the run's committed checkpoint is from `epoch` or later.

    Raises MetalloError naming the snapshot file if that does not happen within `timeout_s` seconds
    (the controller died, or the run checkpoints under another name or storage)."""
    deadline = time.monotonic() + timeout_s
    while True:
        committed = committed_epoch(storage, run_name)
        if committed is not None and committed >= epoch:
            return
        if time.monotonic() > deadline:
            where = locate(storage).join(run_name, SNAPSHOT_FILE).uri
            raise MetalloError(f"no checkpoint of epoch >= {epoch} was committed to {where} within {timeout_s:.0f} s "
                               f"(latest committed epoch: {committed})")
        time.sleep(poll_s)
