"""Batched image augmentations as tensor ops, random per sample, for the GPU or CPU data workers alike.

Images are float (B, C, H, W) in [0, 1]. Random parameters come from the `generator` passed in, are
drawn on its device and then moved to the images' device, so a seeded CPU generator gives the same
augmentations on CPU and CUDA.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# ITU-R 601 luma, as PIL's convert("L"); torchvision rounds red to 0.2989. Summing to 1 keeps grey its own luma.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
# torchvision's RandomResizedCrop tries this many boxes before falling back to the whole image.
CROP_ATTEMPTS = 10
# Quarter turns as 2x2 maps of normalised output coordinates.
QUARTER_TURNS = torch.tensor([[[1, 0], [0, 1]], [[0, -1], [1, 0]], [[-1, 0], [0, -1]], [[0, 1], [-1, 0]]],
                             dtype=torch.float32)

Probability = float | Tensor  # a float for the whole batch, or a (B,) tensor of per-sample probabilities
Range = float | tuple[float, float]


# ---------------------------------------------------------------------------------------------- dtype, normalise


def to_float(images: Tensor) -> Tensor:
    """uint8 (B, C, H, W) in 0..255 -> float32 in [0, 1]."""
    if images.dtype != torch.uint8:
        raise ValueError(f"to_float expects uint8 images, got {images.dtype}")
    return images.float().div_(255)


def to_uint8(images: Tensor) -> Tensor:
    """float in [0, 1] -> uint8 0..255, rounded to nearest."""
    return images.mul(255).round_().clamp_(0, 255).to(torch.uint8)


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    mean_t, std_t = _channel_stats(images, mean, std)
    return torch.addcmul(-mean_t / std_t, images, 1 / std_t)  # one pass over the pixels


def denormalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    mean_t, std_t = _channel_stats(images, mean, std)
    return images * std_t + mean_t


def _channel_stats(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> tuple[Tensor, Tensor]:
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return mean_t, std_t


# ---------------------------------------------------------------------------------------------- random draws


def _uniform(shape: int | tuple[int, ...], low: float, high: float, generator: torch.Generator) -> Tensor:
    """Uniform draws on the generator's device (float32)."""
    shape = (shape,) if isinstance(shape, int) else shape
    return torch.empty(shape, device=generator.device).uniform_(low, high, generator=generator)


def _chosen(batch: int, p: Probability, generator: torch.Generator) -> Tensor:
    """Bool (B,) on the generator's device: which samples an op with probability `p` applies to."""
    probability = torch.as_tensor(p, dtype=torch.float32).to(generator.device)
    if probability.dim() not in (0, 1) or probability.numel() not in (1, batch):
        raise ValueError(f"p must be a float or a ({batch},) tensor, got shape {tuple(probability.shape)}")
    return torch.rand(batch, device=generator.device, generator=generator) < probability


def _factor_range(strength: Range, name: str) -> tuple[float, float]:
    """ColorJitter convention: a float s means factors in [max(0, 1 - s), 1 + s]; a pair is used as is."""
    if isinstance(strength, (int, float)):
        if strength < 0:
            raise ValueError(f"{name} must be >= 0, got {strength}")
        return max(0.0, 1.0 - strength), 1.0 + strength
    low, high = strength
    if not 0 <= low <= high:
        raise ValueError(f"{name} range must satisfy 0 <= low <= high, got {strength}")
    return float(low), float(high)


def _hue_range(hue: Range) -> tuple[float, float]:
    low, high = (-hue, hue) if isinstance(hue, (int, float)) else hue
    if not -0.5 <= low <= high <= 0.5:
        raise ValueError(f"hue must lie in [-0.5, 0.5] (a fraction of a full turn), got {hue}")
    return float(low), float(high)


def _per_sample(values: Tensor, images: Tensor) -> Tensor:
    """(B,) parameters -> (B, 1, 1, 1) on the images' device and dtype, ready to broadcast."""
    return values.to(device=images.device, dtype=images.dtype).view(-1, 1, 1, 1)


def _apply_to_chosen(images: Tensor, chosen: Tensor, transform: Callable[[Tensor], Tensor]) -> Tensor:
    """A copy of `images` with `transform` applied to the chosen rows only: cheaper than computing the
    op for every row and selecting with torch.where when few rows are chosen."""
    output = images.clone()
    rows = chosen.nonzero().squeeze(1).to(images.device)
    if rows.numel():
        output[rows] = transform(images[rows])
    return output


# ---------------------------------------------------------------------------------------------- geometry


def random_resized_crop(
    images: Tensor,
    output_size: int | tuple[int, int],
    scale: tuple[float, float] = (0.4, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip_p: float = 0.5,
    vflip_p: float = 0.0,
    rot90_p: float = 0.0,
    antialias: bool = True,
    *,
    generator: torch.Generator,
) -> Tensor:
    """A random box per sample (area fraction from `scale`, log-uniform aspect ratio), flipped and turned
    by quarter turns as drawn, resized to `output_size`: all geometry in one bilinear resample.

    With `antialias`, a sample whose box is 2x or more the output size is resampled from a half- (or
    quarter-, ...) size copy of the images, so strong downscaling does not alias; boxes under 2x cost nothing.
    """
    batch, _, height, width = images.shape
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    if rot90_p > 0 and out_h != out_w:
        raise ValueError(f"quarter turns need a square output_size, got {out_h}x{out_w}")
    boxes = _crop_boxes(batch, height, width, scale, ratio, generator)
    theta = _crop_theta(boxes, height, width, _orientations(batch, hflip_p, vflip_p, rot90_p, generator))
    if not antialias:
        return _resample(images, theta, (out_h, out_w), padding_mode="border")
    # Quarter turns swap the box's sides between output axes: judge by the box's short side.
    downscale = boxes[:, 2:].amin(dim=1) / max(out_h, out_w)
    levels = downscale.clamp(min=1).log2().floor().long()
    return _resample_from_pyramid(images, theta, levels, (out_h, out_w))


def random_flip_rot90(
    images: Tensor, hflip_p: float = 0.5, vflip_p: float = 0.0, rot90_p: float = 0.0, *, generator: torch.Generator
) -> Tensor:
    """Per-sample horizontal/vertical flips and quarter turns (k uniform in 0..3 when drawn); exact."""
    batch, _, height, width = images.shape
    if rot90_p > 0 and height != width:
        raise ValueError(f"quarter turns need square images, got {height}x{width}")
    orientation = _orientations(batch, hflip_p, vflip_p, rot90_p, generator)
    theta = torch.cat([orientation, torch.zeros(batch, 2, 1, device=orientation.device)], dim=2)
    return _resample(images, theta, (height, width), padding_mode="border")


def random_translate(
    images: Tensor, max_fraction: float = 0.125, *, generator: torch.Generator, padding_mode: str = "zeros"
) -> Tensor:
    """P>M>F DiffAugment translation: shift by whole pixels, up to `max_fraction` of each side; the uncovered
    border is zero padded (DiffAugment) or, with padding_mode="reflection", mirrored (for textures, where a
    black band is an artefact no real image has)."""
    batch, _, height, width = images.shape
    max_dy, max_dx = int(height * max_fraction + 0.5), int(width * max_fraction + 0.5)
    dy = torch.randint(-max_dy, max_dy + 1, (batch,), device=generator.device, generator=generator)
    dx = torch.randint(-max_dx, max_dx + 1, (batch,), device=generator.device, generator=generator)
    theta = torch.zeros(batch, 2, 3, device=generator.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    # Whole-pixel shifts map pixel centres onto pixel centres, so bilinear sampling copies values exactly.
    theta[:, 0, 2] = -2 * dx / width
    theta[:, 1, 2] = -2 * dy / height
    return _resample(images, theta, (height, width), padding_mode=padding_mode)


def _crop_boxes(
    batch: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
    generator: torch.Generator,
) -> Tensor:
    """(B, 4) boxes (x0, y0, box_width, box_height) in pixels, as torchvision draws them but vectorised:
    CROP_ATTEMPTS candidates per sample, the first that fits wins, else the whole image clamped to `ratio`."""
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"ratio must satisfy 0 < low <= high, got {ratio}")
    shape = (batch, CROP_ATTEMPTS)
    area = height * width * _uniform(shape, scale[0], scale[1], generator)
    aspect = _uniform(shape, math.log(ratio[0]), math.log(ratio[1]), generator).exp()
    box_w, box_h = (area * aspect).sqrt(), (area / aspect).sqrt()
    fits = (box_w <= width) & (box_h <= height)
    first_fit = fits.float().argmax(dim=1, keepdim=True)  # argmax returns the first of equal maxima
    fallback_w, fallback_h = _whole_image_box(height, width, ratio)
    found = fits.any(dim=1)
    box_w = torch.where(found, box_w.gather(1, first_fit).squeeze(1), fallback_w)
    box_h = torch.where(found, box_h.gather(1, first_fit).squeeze(1), fallback_h)
    # Continuous positions: sub-pixel offsets are free with bilinear sampling.
    x0 = _uniform(batch, 0, 1, generator) * (width - box_w)
    y0 = _uniform(batch, 0, 1, generator) * (height - box_h)
    return torch.stack([x0, y0, box_w, box_h], dim=1)


def _whole_image_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[float, float]:
    image_ratio = width / height
    if image_ratio < ratio[0]:
        return float(width), width / ratio[0]
    if image_ratio > ratio[1]:
        return height * ratio[1], float(height)
    return float(width), float(height)


def _orientations(batch: int, hflip_p: float, vflip_p: float, rot90_p: float, generator: torch.Generator) -> Tensor:
    """(B, 2, 2) maps of normalised output coordinates: a quarter turn after optional flips."""
    mirror_x = 1 - 2 * _chosen(batch, hflip_p, generator).float()
    mirror_y = 1 - 2 * _chosen(batch, vflip_p, generator).float()
    turned = _chosen(batch, rot90_p, generator)
    quarter_turns = torch.randint(0, 4, (batch,), device=generator.device, generator=generator) * turned
    mirrors = torch.diag_embed(torch.stack([mirror_x, mirror_y], dim=1))
    return QUARTER_TURNS.to(generator.device)[quarter_turns] @ mirrors


def _crop_theta(boxes: Tensor, height: int, width: int, orientation: Tensor) -> Tensor:
    """(B, 2, 3) affine_grid matrices: output coords -> orientation -> box, in normalised coordinates."""
    x0, y0, box_w, box_h = boxes.unbind(dim=1)
    half_extent = torch.stack([box_w / width, box_h / height], dim=1)
    centre = torch.stack([(2 * x0 + box_w) / width - 1, (2 * y0 + box_h) / height - 1], dim=1)
    return torch.cat([half_extent.unsqueeze(2) * orientation, centre.unsqueeze(2)], dim=2)


def _resample(images: Tensor, theta: Tensor, size: tuple[int, int], padding_mode: str) -> Tensor:
    theta = theta.to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, [images.shape[0], images.shape[1], *size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def _resample_from_pyramid(images: Tensor, theta: Tensor, levels: Tensor, size: tuple[int, int]) -> Tensor:
    """Resample sample i from the images halved levels[i] times. Each halving keeps the extent, so
    normalised coordinates and theta carry over to every level."""
    if not bool((levels > 0).any()):
        return _resample(images, theta, size, padding_mode="border")
    output = images.new_empty(images.shape[0], images.shape[1], *size)
    remaining = torch.arange(images.shape[0], device=levels.device)  # samples `source` still holds
    source, level = images, 0
    while True:
        here = levels[remaining] == level
        if here.all():
            output[remaining.to(images.device)] = _resample(source, theta[remaining], size, padding_mode="border")
            return output
        if here.any():
            rows, taken = here.to(images.device), remaining[here]
            output[taken.to(images.device)] = _resample(source[rows], theta[taken], size, padding_mode="border")
            source, remaining = source[~rows], remaining[~here]
        source, level = _half_size(source), level + 1


def _half_size(images: Tensor) -> Tensor:
    """Halve height and width, keeping the image's extent (so normalised coordinates still match)."""
    height, width = images.shape[-2:]
    if height % 2 or width % 2:
        half = (math.ceil(height / 2), math.ceil(width / 2))
        return F.interpolate(images, size=half, mode="bilinear", antialias=True, align_corners=False)
    # A 2x2 box average (a mipmap level), summed rows first: cheaper on CPU than avg_pool2d's general kernel.
    row_pairs = images[..., 0::2, :] + images[..., 1::2, :]
    return (row_pairs[..., 0::2] + row_pairs[..., 1::2]).mul_(0.25)


# ---------------------------------------------------------------------------------------------- colour


def color_jitter(
    images: Tensor,
    brightness: Range = 0.4,
    contrast: Range = 0.4,
    saturation: Range = 0.2,
    hue: Range = 0.1,
    p: Probability = 0.8,
    *,
    generator: torch.Generator,
) -> Tensor:
    """torchvision-style ColorJitter with per-sample factors on a per-sample subset (probability `p`).

    Brightness scales, contrast blends with the image's mean luma, saturation blends with each pixel's
    luma, hue turns colours about the grey axis. Applied in that order as one per-sample affine colour
    map (a single batched matmul) and clamped once, not after each step as torchvision does. torchvision
    also shuffles the order; here brightness, contrast and saturation commute exactly without the
    intermediate clamps and the hue turn nearly so, so the fixed order changes little.
    """
    _require_rgb(images, "color_jitter")
    batch = images.shape[0]
    chosen = _chosen(batch, p, generator)
    brightness_f = _factors(batch, _factor_range(brightness, "brightness"), chosen, 1.0, generator)
    contrast_f = _factors(batch, _factor_range(contrast, "contrast"), chosen, 1.0, generator)
    saturation_f = _factors(batch, _factor_range(saturation, "saturation"), chosen, 1.0, generator)
    hue_turns = _factors(batch, _hue_range(hue), chosen, 0.0, generator)
    device, dtype = images.device, images.dtype
    brightness_f, contrast_f, saturation_f, hue_turns = (
        t.to(device=device, dtype=dtype) for t in (brightness_f, contrast_f, saturation_f, hue_turns)
    )
    matrix = _saturation_hue_matrices(saturation_f, hue_turns) * (brightness_f * contrast_f).view(-1, 1, 1)
    offset = brightness_f * (1 - contrast_f) * _mean_luma(images)
    pixels = images.flatten(2)
    return torch.baddbmm(offset.view(-1, 1, 1), matrix, pixels).clamp_(0, 1).view_as(images)


def brightness_contrast(
    images: Tensor, brightness: Range = 0.4, contrast: Range = 0.4, p: Probability = 1.0, *, generator: torch.Generator
) -> Tensor:
    """Per-sample brightness and contrast only, the same on every channel, so grey images stay grey
    (for micrographs, where hue and saturation mean nothing)."""
    _require_rgb(images, "brightness_contrast")
    batch = images.shape[0]
    chosen = _chosen(batch, p, generator)
    brightness_f = _factors(batch, _factor_range(brightness, "brightness"), chosen, 1.0, generator)
    contrast_f = _factors(batch, _factor_range(contrast, "contrast"), chosen, 1.0, generator)
    brightness_f, contrast_f = _per_sample(brightness_f, images), _per_sample(contrast_f, images)
    offset = brightness_f * (1 - contrast_f) * _mean_luma(images).view(-1, 1, 1, 1)
    return torch.addcmul(offset, brightness_f * contrast_f, images).clamp_(0, 1)


def random_grayscale(images: Tensor, p: Probability = 0.2, *, generator: torch.Generator) -> Tensor:
    """Replace a per-sample subset by its luma on all channels."""
    _require_rgb(images, "random_grayscale")
    chosen = _chosen(images.shape[0], p, generator)
    return _apply_to_chosen(images, chosen, lambda rows: _luma(rows).expand_as(rows))


def solarize(images: Tensor, p: Probability = 0.2, threshold: float = 0.5, *, generator: torch.Generator) -> Tensor:
    """Invert values >= threshold on a per-sample subset (PIL's solarize at 128 is threshold 128/255)."""
    chosen = _chosen(images.shape[0], p, generator)
    return _apply_to_chosen(images, chosen, lambda rows: torch.where(rows >= threshold, 1 - rows, rows))


def _factors(
    batch: int, bounds: tuple[float, float], chosen: Tensor, neutral: float, generator: torch.Generator
) -> Tensor:
    drawn = _uniform(batch, bounds[0], bounds[1], generator)
    return torch.where(chosen, drawn, torch.full_like(drawn, neutral))


def _require_rgb(images: Tensor, op: str) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{op} needs RGB images shaped (B, 3, H, W), got {tuple(images.shape)}")


def _luma(images: Tensor) -> Tensor:
    weights = torch.tensor(LUMA_WEIGHTS, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def _mean_luma(images: Tensor) -> Tensor:
    """(B,) mean luma; luma is linear, so it is the luma of the per-channel means."""
    weights = torch.tensor(LUMA_WEIGHTS, dtype=images.dtype, device=images.device)
    return images.mean(dim=(2, 3)) @ weights


def _saturation_hue_matrices(saturation: Tensor, hue_turns: Tensor) -> Tensor:
    """(B, 3, 3) RGB maps: blend with luma by `saturation`, then turn by `hue_turns` of a full turn about
    the grey axis (1, 1, 1). Rodrigues' rotation stays closer to HSV hue shifts (torchvision's) than a
    turn in YIQ, which must darken a blue turned yellow to keep its luma."""
    device, dtype = saturation.device, saturation.dtype
    eye = torch.eye(3, device=device, dtype=dtype)
    luma_weights = torch.tensor(LUMA_WEIGHTS, device=device, dtype=dtype)
    to_luma = torch.ones(3, 1, device=device, dtype=dtype) * luma_weights  # every channel := luma
    desaturate = saturation.view(-1, 1, 1) * eye + (1 - saturation).view(-1, 1, 1) * to_luma
    grey_axis = torch.full((3, 3), 1 / 3, device=device, dtype=dtype)  # projection onto (1, 1, 1)
    cross = torch.tensor([[0, -1, 1], [1, 0, -1], [-1, 1, 0]], device=device, dtype=dtype) / math.sqrt(3)
    angle = (2 * math.pi * hue_turns).view(-1, 1, 1)
    rotation = angle.cos() * eye + angle.sin() * cross + (1 - angle.cos()) * grey_axis
    return rotation @ desaturate


# ---------------------------------------------------------------------------------------------- blur


def gaussian_blur(
    images: Tensor,
    p: Probability = 0.5,
    sigma: tuple[float, float] = (0.1, 2.0),
    kernel_size: int | None = None,
    *,
    generator: torch.Generator,
) -> Tensor:
    """Gaussian blur with a per-sample sigma on a per-sample subset, reflect padded.

    `kernel_size` defaults to covering 3 sigma of the largest sigma (13 taps for sigma 2), capped by the
    image size. Only the chosen samples are convolved: one separable, grouped (depthwise) convolution.
    """
    if not 0 < sigma[0] <= sigma[1]:
        raise ValueError(f"sigma must satisfy 0 < low <= high, got {sigma}")
    if kernel_size is not None and (kernel_size < 1 or kernel_size % 2 == 0):
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    batch, _, height, width = images.shape
    chosen = _chosen(batch, p, generator)
    sigmas = _uniform(batch, sigma[0], sigma[1], generator)
    size = kernel_size or 2 * math.ceil(3 * sigma[1]) + 1
    size = min(size, 2 * min(height, width) - 1)  # reflect padding needs radius < side
    if size == 1:
        return images.clone()
    kernels = _gaussian_kernels(sigmas[chosen].to(images.device), size).to(images.dtype)
    return _apply_to_chosen(images, chosen, lambda rows: _separable_conv(rows, kernels))


def _gaussian_kernels(sigmas: Tensor, size: int) -> Tensor:
    """(N, size) normalised 1-D Gaussian kernels, one per sigma."""
    offsets = torch.arange(size, device=sigmas.device, dtype=torch.float32) - size // 2
    kernels = torch.exp(-(offsets**2) / (2 * sigmas.float().unsqueeze(1) ** 2))
    return kernels / kernels.sum(dim=1, keepdim=True)


def _separable_conv(images: Tensor, kernels: Tensor) -> Tensor:
    """Convolve image n with kernels[n] along both axes: the batch becomes channels of one grouped conv."""
    count, channels, height, width = images.shape
    radius = kernels.shape[1] // 2
    weights = kernels.repeat_interleave(channels, dim=0)  # (count * channels, size)
    planes = F.pad(images.reshape(1, count * channels, height, width), (radius,) * 4, mode="reflect")
    planes = F.conv2d(planes, weights.view(-1, 1, 1, kernels.shape[1]), groups=count * channels)
    planes = F.conv2d(planes, weights.view(-1, 1, kernels.shape[1], 1), groups=count * channels)
    return planes.view(count, channels, height, width)
