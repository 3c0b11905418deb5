"""Multi-crop blur strength scales with the crop size, so small crops keep their texture.

DINO blurs its 224-px crops with sigma in (0.1, 2.0) px. Applied unscaled to 32-px crops that is a
14-px blur at 224 px, which erased the synthetic micrographs' texture and made DINO's k-NN accuracy
fall instead of rise; the sigmas are now pixels at 224 px, scaled by global_size / 224.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.functional as TF

from metallo_core.data import tensor_augment as aug
from metallo_core.ssl.multicrop import MultiCropAugment, MultiCropConfig

# Everything but the blur off, and whole-image crops of a base image already at the crop size: the
# global views are then the base image, blurred or not.
PLAIN = {"color_jitter_p": 0.0, "grayscale_p": 0.0, "solarize_p": 0.0, "hflip_p": 0.0, "vflip_p": 0.0,
         "rot90_p": 0.0, "global_scale": (1.0, 1.0), "local_crops": 0}


def grating(size: int, period: float) -> torch.Tensor:
    """(1, 3, size, size) uint8 vertical sine grating, mid-grey +- 100 levels."""
    x = torch.arange(size, dtype=torch.float32) + 0.5
    row = 127.5 + 100 * torch.sin(2 * math.pi * x / period)
    return row.round().to(torch.uint8).view(1, 1, 1, size).expand(1, 3, size, size).contiguous()


def first_global_view(config: MultiCropConfig, images: torch.Tensor) -> torch.Tensor:
    global_views, _ = MultiCropAugment(config)(images, torch.Generator().manual_seed(0))
    return aug.denormalize(global_views, config.mean, config.std)[0]


def modulation(view: torch.Tensor, period: float) -> float:
    """Amplitude of the grating's frequency in the view's mean row, relative to the unblurred 100/255,
    read away from the reflect-padded borders."""
    row = view[0].mean(dim=0)
    x = torch.arange(row.numel(), dtype=torch.float32) + 0.5
    inner = slice(8, row.numel() - 8)
    phase = 2 * math.pi * x[inner] / period
    centred = row[inner] - row[inner].mean()
    amplitude = 2 * torch.sqrt((centred * phase.sin()).mean() ** 2 + (centred * phase.cos()).mean() ** 2)
    return float(amplitude) / (100 / 255)


def test_sigmas_are_dinos_at_224_px_and_scale_with_the_crop():
    assert MultiCropConfig(global_size=224).effective_blur_sigma == pytest.approx((0.1, 2.0))
    assert MultiCropConfig(global_size=32).effective_blur_sigma == pytest.approx((0.1 / 7, 2.0 / 7))
    assert MultiCropConfig(global_size=32, blur_sigma=(1.0, 3.5)).effective_blur_sigma == pytest.approx((1 / 7, 0.5))


@pytest.mark.parametrize("size", [32, 224])
def test_blurred_view_is_the_view_blurred_with_the_scaled_sigma(size):
    # Oracle: torchvision's Gaussian blur (reflect padding) of the unblurred view with sigma * size / 224.
    sigma = 5.0  # 0.71 px at 32 px: a visible blur
    images = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    common = {**PLAIN, "global_size": size, "local_size": 8, "blur_sigma": (sigma, sigma)}
    plain = first_global_view(MultiCropConfig(**common, blur_p=(0.0, 0.0, 0.0)), images)
    blurred = first_global_view(MultiCropConfig(**common, blur_p=(1.0, 0.0, 0.0)), images)
    scaled = sigma * size / 224
    kernel = 2 * math.ceil(3 * scaled) + 1
    expected = TF.gaussian_blur(plain.unsqueeze(0), [kernel, kernel], [scaled, scaled])[0]
    torch.testing.assert_close(blurred, expected, atol=2e-5, rtol=0)
    assert not torch.allclose(blurred, plain, atol=1e-3)  # the blur did something


def test_a_32px_crop_keeps_a_fine_texture_through_the_strongest_blur():
    # A grating of 8-px period under a Gaussian of sigma s keeps exp(-2 pi^2 s^2 / 8^2) of its amplitude:
    # 0.975 at the scaled s = 2/7, 0.29 at DINO's unscaled s = 2 (the defect).
    period, config = 8.0, {**PLAIN, "global_size": 32, "local_size": 8, "blur_p": (1.0, 0.0, 0.0)}
    images = grating(32, period)
    scaled = modulation(first_global_view(MultiCropConfig(**config, blur_sigma=(2.0, 2.0)), images), period)
    unscaled = modulation(first_global_view(MultiCropConfig(**config, blur_sigma=(14.0, 14.0)), images), period)
    assert scaled == pytest.approx(math.exp(-2 * math.pi**2 * (2 / 7) ** 2 / period**2), abs=0.03)
    assert unscaled == pytest.approx(math.exp(-2 * math.pi**2 * 2.0**2 / period**2), abs=0.03)


def test_bad_sigma_is_refused():
    with pytest.raises(Exception, match="multicrop.blur_sigma"):
        MultiCropConfig(blur_sigma=(0.0, 2.0)).validate()
