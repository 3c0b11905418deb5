"""Where bytes live: local directories and `s3://bucket/prefix`, behind one pyarrow filesystem API.

Credentials come only from the standard AWS chain (environment, config files, instance roles); this
module never takes, stores or prints them. S3-compatible stores are reached through the standard
`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` variables, which boto3 honours but pyarrow ignores, so we
pass them to pyarrow explicitly.
"""

from __future__ import annotations

import copy
import os
import posixpath
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

from metallo_core.errors import StorageError
from metallo_core.user_paths import expand_path

T = TypeVar("T")

ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def s3_endpoint() -> str | None:
    """The S3 endpoint override from the environment, or None for AWS itself."""
    for variable in ENDPOINT_VARIABLES:
        if os.environ.get(variable):
            return os.environ[variable]
    return None


def s3_filesystem() -> pafs.S3FileSystem:
    endpoint = s3_endpoint()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    kwargs: dict = {"connect_timeout": 10, "request_timeout": 60}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme or "https"
        region = region or "us-east-1"
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def describe_s3_target() -> str:
    endpoint = s3_endpoint()
    return f"endpoint {endpoint} (from {'/'.join(ENDPOINT_VARIABLES)})" if endpoint else "AWS S3"


@dataclass(frozen=True)
class Location:
    """A directory-like place: a filesystem plus a path on it, and the URI the user gave."""

    uri: str
    fs: pafs.FileSystem
    path: str

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    def join(self, *parts: str) -> Location:
        path = posixpath.join(self.path, *parts)
        uri = posixpath.join(self.uri, *parts)
        return Location(uri=uri, fs=self.fs, path=path)

    def exists(self) -> bool:
        return self._info(self.path).type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info(self.path).type == pafs.FileType.File

    def size(self) -> int:
        info = self._info(self.path)
        if info.type != pafs.FileType.File:
            raise StorageError(f"{self.uri} does not exist")
        return info.size

    def read_bytes(self) -> bytes:
        try:
            if not self.is_s3:  # Python's open() takes any local name; pyarrow only UTF-8 ones
                return Path(self.path).read_bytes()
            with self.fs.open_input_stream(self.path) as stream:
                return stream.read()
        except FileNotFoundError as exc:
            raise StorageError(f"{self.uri} does not exist") from exc
        except OSError as exc:
            raise self._wrap(exc, "read") from exc

    def write_bytes(self, data: bytes) -> None:
        """Write a whole file so that readers see either the old content or the new, never a part."""
        try:
            if self.is_s3:
                # An S3 object only becomes visible when its upload completes.
                with self.fs.open_output_stream(self.path) as stream:
                    stream.write(data)
                return
            self.parent().makedirs()
            temporary = f"{self.path}.{uuid.uuid4().hex}.tmp"
            with self.fs.open_output_stream(temporary) as stream:
                stream.write(data)
            self.fs.move(temporary, self.path)
        except OSError as exc:
            raise self._wrap(exc, "write") from exc

    def open_output(self):
        try:
            if not self.is_s3:
                self.parent().makedirs()
            return self.fs.open_output_stream(self.path)
        except OSError as exc:
            raise self._wrap(exc, "write") from exc

    def open_input(self):
        try:
            return self.fs.open_input_file(self.path)
        except FileNotFoundError as exc:
            raise StorageError(f"{self.uri} does not exist") from exc
        except OSError as exc:
            raise self._wrap(exc, "read") from exc

    def parent(self) -> Location:
        return Location(uri=posixpath.dirname(self.uri.rstrip("/")), fs=self.fs, path=posixpath.dirname(self.path))

    def makedirs(self) -> None:
        if not self.is_s3:
            self.fs.create_dir(self.path, recursive=True)

    def list_files(self) -> list[str]:
        """Paths relative to this location of every file below it (empty if it does not exist)."""
        try:
            selector = pafs.FileSelector(self.path, recursive=True, allow_not_found=True)
            infos = self.fs.get_file_info(selector)
        except OSError as exc:
            raise self._wrap(exc, "list") from exc
        prefix = self.path.rstrip("/") + "/"
        return sorted(info.path[len(prefix):] for info in infos if info.type == pafs.FileType.File)

    def delete_file(self) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._wrap(exc, "delete") from exc

    def check_access(self) -> None:
        """Fail fast, naming the endpoint and the variables to fix, if the store cannot be reached."""
        if not self.is_s3:
            return
        bucket = self.path.split("/", 1)[0]
        try:
            info = self.fs.get_file_info(bucket)
        except OSError as exc:
            raise self._wrap(exc, "reach") from exc
        if info.type == pafs.FileType.NotFound:
            raise StorageError(
                f"bucket {bucket!r} does not exist at {describe_s3_target()}; create it "
                "(infra/bootstrap_storage.py does) or fix the URI"
            )

    def _info(self, path: str) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(path)
        except OSError as exc:
            raise self._wrap(exc, "reach") from exc

    def _wrap(self, exc: OSError, action: str) -> StorageError:
        if not self.is_s3:
            return StorageError(f"cannot {action} {self.uri}: {exc}")
        text = str(exc)
        if any(marker in text for marker in ("ACCESS_DENIED", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403")):
            hint = (
                "the credentials were refused; check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE / the instance role)"
            )
        elif any(marker in text for marker in ("NETWORK_CONNECTION", "Couldn't connect", "curlCode", "timed out")):
            hint = f"nothing answers at {describe_s3_target()}; check {ENDPOINT_VARIABLES[1]} and the network"
        else:
            hint = f"store: {describe_s3_target()}"
        return StorageError(f"cannot {action} {self.uri}: {hint} ({text.splitlines()[0] if text else exc!r})")


def locate(uri: str | os.PathLike) -> Location:
    """Resolve a local path or `s3://bucket/prefix` to a Location."""
    text = expand_path(os.fspath(uri), "the location")
    if text.startswith("s3://"):
        path = text[len("s3://"):].strip("/")
        if not path:
            raise StorageError(f"{text!r} names no bucket; use s3://bucket/prefix")
        return Location(uri=f"s3://{path}", fs=s3_filesystem(), path=path)
    if "://" in text and not text.startswith("file://"):
        raise StorageError(f"unsupported storage URI {text!r}: use a local path or s3://bucket/prefix")
    local = Path(text.removeprefix("file://")).expanduser().resolve()
    return Location(uri=str(local), fs=pafs.LocalFileSystem(), path=str(local))


def storage_for_ray(uri: str) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray's RunConfig: S3 gets our filesystem (endpoint aware)."""
    location = locate(uri)
    if location.is_s3:
        return location.path, location.fs
    return location.path, None


def with_absolute_uris(config: T, fields: tuple[str, ...]) -> T:
    """A copy of `config` whose location settings (dotted attribute paths such as `data.uri`, `run.storage`)
    are absolute URIs: a relative path is resolved against this process's working directory now, because
    Ray workers and later stages run in other directories. Empty settings stay empty."""
    resolved = copy.deepcopy(config)
    for dotted in fields:
        *parents, name = dotted.split(".")
        owner = resolved
        for parent in parents:
            owner = getattr(owner, parent)
        if getattr(owner, name):
            setattr(owner, name, locate(getattr(owner, name)).uri)
    return resolved
