"""Connecting to Ray and turning our settings into Ray Train's configs (the only Ray glue stages share)."""

from __future__ import annotations

import logging
import os
import socket

from metallo_core import console, tracking
from metallo_core.errors import ClusterError
from metallo_core.settings import ComputeSettings, RunSettings
from metallo_core.storage import locate, storage_for_ray

logger = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 5.0


def connect(address: str | None = None, setting: str = "compute.ray_address") -> None:
    """Join the cluster at `address` (the config's `setting`) or $RAY_ADDRESS (e.g. under `ray job submit`),
    else start a local one. A cluster that cannot be joined is a ClusterError naming the address, where it
    came from, and how to run on a local cluster instead."""
    source = f"{setting} (config)" if address else "the environment variable RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        # Local cluster: workers run this interpreter directly (no `uv run` re-launch with a copied
        # working dir). Ray reads this when it is first imported, so set it before the import.
        os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address and address.startswith(("http://", "https://")):
        raise ClusterError(
            f"{address} (from {source}) is a job-submission (dashboard) address, which a driver cannot join. "
            "Submit the stage as a job (`ray job submit --address ... -- python -m jobs.<stage> ...`), set "
            "RAY_ADDRESS to the head's GCS address (host:6379) to run this process on that cluster, or unset "
            "it to start a local cluster"
        )
    import ray

    if ray.is_initialized():
        return
    if address:
        _probe(address, source, setting)
    console.quiet_ray()
    if address:
        # Under `ray job submit`, Ray merges this into the job's runtime env (the env var keys must not clash).
        try:
            ray.init(address=address, log_to_driver=True, runtime_env=worker_runtime_env(),
                     logging_level=console.ray_logging_level())
        except Exception as exc:  # ConnectionError, TimeoutError, ValueError (a malformed address), ...
            raise _cannot_join(address, source, setting, _first_line(exc)) from exc
        console.quiet_ray()
        return
    # Logical CPUs are over-subscribed so Ray Data tasks still get CPUs while Train workers hold
    # theirs (otherwise reads starve on small machines).
    context = ray.init(
        num_cpus=max(4, 2 * (os.cpu_count() or 2)),
        runtime_env=worker_runtime_env(),
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        log_to_driver=True,
        configure_logging=False,
    )
    console.quiet_ray()
    logger.info("started a local Ray cluster; dashboard at http://%s (set RAY_ADDRESS to use a running cluster "
                "instead)", context.dashboard_url)


def _probe(address: str, source: str, setting: str) -> None:
    """Fail in seconds when nothing listens at a host:port address (ray.init would retry for minutes)."""
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", a bare host: left to Ray
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        raise _cannot_join(address, source, setting, f"nothing answers at {host}:{port} ({exc})") from exc


def _cannot_join(address: str, source: str, setting: str, why: str) -> ClusterError:
    return ClusterError(
        f"cannot join the Ray cluster at {address} (from {source}): {why}. Check that the cluster is up "
        f"there (`ray status --address {address}`), or unset RAY_ADDRESS and {setting} to let metallo start "
        "a local cluster on this machine (or start one to share with `ray start --head`, then "
        "RAY_ADDRESS=127.0.0.1:6379)")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


WORKER_SETUP_HOOK = "metallo_core.train.ray_setup.prepare_worker"


def worker_runtime_env() -> dict:
    """The runtime env of this driver's job: every worker runs `prepare_worker` first, with this console."""
    return {"worker_process_setup_hook": WORKER_SETUP_HOOK,
            "env_vars": {console.VERBOSE_ENV: "1" if console.is_verbose() else "0"}}


def prepare_worker() -> None:
    """Runs once in every worker of a local cluster, before its first task: import pandas fully. Ray Data's
    map tasks otherwise import it from several threads at once, and in a fresh environment (no .pyc files
    yet, as in CI) one of them can get the half-initialised module: "module 'pandas' has no attribute
    'core'" from a decode task. Then the same quiet console as the driver's (metallo_core.console)."""
    import pandas  # noqa: F401

    console.configure_worker()


def storage_uri(run: RunSettings) -> str:
    return run.storage or str(tracking.local_home() / "ray")


def scaling_config(compute: ComputeSettings):
    from ray.train import ScalingConfig

    resources = {"CPU": compute.cpus_per_worker}
    if compute.use_gpu:
        resources["GPU"] = compute.gpus_per_worker
    return ScalingConfig(num_workers=compute.num_workers, use_gpu=compute.use_gpu, resources_per_worker=resources)


def run_config(run: RunSettings, *, checkpoint_score: str | None = None, score_order: str = "max",
               callbacks: tuple = ()):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig

    storage = locate(storage_uri(run))
    storage.check_access()
    path, filesystem = storage_for_ray(storage.uri)
    # Train V2's RunConfig (the default in Ray 2.60) takes logging_config; the type stubs describe V1's.
    return RunConfig(  # type: ignore[call-arg]
        name=run.name,
        storage_path=path,
        storage_filesystem=filesystem,
        checkpoint_config=CheckpointConfig(
            num_to_keep=run.keep_checkpoints,
            checkpoint_score_attribute=checkpoint_score,
            checkpoint_score_order=score_order,
        ),
        failure_config=FailureConfig(max_failures=run.max_failures),
        callbacks=list(callbacks) or None,
        logging_config=LoggingConfig(log_level=logging.getLevelName(console.ray_logging_level())),
    )


def torch_threads(compute: ComputeSettings) -> int:
    return compute.torch_threads or max(1, int(round(compute.cpus_per_worker)))
