"""Feature extractors by library and architecture name: torchvision and timm classification networks with
their classifier removed, so `forward` maps normalised images (B, 3, H, W) to pooled features (B, D).

Supported torchvision families: ResNet / Wide-ResNet / ResNeXt (`fc`), ConvNeXt (`classifier[2]`),
EfficientNet (`classifier`), ViT (`heads`, built for the spec's image size) and Swin (`head`). Any timm
model name works (`num_classes=0` gives pooled features); timm ViTs are built with `dynamic_img_size`
so they accept any multiple of the patch size, with position embeddings interpolated.
"""

from __future__ import annotations

from functools import cache
from typing import Any, Literal

import torch
from torch import nn

from metallo_core.errors import ConfigError

Library = Literal["torchvision", "timm"]
LIBRARIES: tuple[str, ...] = ("torchvision", "timm")
# torchvision families and the attribute path of their classifier (replaced by Identity).
TORCHVISION_FAMILIES: dict[str, str] = {
    "resnet": "fc",
    "wide_resnet": "fc",
    "resnext": "fc",
    "convnext_": "classifier.2",
    "efficientnet_": "classifier",
    "vit_": "heads",
    "swin_": "head",
}


def torchvision_family(arch: str) -> str | None:
    """The family prefix of a torchvision classification architecture, or None when unsupported."""
    from torchvision import models

    if arch not in models.list_models(module=models):
        return None
    return next((prefix for prefix in TORCHVISION_FAMILIES if arch.startswith(prefix)), None)


def check_architecture(library: str, arch: str) -> None:
    """ConfigError unless `library` can build `arch`; names what would work."""
    if library not in LIBRARIES:
        raise ConfigError(f"backbone.library must be one of {list(LIBRARIES)}, got {library!r}")
    if library == "torchvision":
        if torchvision_family(arch) is None:
            raise ConfigError(
                f"backbone.arch {arch!r} is not a supported torchvision classification model; use a ResNet "
                "(resnet18/34/50/101/152, wide_resnet50_2, resnext50_32x4d), convnext_tiny/small/base/large, "
                "efficientnet_b0..b7 / efficientnet_v2_s, vit_b_16/vit_l_16 or swin_t/s/b, or library: timm")
        return
    import timm

    if not timm.is_model(arch):
        raise ConfigError(
            f"backbone.arch {arch!r} is not a timm model name (see timm.list_models()); e.g. "
            "vit_small_patch16_224, vit_base_patch16_224, convnext_tiny, tf_efficientnet_lite0, resnet50")


def build_feature_extractor(library: str, arch: str, image_size: int) -> nn.Module:
    """A randomly initialised `arch` from `library` whose forward returns pooled features."""
    check_architecture(library, arch)
    if library == "timm":
        import timm

        kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0}
        if is_timm_vit(arch):
            kwargs["dynamic_img_size"] = True
        return timm.create_model(arch, **kwargs)
    from torchvision import models

    family = torchvision_family(arch)
    kwargs = {"image_size": image_size} if family == "vit_" else {}
    network = getattr(models, arch)(weights=None, **kwargs)
    _replace(network, TORCHVISION_FAMILIES[family], nn.Identity())
    return network


def is_timm_vit(arch: str) -> bool:
    return arch.startswith(("vit_", "deit_", "deit3_"))


@cache
def feature_dim(library: str, arch: str) -> int:
    """Width D of the pooled features, read from a network built on the meta device (no memory, no init)."""
    check_architecture(library, arch)
    with torch.device("meta"):
        if library == "timm":
            import timm

            return int(timm.create_model(arch, pretrained=False, num_classes=0).num_features)
        from torchvision import models

        family = torchvision_family(arch)
        network = getattr(models, arch)(weights=None)
        if family == "vit_":
            return int(network.hidden_dim)
        classifier = _get(network, TORCHVISION_FAMILIES[family])
        linear = classifier if isinstance(classifier, nn.Linear) else [m for m in classifier.modules()
                                                                        if isinstance(m, nn.Linear)][-1]
        return int(linear.in_features)


def classifier_prefixes(library: str, arch: str) -> tuple[str, ...]:
    """State-dict key prefixes of the classifier that `build_feature_extractor` removes; weights files
    carry them, and they are dropped before loading. timm ConvNeXt keeps `head.norm` (used for features)."""
    if library == "torchvision":
        family = torchvision_family(arch) or ""
        path = TORCHVISION_FAMILIES.get(family, "fc")
        return (path + ".",)
    return ("fc.", "classifier.", "head.fc.", "head.weight", "head.bias", "head_dist.", "heads.")


def _get(module: nn.Module, path: str) -> nn.Module:
    for name in path.split("."):
        module = module[int(name)] if name.isdigit() else getattr(module, name)
    return module


def _replace(module: nn.Module, path: str, replacement: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = _get(module, parent_path) if parent_path else module
    if name.isdigit():
        parent[int(name)] = replacement
    else:
        setattr(parent, name, replacement)
