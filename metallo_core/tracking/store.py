"""Where runs go: the tracking URI (embedded sqlite store or a server), pointing MLflow at it, and the probe
that makes an unreachable server or refused credentials fail before any work starts."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from metallo_core.errors import TrackingError
from metallo_core.user_paths import expand_env_path

ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
ENV_HOME = "METALLO_HOME"
# What MLflow reads to trust a server's certificate (its own settings; the probe goes through them).
ENV_SERVER_CERT = "MLFLOW_TRACKING_SERVER_CERT_PATH"
ENV_INSECURE_TLS = "MLFLOW_TRACKING_INSECURE_TLS"
PROBE_ENDPOINT = "/api/2.0/mlflow/experiments/search"


def local_home() -> Path:
    """Where embedded-default runs, artifacts and checkpoints live (`$METALLO_HOME` or ./metallo-runs)."""
    return Path(expand_env_path(ENV_HOME) or Path.cwd() / "metallo-runs").resolve()


def tracking_uri() -> str:
    """`$MLFLOW_TRACKING_URI`, else the embedded sqlite store `sqlite:///<local_home()>/mlflow.db`."""
    uri = os.environ.get(ENV_TRACKING_URI)
    if uri:
        return uri
    return f"sqlite:///{local_home() / 'mlflow.db'}"


ENV_USERNAME, ENV_PASSWORD = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """(the URI without its `user:password@` part, the user, the password) of an http(s) tracking URI."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    parsed = urlsplit(uri)
    if parsed.scheme not in ("http", "https") or "@" not in parsed.netloc:
        return uri, None, None
    userinfo, _, host = parsed.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    return urlunsplit(parsed._replace(netloc=host)), unquote(user) or None, unquote(password) or None


def shown_uri(uri: str | None = None) -> str:
    """The tracking URI as it may be shown (printed, logged, written to a report): without `user:password@`."""
    return split_credentials(uri or tracking_uri())[0]


def is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def local_store_path(uri: str) -> Path | None:
    """The file or folder a local store lives in (sqlite database, file store), None for a server."""
    if uri.startswith("sqlite:"):
        path = uri.removeprefix("sqlite:").removeprefix("//").removeprefix("/")
        # sqlite:////abs/x -> /abs/x (absolute); sqlite:///rel/x -> rel/x (relative to the working directory)
        return Path(path) if uri.startswith("sqlite:////") or path.startswith("/") else Path(path).resolve()
    if uri.startswith("file:"):
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(uri).path))
    if "://" not in uri:
        return Path(uri).expanduser().resolve()
    return None


def describe_store() -> str:
    """Where look-ups go and why, for error messages: the URI and the setting it came from."""
    uri = shown_uri()
    if os.environ.get(ENV_TRACKING_URI):
        return f"{uri} (from {ENV_TRACKING_URI})"
    if os.environ.get(ENV_HOME):
        return f"{uri} (from {ENV_HOME}={os.environ[ENV_HOME]})"
    return f"{uri} ({ENV_HOME} and {ENV_TRACKING_URI} unset: ./metallo-runs under the working directory {Path.cwd()})"


def how_to_point_at_a_store() -> str:
    return (f"point metallo at the store that holds it: run from the folder that holds metallo-runs/, or set "
            f"{ENV_HOME}=/path/to/metallo-runs, or {ENV_TRACKING_URI}=sqlite:////path/to/metallo-runs/mlflow.db "
            "(or a server's http://host:port)")


def require_existing_store(uri: str | None = None) -> None:
    """Fail, creating nothing, when a local store does not exist: a look-up (a model, a run) can only find
    what is already stored, and MLflow would otherwise create an empty store wherever it was pointed."""
    uri = uri or tracking_uri()
    path = local_store_path(uri)
    if path is not None and not path.exists():
        raise TrackingError(f"no MLflow store at {path}: looked in {describe_store()}; nothing was created. "
                            + how_to_point_at_a_store())


_configured_uri: str | None = None


def configure(*, create: bool = True) -> str:
    """Point MLflow at the tracking store, export it for Ray workers, and fail fast if a server is unreachable.
    Returns the URI MLflow was given.

    A server URI's `user:password@` part is handed to MLflow as MLFLOW_TRACKING_USERNAME / _PASSWORD (unless
    those are set) and the URI without it: MLflow prints the URI it was given ("View run ... at <uri>") into
    job logs. `create=False` is for look-ups (loading a model, reading a run): a local store that does not exist
    is an error naming where it was looked for (see `require_existing_store`) instead of a new empty store."""
    global _configured_uri
    import mlflow

    uri = tracking_uri()
    plain_uri, user, password = split_credentials(uri)
    for variable, value in ((ENV_USERNAME, user), (ENV_PASSWORD, password)):
        if value and not os.environ.get(variable):
            os.environ[variable] = value
    if not create:
        require_existing_store(uri)
    if uri.startswith("sqlite:") and create:
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    elif uri.startswith(("http://", "https://")) and _configured_uri != plain_uri:
        check_server(plain_uri)
    mlflow.set_tracking_uri(plain_uri)
    os.environ[ENV_TRACKING_URI] = uri  # Ray workers and subprocesses log to the same place
    _configured_uri = plain_uri
    return plain_uri


def check_server(uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast (TrackingError) on an unreachable server, a certificate it cannot trust, or refused credentials.

    The probe is an authenticated read of one experiment (`/health` stays open under basic auth), sent along
    MlflowClient's own request path: the host credentials MLflow builds from its environment (username and
    password or token, an `MLFLOW_TRACKING_AUTH` plugin, `MLFLOW_TRACKING_SERVER_CERT_PATH`,
    `MLFLOW_TRACKING_INSECURE_TLS`, a client certificate) and its HTTP session. It asks once, waiting at most
    `timeout_s` seconds: MlflowClient's default of 7 retries with exponential back-off would take minutes to
    report a wrong URI. Later calls keep MLflow's retries."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        response = http_request(get_default_host_creds(uri), PROBE_ENDPOINT, "GET", max_retries=0,
                                timeout=timeout_s, retry_codes=frozenset(), params={"max_results": 1})
    except MlflowException as exc:
        uri = shown_uri(uri)
        causes = _causes(exc)
        reason = causes[-1]  # the socket or TLS error itself, e.g. "[Errno 111] Connection refused"
        hint = ""
        if any(isinstance(cause, ssl.SSLError) for cause in causes):
            hint = (f"; a server behind a private CA needs {ENV_SERVER_CERT}=/path/to/ca.pem "
                    f"(or {ENV_INSECURE_TLS}=true to skip verification)")
        raise TrackingError(f"MLflow server {uri} cannot be reached ({reason}){hint}; " + _check_the_uri()) from exc
    if response.status_code == 200:
        return
    uri = shown_uri(uri)
    if response.status_code in (401, 403):
        raise TrackingError(
            f"MLflow server {uri} refused the credentials (HTTP {response.status_code}); set MLFLOW_TRACKING_USERNAME "
            "and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
        )
    raise TrackingError(f"MLflow server {uri} answered HTTP {response.status_code}; " + _check_the_uri())


def _check_the_uri() -> str:
    return f"check {ENV_TRACKING_URI} (unset it to use the local sqlite store under {local_home()})"


def _causes(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions behind it, outermost first (MLflow wraps requests' errors, which wrap
    urllib3's, which hold the socket or TLS error as `.reason`)."""
    chain = [exc]
    while len(chain) < 20:
        current = chain[-1]
        following = current.__cause__ or current.__context__
        reason = getattr(current, "reason", None)
        if following is None and isinstance(reason, BaseException):
            following = reason
        if following is None or following in chain:
            break
        chain.append(following)
    return chain


def client(*, create: bool = True):
    """An MlflowClient on the configured store; `create=False` for look-ups (see `configure`)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=configure(create=create))


def lookup_client():
    """A client for reading what is stored (models, runs): never creates a store."""
    return client(create=False)


def ensure_experiment(name: str) -> str:
    """The id of experiment `name`, created if needed (artifacts in the local home for local stores)."""
    mlflow_client = client()
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if is_local_store(tracking_uri()):
        artifact_location = (local_home() / "artifacts" / name).as_uri()
    try:
        return mlflow_client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # another process created it first (mlflow#4123)
        experiment = mlflow_client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def ui_command() -> str:
    """The command that opens the runs in a browser: `mlflow ui` on the local store, or the server's address."""
    uri = shown_uri()
    if uri.startswith("sqlite:"):
        return f"uv run mlflow ui --backend-store-uri {uri} --port 5000"
    return f"open {uri}"
