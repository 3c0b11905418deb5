"""DINO multi-crop: 2 global and N local views of each base image, as batched tensor ops on any device.

Views come back view-major (all images' view 0, then all images' view 1, ...), the layout DINO's loss
chunks by view.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from metallo_core.config import require
from metallo_core.data import tensor_augment as aug
from metallo_core.models.backbones import IMAGENET_MEAN, IMAGENET_STD

GLOBAL_VIEWS = 2
# DINO's blur sigmas, (0.1, 2.0) px, are pixels of its 224-px global crops (torchvision GaussianBlur on the
# resized crop). Views of a smaller global size see the same image content in fewer pixels, so the sigmas
# scale with global_size / 224: unscaled, a 2-px blur on a 32-px crop is a 14-px blur at 224 px, which
# wipes out the fine texture the views must agree on.
BLUR_REFERENCE_SIZE = 224
# Quarter turns and vertical flips are true symmetries of a micrograph; used when micrograph=True and unset.
MICROGRAPH_SYMMETRY_P = 0.5


@dataclass
class MultiCropConfig:
    global_size: int = 224
    local_size: int = 96
    local_crops: int = 6
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    color_jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    solarize_p: float = 0.2  # second global view only, as in DINO
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)  # global view 1, global view 2, local views
    # Blur sigma range in pixels of a 224-px global crop (DINO's); scaled by global_size / 224 for all views.
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    hflip_p: float = 0.5
    vflip_p: float | None = None  # None: 0.5 for micrographs, else 0
    rot90_p: float | None = None  # None: 0.5 for micrographs, else 0
    # Grayscale micrographs: hue and saturation jitter are skipped (they would tint a grey image).
    micrograph: bool = False
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def effective_blur_sigma(self) -> tuple[float, float]:
        """The blur sigma range in pixels of this config's views: blur_sigma * global_size / 224."""
        factor = self.global_size / BLUR_REFERENCE_SIZE
        return self.blur_sigma[0] * factor, self.blur_sigma[1] * factor

    @property
    def effective_vflip_p(self) -> float:
        return _symmetry_p(self.vflip_p, self.micrograph)

    @property
    def effective_rot90_p(self) -> float:
        return _symmetry_p(self.rot90_p, self.micrograph)

    def validate(self) -> None:
        require(self.global_size >= 8, f"multicrop.global_size must be >= 8 pixels, got {self.global_size}")
        require(self.local_size >= 8, f"multicrop.local_size must be >= 8 pixels, got {self.local_size}")
        require(self.local_crops >= 0, f"multicrop.local_crops must be >= 0, got {self.local_crops}")
        for name in ("global_scale", "local_scale"):
            low, high = getattr(self, name)
            require(0 < low <= high <= 1, f"multicrop.{name} must satisfy 0 < low <= high <= 1, got {(low, high)}")
        for name in ("color_jitter_p", "grayscale_p", "solarize_p", "hflip_p", "vflip_p", "rot90_p"):
            value = getattr(self, name)
            require(value is None or 0 <= value <= 1, f"multicrop.{name} must be a probability in [0, 1], got {value}")
        require(len(self.blur_p) == 3 and all(0 <= p <= 1 for p in self.blur_p),
                f"multicrop.blur_p must be 3 probabilities in [0, 1] (global 1, global 2, local), got {self.blur_p}")
        require(len(self.blur_sigma) == 2 and 0 < self.blur_sigma[0] <= self.blur_sigma[1],
                f"multicrop.blur_sigma must be (low, high) with 0 < low <= high, got {self.blur_sigma}")
        for name in ("brightness", "contrast", "saturation"):
            require(getattr(self, name) >= 0, f"multicrop.{name} must be >= 0, got {getattr(self, name)}")
        require(0 <= self.hue <= 0.5, f"multicrop.hue must be in [0, 0.5] (a fraction of a turn), got {self.hue}")
        require(len(self.mean) == 3 and len(self.std) == 3, "multicrop.mean and multicrop.std need 3 values (RGB)")
        require(all(s > 0 for s in self.std), f"multicrop.std must be positive, got {self.std}")


def view_counts(config: MultiCropConfig) -> tuple[int, int]:
    """(global views, local views) per image."""
    return GLOBAL_VIEWS, config.local_crops


class MultiCropAugment:
    """Turns a uint8 batch of square base images into DINO's global and local views."""

    def __init__(self, config: MultiCropConfig):
        config.validate()
        self.config = config

    def __call__(self, base_images_uint8: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(global (2B, 3, G, G), local (local_crops*B, 3, L, L)), float and normalised, view-major."""
        global_views, local_views = self._views(base_images_uint8, generator)
        return self._normalize(global_views), self._normalize(local_views)

    def to_uint8_views(self, base_images_uint8: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """The same views unnormalised as uint8 (4x smaller to ship from CPU workers); finish on the
        training device with `normalize_uint8_views`."""
        global_views, local_views = self._views(base_images_uint8, generator)
        return aug.to_uint8(global_views), aug.to_uint8(local_views)

    def normalize_uint8_views(self, global_views: Tensor, local_views: Tensor) -> tuple[Tensor, Tensor]:
        return self._normalize(aug.to_float(global_views)), self._normalize(aug.to_float(local_views))

    def _normalize(self, views: Tensor) -> Tensor:
        return aug.normalize(views, self.config.mean, self.config.std)

    def _views(self, base_images_uint8: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        if base_images_uint8.dtype != torch.uint8 or base_images_uint8.dim() != 4 or base_images_uint8.shape[1] != 3:
            raise ValueError(
                f"multi-crop expects uint8 base images shaped (B, 3, S, S), got "
                f"{base_images_uint8.dtype} {tuple(base_images_uint8.shape)}"
            )
        config = self.config
        base = aug.to_float(base_images_uint8)
        batch = base.shape[0]
        global_views = self._crops(base, GLOBAL_VIEWS, config.global_size, config.global_scale, generator)
        global_views = self._colour(global_views, generator)
        global_views = aug.gaussian_blur(global_views, p=_per_view(config.blur_p[:2], batch),
                                          sigma=config.effective_blur_sigma, generator=generator)
        global_views = aug.solarize(global_views, p=_per_view((0.0, config.solarize_p), batch), generator=generator)
        local_views = self._crops(base, config.local_crops, config.local_size, config.local_scale, generator)
        if config.local_crops:
            local_views = self._colour(local_views, generator)
            local_views = aug.gaussian_blur(local_views, p=config.blur_p[2], sigma=config.effective_blur_sigma,
                                             generator=generator)
        return global_views, local_views

    def _crops(self, base: Tensor, views: int, size: int, scale: tuple[float, float],
               generator: torch.Generator) -> Tensor:
        """`views` crops of every image, view-major. One resample per view: the batch is the vector axis."""
        if views == 0:
            return base.new_empty(0, base.shape[1], size, size)
        config = self.config
        return torch.cat([
            aug.random_resized_crop(base, size, scale=scale, hflip_p=config.hflip_p, vflip_p=config.effective_vflip_p,
                                    rot90_p=config.effective_rot90_p, generator=generator)
            for _ in range(views)
        ])

    def _colour(self, views: Tensor, generator: torch.Generator) -> Tensor:
        config = self.config
        if config.micrograph:
            views = aug.brightness_contrast(views, config.brightness, config.contrast, p=config.color_jitter_p,
                                            generator=generator)
        else:
            views = aug.color_jitter(views, config.brightness, config.contrast, config.saturation, config.hue,
                                     p=config.color_jitter_p, generator=generator)
        return aug.random_grayscale(views, p=config.grayscale_p, generator=generator)


def _symmetry_p(value: float | None, micrograph: bool) -> float:
    if value is not None:
        return value
    return MICROGRAPH_SYMMETRY_P if micrograph else 0.0


def _per_view(probabilities: tuple[float, ...], batch: int) -> Tensor:
    """Per-sample probabilities for view-major rows: view k's probability repeated for its `batch` rows."""
    return torch.tensor(probabilities, dtype=torch.float32).repeat_interleave(batch)
