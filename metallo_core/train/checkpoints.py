"""Training-state checkpoints: a torch state file plus a JSON record with its SHA-256.

Loading checks the digest and uses `torch.load(weights_only=True)`, so a truncated, tampered or
foreign file gives a clear error instead of unpickling arbitrary objects.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from metallo_core.errors import MetalloError
from metallo_core.storage import Location

STATE_FILE = "state.pt"
RECORD_FILE = "checkpoint.json"


class CheckpointError(MetalloError):
    """A checkpoint cannot be used as it is."""


def save_checkpoint(directory: str | Path, state: dict, record: dict[str, Any]) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / STATE_FILE)
    digest = hashlib.sha256((directory / STATE_FILE).read_bytes()).hexdigest()
    (directory / RECORD_FILE).write_text(json.dumps({**record, "sha256": digest}, indent=2))


def load_checkpoint(directory: str | Path) -> tuple[dict, dict[str, Any]]:
    directory = Path(directory)
    state_path, record_path = directory / STATE_FILE, directory / RECORD_FILE
    if not state_path.is_file() or not record_path.is_file():
        raise CheckpointError(f"checkpoint {directory} is incomplete: it needs {STATE_FILE} and {RECORD_FILE}")
    try:
        record = json.loads(record_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint record {record_path} is not valid JSON ({exc})") from exc
    data = state_path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != record.get("sha256"):
        raise CheckpointError(
            f"checkpoint {state_path} does not match the SHA-256 in {RECORD_FILE}: it was truncated or altered "
            "after it was written; resume from an earlier checkpoint or start the run under a new name"
        )
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise CheckpointError(f"checkpoint {state_path} cannot be loaded safely: {exc}") from exc
    return state, record


def latest_checkpoint_record(run_directory: Location) -> tuple[Location, dict[str, Any]] | None:
    """The newest checkpoint (by epoch) Ray Train kept under a run's storage directory, with its record.

    Lets a driver see that a run already finished without asking the cluster for resources.
    """
    best = None
    for relative in run_directory.list_files():
        if not relative.endswith("/" + RECORD_FILE) or relative.count("/") != 1:
            continue
        location = run_directory.join(relative)
        try:
            record = json.loads(location.read_bytes())
        except (json.JSONDecodeError, MetalloError):
            continue
        if best is None or record.get("epoch", -1) > best[1].get("epoch", -1):
            best = (location.parent(), record)
    return best


def load_checkpoint_from(location: Location) -> tuple[dict, dict[str, Any]]:
    """`load_checkpoint` for a checkpoint directory on any storage (local or s3://)."""
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        for name in (STATE_FILE, RECORD_FILE):
            (Path(directory) / name).write_bytes(location.join(name).read_bytes())
        return load_checkpoint(directory)
