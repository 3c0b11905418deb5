"""Ingesters: turn datasets in their usual on-disk layouts into metallo shards (see `metallo data ingest`)."""

from __future__ import annotations

from typing import Any

from metallo_core.data.ingest.common import IngestOptions
from metallo_core.data.manifest import Manifest
from metallo_core.errors import DataError

FORMATS = ("imagefolder", "miniimagenet", "imagenet", "cifar-fs")


def ingest(format_name: str, src: str, out: str, options: IngestOptions, **format_args: Any) -> Manifest:
    """Dispatch to the ingester of `format_name`; `format_args` are that ingester's own options."""
    if format_name == "imagefolder":
        from metallo_core.data.ingest.imagefolder import ingest_imagefolder

        return ingest_imagefolder(src, out, options, **format_args)
    if format_name == "miniimagenet":
        from metallo_core.data.ingest.miniimagenet import ingest_miniimagenet

        return ingest_miniimagenet(src, out, options, **format_args)
    if format_name == "imagenet":
        from metallo_core.data.ingest.imagenet import ingest_imagenet

        return ingest_imagenet(src, out, options, **format_args)
    if format_name == "cifar-fs":
        from metallo_core.data.ingest.cifar_fs import ingest_cifar_fs

        return ingest_cifar_fs(src, out, options, **format_args)
    raise DataError(f"unknown --format {format_name!r}; choose one of {', '.join(FORMATS)}")
