"""Batched tensor augmentations: geometry against torch references, colour and blur against torchvision,
per-sample randomness and determinism."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from metallo_core.data import tensor_augment as aug

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_images(batch: int = 8, size: int | tuple[int, int] = 32, device: str = "cpu", seed: int = 0,
                  low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    height, width = (size, size) if isinstance(size, int) else size
    images = torch.rand(batch, 3, height, width, generator=seeded(seed))
    return (low + (high - low) * images).to(device)


def changed_rows(before: torch.Tensor, after: torch.Tensor, atol: float = 1e-6) -> torch.Tensor:
    return (before - after).abs().flatten(1).amax(dim=1).cpu() > atol


# --------------------------------------------------------------------------------------------- dtype, normalise


def test_uint8_round_trip_and_range():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=seeded())
    as_float = aug.to_float(images)
    assert as_float.dtype == torch.float32 and 0 <= as_float.min() and as_float.max() <= 1
    assert torch.equal(aug.to_uint8(as_float), images)
    with pytest.raises(ValueError, match="expects uint8"):
        aug.to_float(as_float)


def test_normalize_then_denormalize_round_trips(device):
    images = random_images(device=device)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    normalized = aug.normalize(images, mean, std)
    assert torch.allclose(normalized[:, 1], (images[:, 1] - 0.456) / 0.224, atol=1e-5)
    assert torch.allclose(aug.denormalize(normalized, mean, std), images, atol=1e-6)


# --------------------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("output_size", [20, 48])
def test_whole_image_crop_equals_resize(device, output_size):
    images = random_images(device=device)
    crops = aug.random_resized_crop(images, output_size, scale=(1, 1), ratio=(1, 1), hflip_p=0, antialias=False,
                                    generator=seeded())
    resized = F.interpolate(images, size=output_size, mode="bilinear", align_corners=False)
    assert crops.shape == (8, 3, output_size, output_size)
    assert torch.allclose(crops, resized, atol=1e-5)


def test_whole_image_crop_of_a_wide_image_keeps_its_aspect_ratio(device):
    images = random_images(size=(24, 36), device=device)  # width / height = 1.5
    crops = aug.random_resized_crop(images, (12, 18), scale=(1, 1), ratio=(1.5, 1.5), hflip_p=0, antialias=False,
                                    generator=seeded())
    resized = F.interpolate(images, size=(12, 18), mode="bilinear", align_corners=False)
    assert torch.allclose(crops, resized, atol=1e-5)


@pytest.mark.parametrize(("ratio", "box_width", "box_height"), [(1.0, 0.5, 0.5), (2.0, 0.5**0.5, 0.5**1.5)])
def test_crop_box_has_the_drawn_size_and_lies_inside_the_image(device, ratio, box_width, box_height):
    # Pixel (row, column) holds its centre's coordinates / 32, so a crop's value range gives its box's size.
    centres = (torch.arange(32, device=device) + 0.5) / 32
    coordinates = torch.stack([centres.view(1, -1).expand(32, 32), centres.view(-1, 1).expand(32, 32),
                               torch.zeros(32, 32, device=device)])
    images = coordinates.expand(16, 3, 32, 32).contiguous()
    crops = aug.random_resized_crop(images, 16, scale=(0.25, 0.25), ratio=(ratio, ratio), hflip_p=0,
                                    generator=seeded())
    low, high = crops.amin(dim=(2, 3))[:, :2], crops.amax(dim=(2, 3))[:, :2]
    # Within half a pixel of the image's edge bilinear sampling clamps, so the ramp is linear only inside.
    clear_of_edge = (low > 0.5 / 32 + 1e-4) & (high < 31.5 / 32 - 1e-4)
    expected = 15 / 16 * torch.tensor([box_width, box_height], device=device)  # pixel centres span 15/16 of it
    assert torch.allclose((high - low)[clear_of_edge], expected.expand_as(low)[clear_of_edge], atol=1e-4)
    assert clear_of_edge.sum() >= 24
    assert ((high - low) <= expected + 1e-4).all()
    assert len(set(crops[:, 0, 0, 0].tolist())) > 8  # boxes sit at different places


def test_pure_flip_equals_torch_flip(device):
    images = random_images(device=device)
    horizontal = aug.random_resized_crop(images, 32, scale=(1, 1), ratio=(1, 1), hflip_p=1, generator=seeded())
    vertical = aug.random_resized_crop(images, 32, scale=(1, 1), ratio=(1, 1), hflip_p=0, vflip_p=1,
                                       generator=seeded())
    assert torch.allclose(horizontal, images.flip(-1), atol=1e-5)
    assert torch.allclose(vertical, images.flip(-2), atol=1e-5)


def quarter_turns_found(images: torch.Tensor, turned: torch.Tensor) -> list[int | None]:
    """For each sample, the k with turned == rot90(image, k), or None."""
    found = []
    for image, result in zip(images.cpu(), turned.cpu()):
        matches = [k for k in range(4) if torch.allclose(result, torch.rot90(image, k, dims=(-2, -1)), atol=1e-5)]
        found.append(matches[0] if matches else None)
    return found


def test_rot90_gives_a_quarter_turn_of_each_sample(device):
    images = random_images(batch=32, size=16, device=device)
    crops = aug.random_resized_crop(images, 16, scale=(1, 1), ratio=(1, 1), hflip_p=0, rot90_p=1, generator=seeded())
    turns = quarter_turns_found(images, crops)
    assert None not in turns
    assert set(turns) == {0, 1, 2, 3}


def test_random_flip_rot90_is_exact_and_per_sample(device):
    images = random_images(batch=32, size=16, device=device)
    turned = aug.random_flip_rot90(images, hflip_p=0, vflip_p=0, rot90_p=1, generator=seeded())
    assert set(quarter_turns_found(images, turned)) == {0, 1, 2, 3}
    flipped = aug.random_flip_rot90(images, hflip_p=0.5, generator=seeded())
    is_flip = [torch.allclose(f, i.flip(-1), atol=1e-5) for f, i in zip(flipped, images)]
    is_same = [torch.allclose(f, i, atol=1e-5) for f, i in zip(flipped, images)]
    assert all(a or b for a, b in zip(is_flip, is_same)) and any(is_flip) and any(is_same)
    with pytest.raises(ValueError, match="square"):
        aug.random_flip_rot90(random_images(size=(8, 12)), rot90_p=0.5, generator=seeded())


def test_translate_shifts_by_whole_pixels_with_zero_fill(device):
    images = random_images(batch=16, size=16, device=device)
    shifted = aug.random_translate(images, max_fraction=0.125, generator=seeded()).cpu()
    padded = F.pad(images.cpu(), (2, 2, 2, 2))  # 0.125 * 16 = 2 pixels at most
    shifts = set()
    for image, result in zip(padded, shifted):
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if torch.allclose(result, image[:, 2 - dy:18 - dy, 2 - dx:18 - dx], atol=1e-5)]
        assert len(matches) == 1
        shifts.add(matches[0])
    assert len(shifts) > 4


def test_antialias_follows_the_area_average_on_strong_downscaling(device):
    noise = random_images(batch=4, size=64, device=device)
    area = F.interpolate(noise, size=16, mode="area")
    plain = aug.random_resized_crop(noise, 16, scale=(1, 1), ratio=(1, 1), hflip_p=0, antialias=False,
                                    generator=seeded())
    smooth = aug.random_resized_crop(noise, 16, scale=(1, 1), ratio=(1, 1), hflip_p=0, antialias=True,
                                     generator=seeded())
    assert (smooth - area).abs().mean() < 0.5 * (plain - area).abs().mean()


def test_antialias_pyramid_keeps_crop_coordinates(device):
    # Box filtering leaves a linear ramp unchanged, so a box misplaced at a pyramid level would show.
    ramp = torch.linspace(0, 1, 64, device=device)
    image = torch.stack([ramp.view(1, -1).expand(64, 64), ramp.view(-1, 1).expand(64, 64),
                         1 - ramp.view(1, -1).expand(64, 64)])
    noise = random_images(batch=32, size=64, device=device)
    for images, same in ((image.expand(32, 3, 64, 64).contiguous(), True), (noise, False)):
        smooth = aug.random_resized_crop(images, 8, scale=(0.01, 1), antialias=True, generator=seeded(1))
        plain = aug.random_resized_crop(images, 8, scale=(0.01, 1), antialias=False, generator=seeded(1))
        difference = (smooth - plain).abs().amax(dim=(1, 2, 3))
        if same:
            assert difference.max() < 0.01 / 64  # a hundredth of a pixel's step
        else:
            assert (difference > 0.05).sum() >= 8  # those boxes were 2x the output or more: filtered


def test_bad_crop_ranges_are_rejected():
    with pytest.raises(ValueError, match="scale"):
        aug.random_resized_crop(random_images(), 8, scale=(0.5, 0.2), generator=seeded())
    with pytest.raises(ValueError, match="ratio"):
        aug.random_resized_crop(random_images(), 8, ratio=(0, 1), generator=seeded())
    with pytest.raises(ValueError, match="square"):
        aug.random_resized_crop(random_images(), (8, 12), rot90_p=0.5, generator=seeded())


# --------------------------------------------------------------------------------------------- colour

# We weight luma 0.299/0.587/0.114 (ITU-R 601, PIL; sums to 1 so grey is its own luma); torchvision uses
# 0.2989, so results agree to about 1e-4.
TORCHVISION_LUMA_ATOL = 2e-4


def jitter(images, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, p=1.0, seed=0):
    return aug.color_jitter(images, brightness, contrast, saturation, hue, p=p, generator=seeded(seed))


def test_color_jitter_with_zero_strengths_is_identity(device):
    images = random_images(device=device)
    assert torch.allclose(jitter(images), images, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "reference"),
    [
        ({"brightness": (1.3, 1.3)}, lambda image: TF.adjust_brightness(image, 1.3)),
        ({"contrast": (0.6, 0.6)}, lambda image: TF.adjust_contrast(image, 0.6)),
        ({"contrast": (1.5, 1.5)}, lambda image: TF.adjust_contrast(image, 1.5)),
        ({"saturation": (0.3, 0.3)}, lambda image: TF.adjust_saturation(image, 0.3)),
        ({"saturation": (1.8, 1.8)}, lambda image: TF.adjust_saturation(image, 1.8)),
    ],
)
def test_single_adjustment_matches_torchvision(device, kwargs, reference):
    images = random_images(device=device)
    expected = torch.stack([reference(image) for image in images.cpu()])
    assert torch.allclose(jitter(images, **kwargs).cpu(), expected, atol=TORCHVISION_LUMA_ATOL)


def test_combined_adjustments_match_torchvision_in_any_order_when_nothing_clips(device):
    images = random_images(device=device, low=0.4, high=0.6)
    result = jitter(images, brightness=(1.1, 1.1), contrast=(0.8, 0.8), saturation=(0.7, 0.7)).cpu()
    steps = [lambda x: TF.adjust_brightness(x, 1.1), lambda x: TF.adjust_contrast(x, 0.8),
             lambda x: TF.adjust_saturation(x, 0.7)]
    for order in ([0, 1, 2], [2, 1, 0], [1, 0, 2]):
        expected = images.cpu()
        for step in order:
            expected = torch.stack([steps[step](image) for image in expected])
        assert torch.allclose(result, expected, atol=TORCHVISION_LUMA_ATOL)


def test_hue_turn_keeps_grey_and_brightness_and_follows_torchvision(device):
    colours = random_images(device=device, low=0.25, high=0.75)
    greys = colours.mean(dim=1, keepdim=True).expand_as(colours).contiguous()
    assert torch.allclose(jitter(greys, hue=(0.25, 0.25)), greys, atol=1e-5)
    turned = jitter(colours, hue=(0.1, 0.1))
    # A turn about the grey axis keeps the channel mean exactly and the (weighted) luma approximately.
    assert torch.allclose(turned.mean(dim=1), colours.mean(dim=1), atol=1e-5)
    assert (aug._luma(turned) - aug._luma(colours)).abs().mean() < 0.03
    quarter_turned = jitter(colours, hue=(0.25, 0.25)).cpu()
    hsv_shifted = torch.stack([TF.adjust_hue(image, 0.25) for image in colours.cpu()])
    change = (hsv_shifted - colours.cpu()).abs().mean()
    assert (quarter_turned - hsv_shifted).abs().mean() < 0.5 * change  # same direction, similar size


def test_color_jitter_output_is_clamped(device):
    images = random_images(device=device)
    result = aug.color_jitter(images, brightness=0.9, contrast=0.9, saturation=0.9, hue=0.5, p=1.0,
                              generator=seeded())
    assert result.min() >= 0 and result.max() <= 1 and changed_rows(images, result).all()


def test_grayscale_matches_torchvision(device):
    images = random_images(device=device)
    grey = aug.random_grayscale(images, p=1.0, generator=seeded()).cpu()
    expected = TF.rgb_to_grayscale(images.cpu(), num_output_channels=3)
    assert torch.allclose(grey, expected, atol=TORCHVISION_LUMA_ATOL)
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])


def test_brightness_contrast_keeps_grey_images_exactly_grey(device):
    greys = random_images(device=device)[:, :1].expand(-1, 3, -1, -1).contiguous()
    result = aug.brightness_contrast(greys, brightness=0.4, contrast=0.4, p=1.0, generator=seeded())
    assert changed_rows(greys, result).all()
    assert torch.equal(result[:, 0], result[:, 1]) and torch.equal(result[:, 1], result[:, 2])


def test_solarize_matches_torchvision(device):
    images = random_images(device=device)
    result = aug.solarize(images, p=1.0, threshold=0.5, generator=seeded())
    assert torch.equal(result.cpu(), TF.solarize(images.cpu(), 0.5))


# --------------------------------------------------------------------------------------------- blur


def test_blur_matches_torchvision_for_a_fixed_sigma(device):
    images = random_images(device=device)
    result = aug.gaussian_blur(images, p=1.0, sigma=(1.0, 1.0), kernel_size=7, generator=seeded())
    expected = TF.gaussian_blur(images.cpu(), kernel_size=[7, 7], sigma=[1.0, 1.0])
    assert torch.allclose(result.cpu(), expected, atol=1e-5)


def test_blur_with_tiny_sigma_is_identity(device):
    images = random_images(device=device)
    result = aug.gaussian_blur(images, p=1.0, sigma=(0.1, 0.1), generator=seeded())
    assert torch.allclose(result, images, atol=1e-6)


def test_blur_removes_high_frequencies_more_for_larger_sigma(device):
    images = random_images(batch=16, device=device)

    def roughness(x: torch.Tensor) -> torch.Tensor:  # per-sample energy of neighbour differences
        return (x.diff(dim=-1) ** 2).flatten(1).mean(dim=1).cpu()

    mild = aug.gaussian_blur(images, p=1.0, sigma=(0.6, 0.6), generator=seeded())
    strong = aug.gaussian_blur(images, p=1.0, sigma=(2.0, 2.0), generator=seeded())
    assert (roughness(strong) < roughness(mild)).all() and (roughness(mild) < 0.5 * roughness(images)).all()


def test_bad_blur_settings_are_rejected():
    with pytest.raises(ValueError, match="kernel_size"):
        aug.gaussian_blur(random_images(), kernel_size=4, generator=seeded())
    with pytest.raises(ValueError, match="sigma"):
        aug.gaussian_blur(random_images(), sigma=(0.0, 1.0), generator=seeded())


# --------------------------------------------------------------------------------------------- randomness


OPS_WITH_P = {
    "flip": lambda x, p, g: aug.random_resized_crop(x, x.shape[-1], scale=(1, 1), ratio=(1, 1), hflip_p=p,
                                                    generator=g),
    "rot90": lambda x, p, g: aug.random_flip_rot90(x, hflip_p=0, rot90_p=p, generator=g),
    "color_jitter": lambda x, p, g: aug.color_jitter(x, p=p, generator=g),
    "brightness_contrast": lambda x, p, g: aug.brightness_contrast(x, p=p, generator=g),
    "grayscale": lambda x, p, g: aug.random_grayscale(x, p=p, generator=g),
    "blur": lambda x, p, g: aug.gaussian_blur(x, p=p, generator=g),
    "solarize": lambda x, p, g: aug.solarize(x, p=p, generator=g),
}


@pytest.mark.parametrize("op", sorted(OPS_WITH_P))
def test_probability_picks_a_per_sample_subset(device, op):
    images = random_images(batch=64, size=16, device=device)
    changed = changed_rows(images, OPS_WITH_P[op](images, 0.5, seeded()))
    assert 16 <= changed.sum() <= 48  # rot90 also draws k = 0, so fewer change there
    assert not changed_rows(images, OPS_WITH_P[op](images, 0.0, seeded())).any()


@pytest.mark.parametrize("op", ["color_jitter", "brightness_contrast", "grayscale", "blur", "solarize"])
def test_per_sample_probabilities(device, op):
    images = random_images(batch=16, size=16, device=device)
    probability = torch.tensor([1.0] * 8 + [0.0] * 8)
    changed = changed_rows(images, OPS_WITH_P[op](images, probability, seeded()))
    assert changed[:8].all() and not changed[8:].any()


@pytest.mark.parametrize("op", sorted(OPS_WITH_P))
def test_same_seed_same_result_other_seed_differs(device, op):
    images = random_images(batch=16, size=16, device=device)
    first = OPS_WITH_P[op](images, 0.5, seeded(1))
    assert torch.equal(first, OPS_WITH_P[op](images, 0.5, seeded(1)))
    assert not torch.equal(first, OPS_WITH_P[op](images, 0.5, seeded(2)))


def test_crop_and_translate_are_seeded(device):
    images = random_images(batch=8, size=32, device=device)
    for op in (lambda g: aug.random_resized_crop(images, 16, generator=g),
               lambda g: aug.random_translate(images, generator=g)):
        assert torch.equal(op(seeded(1)), op(seeded(1)))
        assert not torch.equal(op(seeded(1)), op(seeded(2)))


def test_inputs_are_left_unchanged(device):
    images = random_images(device=device)
    saved = images.clone()
    for op in OPS_WITH_P.values():
        op(images, 1.0, seeded())
    aug.random_translate(images, generator=seeded())
    assert torch.equal(images, saved)


def same_images_elsewhere(images: torch.Tensor, where: str) -> torch.Tensor:
    if where == "cuda":
        return images.cuda()
    if where == "channels_last":
        return images.contiguous(memory_format=torch.channels_last)
    return torch.cat([images, images], dim=3)[..., : images.shape[-1]]  # a non-contiguous view, same pixels


def assert_one_cpu_generator_decides(where: str) -> None:
    """Every random draw comes from the one CPU generator, in the same order, wherever the pixels are: the
    same seed gives the same images (to float rounding), and the generator ends in the same state."""
    images = random_images(batch=8, size=32)
    for name, op in OPS_WITH_P.items():
        reference_generator, other_generator = seeded(3), seeded(3)
        reference = op(images, 0.5, reference_generator)
        elsewhere = op(same_images_elsewhere(images, where), 0.5, other_generator).cpu()
        assert torch.allclose(reference, elsewhere, atol=1e-4), name
        assert torch.equal(reference_generator.get_state(), other_generator.get_state()), name


@pytest.mark.parametrize("where", ["channels_last", "strided_view"])
def test_one_cpu_generator_decides_whatever_the_memory_layout(where):
    """The CUDA test's assertions on CPU, run everywhere (CI has no GPU): only the device differs there."""
    assert_one_cpu_generator_decides(where)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA; its CPU twin runs everywhere (above)")
def test_cpu_and_cuda_agree_under_one_cpu_generator():
    assert_one_cpu_generator_decides("cuda")
