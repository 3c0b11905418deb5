"""What reaches the terminal: logging set up once by the entry point (`metallo`, `python -m jobs.<stage>`).

Quiet (the default): metallo's own lines (stage lines, one progress line per epoch or batch of tasks) and
every library's warnings, all on stderr; Ray's and Ray Data's progress bars and internal INFO logs off.
Verbose: everything, as the libraries print it. Results go to stdout, printed by the commands.
"""

from __future__ import annotations

import logging
import os
import sys

# Read in the driver and, through the job's runtime env (metallo_core.train.ray_setup.connect), in every
# Ray worker of the job.
VERBOSE_ENV = "METALLO_VERBOSE"
QUIET_LEVEL = logging.WARNING
# Ray's loggers keep their own console handlers (propagate=False): quiet ones are turned down one by one.
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.air")


def configure(verbose: bool = False) -> None:
    """Set up logging for this process and the Ray workers it starts; call it first, before Ray or MLflow are
    imported (their loggers read the environment when they load). Calling it again replaces the setting."""
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    if not verbose:
        _quiet_environment()
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s" if not verbose
                                           else "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    # Replace only our own handler: configuring twice (tests, a stage calling another) must not double lines.
    root.handlers = [existing for existing in root.handlers if not isinstance(existing, _StderrHandler)] + [handler]
    root.setLevel(logging.INFO if verbose else QUIET_LEVEL)
    # metallo's own INFO lines (stages, progress) show either way.
    logging.getLogger("metallo_core").setLevel(logging.INFO)


def configure_worker() -> None:
    """In a Ray worker process, before its first task: the console its driver asked for (`VERBOSE_ENV`,
    passed in the job's runtime env by metallo_core.train.ray_setup.connect)."""
    if is_verbose():
        return
    _quiet_environment()
    import warnings

    # Ray Train's own default ingest options trip this deprecation in every run; nothing to act on.
    warnings.filterwarnings("ignore", message=".*exclude_resources.*")
    quiet_ray()


def _quiet_environment() -> None:
    """Settings mlflow and Ray Data read when they load (here and in Ray workers); a value the user set is kept."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def is_verbose() -> bool:
    """Whether this process (or the driver that started this Ray worker) was asked for everything."""
    return os.environ.get(VERBOSE_ENV) == "1"


def ray_logging_level() -> int:
    """The level for `ray.init(logging_level=...)` and Ray Train's `LoggingConfig`."""
    return logging.INFO if is_verbose() else QUIET_LEVEL


def quiet_ray() -> None:
    """Turn Ray's and Ray Data's console output down to warnings in this process (a no-op when verbose).

    Ray configures its loggers when it is imported, so this runs where Ray is used: before and after
    `ray.init` in the driver, first thing in every worker.
    """
    if is_verbose():
        return
    # Importing Ray Data creates its logger (and its console handler), turned down below.
    import ray
    from ray.data import DataContext
    from ray.util.debug import log_once

    for name in RAY_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            # Console handlers only: Ray's session log files keep every record.
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(max(handler.level, QUIET_LEVEL))
    # Ray Train's worker context logs every report at INFO under its file path, not under "ray.train", so
    # RunConfig's LoggingConfig does not reach it (ray/train/v2/_internal/execution/context.py).
    train_context = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py")
    logging.getLogger(train_context).setLevel(QUIET_LEVEL)
    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    # Ray Data warns once per process that the bars are off; we turned them off, so spend its once-key here.
    log_once("ray_data_progress_manager_disabled")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record is emitted (pytest and Ray replace it), not the
    stream there was when logging was configured."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        """Ignored on purpose: StreamHandler.__init__/setStream assign a stream; this handler has none of its
        own and always writes to the current sys.stderr (the getter above)."""
