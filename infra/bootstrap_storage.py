"""Create the S3 buckets metallo expects and prove this machine can use them.

    uv run python -m infra.bootstrap_storage                      # create if missing, then probe
    uv run python -m infra.bootstrap_storage --check              # probe only, create nothing
    uv run python -m infra.bootstrap_storage --data s3://acme-metallo-data --runs s3://acme-metallo-runs/ray

For every location (data shards, Ray run storage with checkpoints, MLflow artifacts) it creates the
bucket if needed (idempotent), writes the prefix's directory marker, then writes, reads back, lists and
deletes a probe object. Credentials come only from the standard AWS chain and are never printed; the
endpoint comes from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (unset for AWS itself).
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from dataclasses import dataclass, field

from metallo_core.errors import StorageError
from metallo_core.storage import ENDPOINT_VARIABLES, s3_endpoint

# The layout the configs under configs/ assume. Bucket names are global on AWS: pass your own.
DEFAULT_LOCATIONS = {
    "data": "s3://metallo-data",  # dataset shards (data.uri in configs)
    "runs": "s3://metallo-runs/ray",  # Ray Train/Tune storage: checkpoints (run.storage in configs)
    "mlflow": "s3://metallo-mlflow/artifacts",  # the MLflow server's --artifacts-destination
}

_CREDENTIAL_ERRORS = (
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "InvalidClientTokenId",
    "AccessDenied",
    "AllAccessDisabled",
    "403",
)


@dataclass(frozen=True)
class Location:
    role: str
    bucket: str
    prefix: str

    @classmethod
    def parse(cls, role: str, uri: str) -> Location:
        if not uri.startswith("s3://") or not uri[len("s3://"):].strip("/"):
            raise StorageError(f"--{role} {uri!r} is not an s3://bucket[/prefix] URI")
        bucket, _, prefix = uri[len("s3://"):].strip("/").partition("/")
        return cls(role, bucket, prefix)

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name


@dataclass
class LocationReport:
    location: Location
    bucket_state: str  # "created" | "existed"
    checks: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"  {self.location.role:<7} {self.location.uri:<36} bucket {self.bucket_state:<8} "
                f"{' '.join(self.checks)}")


@dataclass
class BootstrapReport:
    store: str
    credentials: str
    locations: list[LocationReport]

    def text(self) -> str:
        lines = [f"S3 store: {self.store}; credentials from: {self.credentials}"]
        lines += [report.line() for report in self.locations]
        lines.append("storage ready")
        return "\n".join(lines)


def describe_store(region: str | None = None) -> str:
    endpoint = s3_endpoint()
    if endpoint:
        variable = next(name for name in ENDPOINT_VARIABLES if os.environ.get(name))
        return f"endpoint {endpoint} (from {variable})"
    return f"AWS S3 in {region or 'the default region'} (set AWS_ENDPOINT_URL for an S3-compatible store)"


def _endpoint_variable() -> str:
    return next((name for name in ENDPOINT_VARIABLES if os.environ.get(name)), "AWS_ENDPOINT_URL")


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def s3_client(session=None):
    """A boto3 S3 client for the configured store that fails in seconds, not minutes."""
    import boto3
    from botocore.config import Config

    endpoint = s3_endpoint()
    config = Config(
        connect_timeout=5,
        read_timeout=30,
        retries={"max_attempts": 2, "mode": "standard"},
        # S3-compatible servers (moto, MinIO) are rarely reachable as <bucket>.<host>.
        s3={"addressing_style": "path"} if endpoint else None,
    )
    session = session or boto3.session.Session(region_name=_region())
    return session.client("s3", endpoint_url=endpoint, config=config)


def explain(exc: Exception, action: str, target: str) -> StorageError:
    """A StorageError naming the store, the endpoint variable or the credential variables to fix."""
    from botocore import exceptions as boto_errors

    store = describe_store(_region())
    if isinstance(exc, (boto_errors.EndpointConnectionError, boto_errors.ConnectTimeoutError,
                        boto_errors.ReadTimeoutError, boto_errors.ConnectionClosedError)):
        return StorageError(
            f"cannot {action} {target}: nothing answers at {store}; check {_endpoint_variable()} and the network"
        )
    if isinstance(exc, (boto_errors.NoCredentialsError, boto_errors.PartialCredentialsError)):
        return StorageError(
            f"cannot {action} {target} at {store}: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or give the machine an instance role / IRSA"
        )
    if isinstance(exc, boto_errors.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        if code in _CREDENTIAL_ERRORS or status == "403":
            return StorageError(
                f"cannot {action} {target} at {store}: the credentials were refused ({code or status}); check "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE / the instance role) and the bucket policy"
            )
        if code == "BucketAlreadyExists":
            return StorageError(
                f"cannot {action} {target}: the bucket name belongs to another account at {store}; "
                "bucket names are global, pick another (--data/--runs/--mlflow)"
            )
        if code in ("NoSuchBucket", "404"):
            return StorageError(
                f"cannot {action} {target}: the bucket does not exist at {store}; run "
                "`python -m infra.bootstrap_storage` without --check to create it"
            )
        return StorageError(f"cannot {action} {target} at {store}: {code or status} {error.get('Message', '')}".strip())
    if isinstance(exc, boto_errors.BotoCoreError):
        return StorageError(f"cannot {action} {target} at {store}: {exc}")
    raise exc


def ensure_bucket(client, location: Location, create: bool) -> str:
    """'existed' or 'created'; idempotent, safe to run from several machines at once."""
    from botocore.exceptions import ClientError

    try:
        client.head_bucket(Bucket=location.bucket)
        return "existed"
    except ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code")) not in ("404", "NoSuchBucket", "NotFound") or not create:
            raise explain(exc, "reach bucket", f"s3://{location.bucket}") from exc
    except Exception as exc:
        raise explain(exc, "reach bucket", f"s3://{location.bucket}") from exc
    arguments: dict = {"Bucket": location.bucket}
    region = _region()
    if region != "us-east-1" and not s3_endpoint():
        arguments["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        client.create_bucket(**arguments)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "BucketAlreadyOwnedByYou":  # another bootstrap won the race
            return "existed"
        raise explain(exc, "create bucket", f"s3://{location.bucket}") from exc
    except Exception as exc:
        raise explain(exc, "create bucket", f"s3://{location.bucket}") from exc
    return "created"


def probe(client, location: Location) -> list[str]:
    """Write, read back, list and delete one small object under the prefix; the checks that passed."""
    key = location.key(f".metallo-probe-{uuid.uuid4().hex}")
    body = f"metallo storage probe {uuid.uuid4().hex}".encode()
    target = f"s3://{location.bucket}/{key}"
    checks = []
    steps = (
        ("write", lambda: client.put_object(Bucket=location.bucket, Key=key, Body=body)),
        ("read", lambda: _read_back(client, location.bucket, key, body, target)),
        ("list", lambda: _listed(client, location, key, target)),
        ("delete", lambda: client.delete_object(Bucket=location.bucket, Key=key)),
    )
    try:
        for name, step in steps:
            step()
            checks.append(f"{name}:ok")
    except StorageError:
        raise
    except Exception as exc:
        raise explain(exc, name, target) from exc
    finally:
        if checks and checks[-1] != "delete:ok":
            try:
                client.delete_object(Bucket=location.bucket, Key=key)
            except Exception:  # noqa: BLE001 - the error that got us here is the one worth reporting
                pass
    return checks


def _read_back(client, bucket: str, key: str, body: bytes, target: str) -> None:
    if client.get_object(Bucket=bucket, Key=key)["Body"].read() != body:
        raise StorageError(f"{target} read back different bytes than were written; the store is not consistent")


def _listed(client, location: Location, key: str, target: str) -> None:
    prefix = location.key("") if location.prefix else ""
    listing = client.list_objects_v2(Bucket=location.bucket, Prefix=prefix + ".metallo-probe-")
    if key not in {item["Key"] for item in listing.get("Contents", [])}:
        raise StorageError(f"{target} was written but does not appear when listing s3://{location.bucket}/{prefix}")


def bootstrap(locations: dict[str, str] | None = None, *, create: bool = True) -> BootstrapReport:
    """Create (unless `create` is False) and check every location; raises StorageError naming what to fix."""
    import boto3

    parsed = [Location.parse(role, uri) for role, uri in (locations or DEFAULT_LOCATIONS).items()]
    session = boto3.session.Session(region_name=_region())
    credentials = session.get_credentials()  # only where they came from is ever shown
    if credentials is None:
        raise explain(_no_credentials(), "use", "the S3 store")
    client = s3_client(session)
    reports = []
    for location in parsed:
        state = ensure_bucket(client, location, create)
        if create and location.prefix:
            # The "directory" marker pyarrow writes for create_dir, so `locate(uri).exists()` holds.
            try:
                client.put_object(Bucket=location.bucket, Key=location.prefix + "/", Body=b"")
            except Exception as exc:
                raise explain(exc, "write", f"{location.uri}/") from exc
        reports.append(LocationReport(location, state, probe(client, location)))
    return BootstrapReport(describe_store(_region()), getattr(credentials, "method", "unknown"), reports)


def _no_credentials() -> Exception:
    from botocore.exceptions import NoCredentialsError

    return NoCredentialsError()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.bootstrap_storage", description=__doc__.split("\n")[0])
    for role, uri in DEFAULT_LOCATIONS.items():
        parser.add_argument(f"--{role}", default=uri, metavar="S3_URI", help=f"{role} location (default {uri})")
    parser.add_argument("--check", action="store_true", help="create nothing; fail if a bucket is missing")
    args = parser.parse_args(argv)
    try:
        report = bootstrap({role: getattr(args, role) for role in DEFAULT_LOCATIONS}, create=not args.check)
    except StorageError as exc:
        print(f"bootstrap_storage: error: {exc}", file=sys.stderr)
        return 2
    print(report.text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
