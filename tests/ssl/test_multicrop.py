"""DINO multi-crop: shapes, view-major order, determinism, micrograph mode and config validation."""

from __future__ import annotations

import pytest
import torch

from metallo_core.config import from_dict
from metallo_core.data import tensor_augment as aug
from metallo_core.errors import ConfigError
from metallo_core.ssl.multicrop import MultiCropAugment, MultiCropConfig, view_counts

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SMALL = {"global_size": 32, "local_size": 16, "local_crops": 3}
NO_COLOUR = {"color_jitter_p": 0.0, "grayscale_p": 0.0, "solarize_p": 0.0, "blur_p": (0.0, 0.0, 0.0)}


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def base_images(batch: int = 4, size: int = 48, device: str = "cpu") -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=seeded(7)).to(device)


def unnormalized(views: torch.Tensor, config: MultiCropConfig) -> torch.Tensor:
    return aug.denormalize(views, config.mean, config.std)


def test_shapes_dtypes_and_range(device):
    config = MultiCropConfig(**SMALL)
    global_views, local_views = MultiCropAugment(config)(base_images(device=device), seeded())
    assert global_views.shape == (8, 3, 32, 32) and local_views.shape == (12, 3, 16, 16)
    assert global_views.dtype == local_views.dtype == torch.float32
    assert global_views.device.type == local_views.device.type == torch.device(device).type
    for views in (global_views, local_views):
        pixels = unnormalized(views, config)
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert view_counts(config) == (2, 3)


def test_views_are_view_major(device):
    # Each image one flat colour: crops, flips and blur keep it, so every view shows its image's colour.
    colours = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [40, 90, 200]], dtype=torch.uint8)
    images = colours.view(5, 3, 1, 1).expand(5, 3, 40, 40).contiguous().to(device)
    config = MultiCropConfig(**SMALL, **{**NO_COLOUR, "blur_p": (1.0, 1.0, 1.0)}, rot90_p=0.5, vflip_p=0.5)
    global_views, local_views = MultiCropAugment(config)(images, seeded())
    for views, count in ((global_views, 2), (local_views, 3)):
        pixels = unnormalized(views, config).cpu()
        for view in range(count):
            for image in range(5):
                expected = (colours[image].float() / 255).view(3, 1, 1).expand(3, *pixels.shape[-2:])
                assert torch.allclose(pixels[view * 5 + image], expected, atol=1e-4), (view, image)


def test_same_seed_same_views_other_seed_differs(device):
    augment = MultiCropAugment(MultiCropConfig(**SMALL))
    images = base_images(device=device)
    first = augment(images, seeded(1))
    again = augment(images, seeded(1))
    other = augment(images, seeded(2))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(torch.equal(a, b) for a, b in zip(first, other))


def test_the_views_of_one_image_differ(device):
    augment = MultiCropAugment(MultiCropConfig(**SMALL))
    global_views, local_views = augment(base_images(batch=2, device=device), seeded())
    assert not torch.equal(global_views[0], global_views[2])
    assert not torch.equal(local_views[0], local_views[2])


def test_uint8_views_match_the_float_views(device):
    augment = MultiCropAugment(MultiCropConfig(**SMALL))
    images = base_images(device=device)
    global_u8, local_u8 = augment.to_uint8_views(images, seeded(3))
    assert global_u8.dtype == local_u8.dtype == torch.uint8
    from_uint8 = augment.normalize_uint8_views(global_u8, local_u8)
    direct = augment(images, seeded(3))
    half_level = 0.5 / 255 / min(augment.config.std) + 1e-5  # rounding to uint8
    for shipped, computed in zip(from_uint8, direct):
        assert (shipped - computed).abs().max() <= half_level


def test_micrograph_mode_keeps_grey_images_exactly_grey(device):
    # Micrograph mode treats every channel alike, so shipped uint8 views stay bit-for-bit grey.
    grey = torch.randint(0, 256, (4, 1, 48, 48), dtype=torch.uint8, generator=seeded()).expand(4, 3, 48, 48)
    config = MultiCropConfig(**SMALL, micrograph=True, color_jitter_p=1.0, saturation=1.0, hue=0.5)
    augment = MultiCropAugment(config)
    for views in augment.to_uint8_views(grey.contiguous().to(device), seeded()):
        assert torch.equal(views[:, 0], views[:, 1]) and torch.equal(views[:, 1], views[:, 2])
    changed = augment.to_uint8_views(grey.contiguous().to(device), seeded())[0][:4].float()
    plain = MultiCropAugment(MultiCropConfig(**SMALL, micrograph=True, color_jitter_p=0.0, saturation=1.0, hue=0.5))
    unjittered = plain.to_uint8_views(grey.contiguous().to(device), seeded())[0][:4].float()
    assert (changed - unjittered).abs().mean() > 1  # brightness and contrast still act


def test_micrograph_mode_turns_no_hue_where_colour_mode_does():
    # A red image: any hue turn or saturation change makes green and blue differ from each other.
    red = torch.zeros(4, 3, 40, 40, dtype=torch.uint8)
    red[:, 0] = 200
    settings = {**SMALL, "color_jitter_p": 1.0, "saturation": 0.5, "hue": 0.5, "grayscale_p": 0.0}
    micrograph_views = MultiCropAugment(MultiCropConfig(**settings, micrograph=True)).to_uint8_views(red, seeded())
    colour_views = MultiCropAugment(MultiCropConfig(**settings)).to_uint8_views(red, seeded())
    for views in micrograph_views:
        assert torch.equal(views[:, 1], views[:, 2])
    assert not torch.equal(colour_views[0][:, 1], colour_views[0][:, 2])


def test_micrograph_symmetries_default_on_unless_set():
    assert MultiCropConfig().effective_rot90_p == MultiCropConfig().effective_vflip_p == 0.0
    micrograph = MultiCropConfig(micrograph=True)
    assert micrograph.effective_rot90_p == micrograph.effective_vflip_p == 0.5
    assert MultiCropConfig(micrograph=True, rot90_p=0.0).effective_rot90_p == 0.0


def test_quarter_turns_reach_the_views():
    images = base_images(batch=8, size=32)
    config = MultiCropConfig(**SMALL, **NO_COLOUR, global_scale=(1.0, 1.0), hflip_p=0.0, rot90_p=1.0)
    global_views, _ = MultiCropAugment(config)(images, seeded())
    pixels = aug.to_uint8(unnormalized(global_views, config))
    turns = set()
    for row, view in enumerate(pixels):
        image = images[row % 8]
        turns.update(k for k in range(4) if torch.equal(view, torch.rot90(image, k, dims=(-2, -1))))
    assert turns == {0, 1, 2, 3}


def test_no_local_crops():
    config = MultiCropConfig(**{**SMALL, "local_crops": 0})
    global_views, local_views = MultiCropAugment(config)(base_images(), seeded())
    assert global_views.shape == (8, 3, 32, 32) and local_views.shape == (0, 3, 16, 16)
    assert view_counts(config) == (2, 0)


def test_rejects_float_or_grey_base_images():
    augment = MultiCropAugment(MultiCropConfig(**SMALL))
    with pytest.raises(ValueError, match="uint8 base images"):
        augment(base_images().float(), seeded())
    with pytest.raises(ValueError, match="uint8 base images"):
        augment(base_images()[:, :1], seeded())


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"global_size": 0}, "multicrop.global_size"),
        ({"local_crops": -1}, "multicrop.local_crops"),
        ({"local_scale": (0.4, 0.05)}, "multicrop.local_scale"),
        ({"global_scale": (0.0, 1.0)}, "multicrop.global_scale"),
        ({"solarize_p": 1.5}, "multicrop.solarize_p"),
        ({"rot90_p": -0.1}, "multicrop.rot90_p"),
        ({"blur_p": (1.0, 0.1)}, "multicrop.blur_p"),
        ({"hue": 0.7}, "multicrop.hue"),
        ({"contrast": -0.1}, "multicrop.contrast"),
        ({"std": (0.2, 0.0, 0.2)}, "multicrop.std"),
    ],
)
def test_bad_settings_raise_config_error(setting, message):
    with pytest.raises(ConfigError, match=message):
        MultiCropConfig(**setting).validate()
    with pytest.raises(ConfigError, match=message):
        MultiCropAugment(MultiCropConfig(**setting))


def test_loads_from_yaml_data():
    config = from_dict(MultiCropConfig, {"micrograph": True, "blur_p": [1, 0.1, 0.5], "rot90_p": None,
                                         "vflip_p": 0.25, "local_crops": 8})
    assert config.blur_p == (1.0, 0.1, 0.5) and config.local_crops == 8
    assert config.effective_rot90_p == 0.5 and config.effective_vflip_p == 0.25
