"""metallo_core.tracking: the embedded store, config logging, rank-0-only logging, run status."""

import base64
import http.server
import ipaddress
import json
import os
import ssl
import threading
from pathlib import Path

import pytest

from metallo_core import tracking


@pytest.fixture
def local_store(isolated_tracking):
    return isolated_tracking


def test_embedded_default_is_an_absolute_sqlite_store(local_store):
    uri = tracking.configure()
    assert uri == f"sqlite:///{local_store / 'mlflow.db'}"
    assert (local_store / "mlflow.db").parent.is_dir()


def test_run_logs_config_metrics_and_status(local_store):
    config = {"data": {"uri": "s3://bucket/ds"}, "epochs": 3}
    with tracking.start_run("unit", "first", config=config, tags={"stage": "test"}) as run:
        run.log_metrics({"loss": 1.5, "lr": 0.1}, step=2)
        run_id = run.run_id
    stored = tracking.client().get_run(run_id)
    assert stored.info.status == "FINISHED"
    assert stored.data.params == {"data.uri": "s3://bucket/ds", "epochs": "3"}
    assert stored.data.tags["stage"] == "test"
    assert stored.data.tags["metallo.version"].startswith("0.1.0")
    history = tracking.client().get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(2, 1.5)]
    artifacts = [a.path for a in tracking.client().list_artifacts(run_id)]
    assert "config.yaml" in artifacts
    experiment = tracking.client().get_experiment(stored.info.experiment_id)
    assert experiment.artifact_location.startswith((local_store / "artifacts").as_uri())


def test_failed_body_marks_run_failed(local_store):
    with pytest.raises(ValueError):
        with tracking.start_run("unit", "broken") as run:
            run_id = run.run_id
            raise ValueError("boom")
    assert tracking.client().get_run(run_id).info.status == "FAILED"


def test_only_rank_zero_logs(local_store, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert isinstance(tracking.logger_for("abc"), tracking.NullLogger)
    tracking.logger_for("abc").log_metrics({"loss": 1.0})  # does nothing, raises nothing
    monkeypatch.setenv("RANK", "0")
    assert isinstance(tracking.logger_for("abc"), tracking.RunLogger)


def test_unreachable_server_fails_fast_naming_the_variable(monkeypatch):
    monkeypatch.setenv(tracking.ENV_TRACKING_URI, "http://127.0.0.1:9")
    with pytest.raises(tracking.TrackingError, match=r"127\.0\.0\.1:9 cannot be reached.*MLFLOW_TRACKING_URI"):
        tracking.configure()


def test_a_lookup_never_creates_a_store_and_names_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(tracking.ENV_HOME)
    with pytest.raises(tracking.TrackingError) as caught:
        tracking.lookup_client()
    message = str(caught.value)
    assert f"no MLflow store at {tmp_path / 'metallo-runs' / 'mlflow.db'}" in message
    assert (f"working directory {tmp_path}" in message and "METALLO_HOME=" in message
            and "MLFLOW_TRACKING_URI=" in message)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv(tracking.ENV_TRACKING_URI, f"file://{tmp_path / 'mlruns'}")
    with pytest.raises(tracking.TrackingError, match=r"mlruns.*\(from MLFLOW_TRACKING_URI\)"):
        tracking.configure(create=False)
    assert list(tmp_path.iterdir()) == []


def test_a_store_that_exists_is_found_by_lookups(local_store):
    tracking.configure()  # a writer creates the store
    tracking.client().create_experiment("unit")
    assert tracking.lookup_client().get_experiment_by_name("unit") is not None


@pytest.mark.parametrize("uri, path", [
    ("sqlite:////abs/metallo-runs/mlflow.db", "/abs/metallo-runs/mlflow.db"),
    ("file:///abs/mlruns", "/abs/mlruns"),
    ("http://mlflow:5000", None),
])
def test_local_store_paths(uri, path):
    assert tracking.local_store_path(uri) == (None if path is None else Path(path))


# ------------------------------------------------------------------------- the server probe (TLS, credentials)


def _self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by its own key (a private CA no system trust store knows)."""
    import datetime

    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "metallo test CA")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
def tls_server(tmp_path):
    """An HTTPS server on 127.0.0.1 answering MLflow's experiment search, behind a self-signed certificate
    and basic auth (user `ada`, password `lovelace`); yields (URI, certificate path)."""
    cert_path, key_path = _self_signed_certificate(tmp_path)
    expected = "Basic " + base64.b64encode(b"ada:lovelace").decode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.path.startswith("/api/2.0/mlflow/experiments/search")
            status = 401 if self.headers.get("Authorization") != expected else (200 if ok else 404)
            body = json.dumps({"experiments": []} if status == 200 else {"error_code": "UNAUTHENTICATED"}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}", cert_path
    server.shutdown()
    server.server_close()


def test_the_probe_trusts_a_private_ca_through_mlflows_own_tls_settings(tls_server, monkeypatch):
    uri, cert_path = tls_server
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ada")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "lovelace")
    for variable in ("MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_TRACKING_INSECURE_TLS", "REQUESTS_CA_BUNDLE",
                     "CURL_CA_BUNDLE"):
        monkeypatch.delenv(variable, raising=False)
    # Untrusted certificate: unreachable, and the message names the setting that fixes it.
    with pytest.raises(tracking.TrackingError, match=r"cannot be reached.*MLFLOW_TRACKING_SERVER_CERT_PATH"):
        tracking.check_server(uri)
    monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(cert_path))
    tracking.check_server(uri)  # trusted through MLflow's setting (a urllib probe ignored it)
    monkeypatch.delenv("MLFLOW_TRACKING_SERVER_CERT_PATH")
    monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "true")
    tracking.check_server(uri)


def test_the_probe_sends_mlflows_credentials_and_names_them_when_refused(tls_server, monkeypatch):
    uri, cert_path = tls_server
    monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(cert_path))
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ada")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
    with pytest.raises(tracking.TrackingError, match=r"refused the credentials \(HTTP 401\).*MLFLOW_TRACKING_USERNAME"):
        tracking.check_server(uri)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "lovelace")
    tracking.check_server(uri)


# ------------------------------------------------------------------------------- dataset lineage, registry


def test_a_run_that_reads_a_dataset_has_it_as_an_mlflow_dataset_input(local_store, tmp_path):
    from metallo_core.data.manifest import manifest_sha256
    from metallo_core.data.synth_dataset import write_fewshot

    uri = str(tmp_path / "tiny-ds")
    write_fewshot(uri, num_classes=11, images_per_class=2, size=16)
    digest = manifest_sha256(uri)
    tags = tracking.dataset_tags(uri, split="test")
    assert tags == {"metallo.dataset_uri": uri, "metallo.dataset_manifest_sha256": digest, "metallo.split": "test"}
    with tracking.open_run("unit", "reads-data", tags={"metallo.stage": "evaluate", **tags}) as run:
        run_id = run.run_id
    with tracking.open_run("unit", "reads-data", tags=tags):  # reopened: the input is not logged twice
        pass
    stored = tracking.client().get_run(run_id)
    assert stored.data.tags["metallo.dataset_manifest_sha256"] == digest  # `metallo report` reads the tags
    (entry,) = stored.inputs.dataset_inputs
    assert entry.dataset.name == "tiny-ds"
    assert entry.dataset.digest == digest[:36]  # MLflow keeps at most 36 characters of a digest
    assert json.loads(entry.dataset.source) == {"uri": uri}
    assert {tag.key: tag.value for tag in entry.tags} == {
        "manifest_sha256": digest, "split": "test", "mlflow.data.context": "evaluate"}
    with tracking.start_run("unit", "no-data") as run:
        pass
    assert tracking.client().get_run(run.run_id).inputs.dataset_inputs == []


def test_model_uris_are_parsed_once_and_an_alias_is_pinned_to_its_version(local_store):
    from metallo_core.tracking.registry import ModelRef, parse_model_uri, pin_model_uri

    assert parse_model_uri("models:/metallo-backbone@current") == ModelRef("metallo-backbone", "current", None)
    assert parse_model_uri("models:/metallo-backbone/3") == ModelRef("metallo-backbone", None, "3")
    for other in ("runs:/abc/backbone", "models:/m-0123", "m-0123", "/path/w.pth", "models:/a@b/c"):
        assert parse_model_uri(other) is None and pin_model_uri(other) == other
    mlflow_client = tracking.client()
    mlflow_client.create_registered_model("pinned")
    for _ in range(2):
        mlflow_client.create_model_version("pinned", source=(local_store / "weights").as_uri())
    mlflow_client.set_registered_model_alias("pinned", "current", "1")
    assert pin_model_uri("models:/pinned@current") == "models:/pinned/1"
    assert pin_model_uri("models:/pinned/2") == "models:/pinned/2"
    with pytest.raises(tracking.TrackingError, match=r"no alias 'gone'; its aliases: @current -> v1"):
        pin_model_uri("models:/pinned@gone")


def test_log_batch_is_left_to_mlflow_even_past_its_request_limits(local_store):
    with tracking.start_run("unit", "many") as run:
        run.log_params({f"p{index}": index for index in range(250)})  # the REST limit is 100 per request
        run.log_metrics({f"m{index}": float(index) for index in range(1200)}, step=1)  # and 1000 metrics
        run_id = run.run_id
    stored = tracking.client().get_run(run_id)
    assert len(stored.data.params) == 250 and stored.data.params["p249"] == "249"
    assert len(stored.data.metrics) == 1200 and stored.data.metrics["m1199"] == 1199.0


def test_a_password_in_the_tracking_uri_is_kept_out_of_what_is_shown_and_what_mlflow_is_given(monkeypatch):
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv(tracking.ENV_TRACKING_URI, f"http://ada:s3cr%40t@127.0.0.1:{port}/mlflow")
    for variable in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(variable, "")  # recorded, so configure()'s export is undone after the test
        monkeypatch.delenv(variable)
    assert tracking.split_credentials(tracking.tracking_uri()) == (f"http://127.0.0.1:{port}/mlflow", "ada", "s3cr@t")
    assert tracking.ui_command() == f"open http://127.0.0.1:{port}/mlflow"
    assert "s3cr" not in tracking.describe_store() and "ada" not in tracking.describe_store()
    with pytest.raises(tracking.TrackingError, match=f"MLflow server http://127.0.0.1:{port}/mlflow cannot") as caught:
        tracking.configure()
    assert "s3cr" not in str(caught.value)
    # MLflow gets the credentials from its own variables, never inside the URI it prints ("View run ... at").
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "ada" and os.environ["MLFLOW_TRACKING_PASSWORD"] == "s3cr@t"
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "from-the-environment")  # set variables win over the URI
    with pytest.raises(tracking.TrackingError):
        tracking.configure()
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "from-the-environment"
    assert tracking.split_credentials("sqlite:////a/b.db") == ("sqlite:////a/b.db", None, None)
