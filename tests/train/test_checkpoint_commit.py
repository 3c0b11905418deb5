"""Waiting on Ray Train's committed checkpoint (its checkpoint-manager snapshot), not on time: the
snapshot is read as Ray Train 2.60 writes it, and a wait that cannot succeed fails naming the file."""

import json
import threading

import pytest

from metallo_core.errors import MetalloError
from metallo_core.train.checkpoint_commit import (
    SNAPSHOT_FILE,
    committed_epoch,
    wait_for_committed_checkpoint,
)


def write_snapshot(run_dir, epoch):
    # The fields Ray Train 2.60's _CheckpointManagerState holds (checkpoint_manager.py), trimmed.
    result = {"version": 0, "checkpoint_dir_name": f"checkpoint_{epoch}", "metrics": {"epoch": epoch, "loss": 1.0}}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / SNAPSHOT_FILE).write_text(json.dumps({
        "ray_version": "2.60.0", "checkpoint_results": [result], "latest_checkpoint_result": result}))


def test_committed_epoch_reads_the_latest_checkpoint_of_the_snapshot(tmp_path):
    assert committed_epoch(str(tmp_path), "run") is None  # no snapshot yet
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / SNAPSHOT_FILE).write_text('{"latest_checkpoint_result": null}')
    assert committed_epoch(str(tmp_path), "run") is None  # a snapshot without a checkpoint
    (tmp_path / "run" / SNAPSHOT_FILE).write_text('{"latest_checkp')  # caught mid-write
    assert committed_epoch(str(tmp_path), "run") is None
    write_snapshot(tmp_path / "run", 3)
    assert committed_epoch(str(tmp_path), "run") == 3


def test_the_wait_returns_when_the_checkpoint_is_committed_and_fails_clearly_otherwise(tmp_path):
    write_snapshot(tmp_path / "run", 0)
    committer = threading.Timer(0.3, write_snapshot, args=(tmp_path / "run", 1))
    committer.start()
    wait_for_committed_checkpoint(str(tmp_path), "run", 1, timeout_s=30, poll_s=0.05)
    assert committed_epoch(str(tmp_path), "run") == 1
    with pytest.raises(MetalloError, match=rf"epoch >= 2 .*{SNAPSHOT_FILE}.*latest committed epoch: 1"):
        wait_for_committed_checkpoint(str(tmp_path), "run", 2, timeout_s=0.2, poll_s=0.05)


def test_the_injected_worker_crash_waits_for_the_previous_epochs_checkpoint(tmp_path, monkeypatch):
    """DINO's test crash (debug.fail_at_step) exits only after the last checkpoint before its epoch is
    committed: here epoch 1's, with checkpoints every 2 epochs and the crash in epoch 3."""
    from metallo_core.config import from_dict
    from metallo_core.ssl.config import DinoConfig
    from metallo_core.train import dino

    config = from_dict(DinoConfig, {"data": {"uri": str(tmp_path / "data")},
                                    "run": {"name": "run", "checkpoint_every_epochs": 2},
                                    "debug": {"fail_at_step": 3 * 5 + 2, "fail_rank": 1, "commit_timeout_s": 30}})
    exits = []
    monkeypatch.setattr(dino.os, "_exit", lambda code: exits.append((code, committed_epoch(str(tmp_path), "run"))))
    dino._maybe_inject_failure(config, 3 * 5 + 1, 1, str(tmp_path), steps_per_epoch=5)  # not the step
    dino._maybe_inject_failure(config, 3 * 5 + 2, 0, str(tmp_path), steps_per_epoch=5)  # not the rank
    assert exits == []
    write_snapshot(tmp_path / "run", 0)  # committed, but not the checkpoint the crash must wait for
    threading.Timer(0.5, write_snapshot, args=(tmp_path / "run", 1)).start()
    dino._maybe_inject_failure(config, 3 * 5 + 2, 1, str(tmp_path), steps_per_epoch=5)
    assert exits == [(1, 1)]  # it exited, and only once epoch 1's checkpoint was committed
    dino._maybe_inject_failure(config, 3 * 5 + 2, 1, str(tmp_path), steps_per_epoch=5)
    assert exits == [(1, 1)]  # once per run: the marker in the run's storage remembers it
