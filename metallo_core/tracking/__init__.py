"""The one place that configures MLflow and creates runs; this package re-exports what callers use.

- `store`: where runs go (embedded sqlite under `./metallo-runs/` or `$METALLO_HOME`, with absolute paths
  since Ray workers run in other directories, or the server named by `MLFLOW_TRACKING_URI`), and the probe;
- `runs`: opening a run and logging to it (rank 0 only);
- `datasets`: a run's dataset lineage (tags and MLflow dataset input);
- `registry`: model URIs, alias pinning, logging and registering torch models (imported where needed).
"""

from metallo_core.errors import TrackingError
from metallo_core.tracking.datasets import dataset_tags
from metallo_core.tracking.runs import (
    MAX_PARAM_LENGTH,
    RUN_NAME_TAG,
    NullLogger,
    RunLogger,
    code_version,
    is_rank_zero,
    logger_for,
    open_run,
    start_run,
)
from metallo_core.tracking.store import (
    ENV_HOME,
    ENV_TRACKING_URI,
    check_server,
    client,
    configure,
    describe_store,
    ensure_experiment,
    how_to_point_at_a_store,
    is_local_store,
    local_home,
    local_store_path,
    lookup_client,
    require_existing_store,
    shown_uri,
    split_credentials,
    tracking_uri,
    ui_command,
)

__all__ = [
    "ENV_HOME", "ENV_TRACKING_URI", "MAX_PARAM_LENGTH", "RUN_NAME_TAG", "NullLogger", "RunLogger", "TrackingError",
    "check_server", "client", "code_version", "configure", "dataset_tags", "describe_store", "ensure_experiment",
    "how_to_point_at_a_store", "is_local_store", "is_rank_zero", "local_home", "local_store_path", "logger_for",
    "lookup_client", "open_run", "require_existing_store", "shown_uri", "split_credentials", "start_run",
    "tracking_uri", "ui_command",
]
