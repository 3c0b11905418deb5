"""Errors a user can cause and fix: each message names the file, class or setting and what to do.

The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
"""


class MetalloError(Exception):
    """Base class for user-facing errors."""


class ConfigError(MetalloError, ValueError):
    """A configuration value is missing, unknown or out of range."""


class DataError(MetalloError, ValueError):
    """A dataset, image, class or split is unusable as given."""


class StorageError(MetalloError, OSError):
    """A local path or object store cannot be read or written."""


class TrackingError(MetalloError, RuntimeError):
    """The MLflow tracking server or model registry cannot serve the request."""


class TrainingDiverged(MetalloError, FloatingPointError):
    """A training loss went non-finite (the message names the step and the settings to change)."""


class ClusterError(MetalloError, ConnectionError):
    """The Ray cluster named by a setting or $RAY_ADDRESS cannot be joined."""


class Cancelled(MetalloError):
    """The user stopped the work (a progress listener raises it between steps; nothing is written)."""


def user_error_in(error: BaseException) -> MetalloError | None:
    """The MetalloError that `error` is or wraps, raised by metallo's own code in a Ray worker, task or
    controller (Ray Train's TrainingFailedError holds it in worker_failures / controller_failure, a Ray task
    error in `cause`, Train's worker wrapper in `_base_exc`); None when there is none. Attributes only, so
    this module stays free of Ray."""
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        cause = getattr(current, "cause", None)
        if isinstance(current, MetalloError) and not isinstance(cause, BaseException):
            return current
        failures = getattr(current, "worker_failures", None)
        inner = [*(failures.values() if isinstance(failures, dict) else ()),
                 getattr(current, "controller_failure", None), getattr(current, "_base_exc", None), cause,
                 current.__cause__]
        pending.extend(item for item in inner if isinstance(item, BaseException))
    return None
