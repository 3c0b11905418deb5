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
