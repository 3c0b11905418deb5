"""Numpy machinery shared by the synthetic generators: Gaussian random fields, thresholds and image nuisance.

Every function works on stacks shaped (B, H, W) so one call renders a whole batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np


def per_image(rngs: Sequence[np.random.Generator], draw: Callable[[np.random.Generator], np.ndarray]) -> np.ndarray:
    """Stacks one draw per image; each image's draws come only from its own generator, so a batch
    renders the same pixels as the images rendered one by one."""
    return np.stack([np.asarray(draw(rng)) for rng in rngs])


def fft_length(minimum: int) -> int:
    """Smallest length >= minimum with no prime factor above 5: the sizes pocketfft handles fastest."""
    length = max(1, minimum)
    while not _is_5_smooth(length):
        length += 1
    return length


def _is_5_smooth(number: int) -> bool:
    for prime in (2, 3, 5):
        while number % prime == 0:
            number //= prime
    return number == 1


def rotation_matrix(angles_deg: Sequence[float]) -> np.ndarray:
    """Rotation R = Rz(a) Ry(b) Rx(c) for angles (a, b, c) in degrees about the z, y and x axes."""
    about_z, about_y, about_x = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    cz, sz, cy, sy, cx, sx = (np.cos(about_z), np.sin(about_z), np.cos(about_y), np.sin(about_y),
                              np.cos(about_x), np.sin(about_x))
    rz = np.array([[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]])
    ry = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]])
    return rz @ ry @ rx


def kernel_covariance_3d(sigmas: Sequence[float], angles_deg: Sequence[float]) -> np.ndarray:
    """Covariance R diag(s1², s2², s3²) Rᵀ of a rotated anisotropic 3-D Gaussian kernel (axes x, y, z)."""
    rotation = rotation_matrix(angles_deg)
    return rotation @ np.diag(np.square(np.asarray(sigmas, dtype=np.float64))) @ rotation.T


def section_covariance(sigmas: Sequence[float], angles_deg: Sequence[float]) -> np.ndarray:
    """(x, y) covariance of the 2-D kernel whose filtered noise has the law of a z-section of the 3-D field.

    White noise filtered by a Gaussian kernel of covariance Σ has autocovariance ∝ exp(-hᵀ Σ⁻¹ h / 4).
    On the plane z = 0 that is exp(-h_xyᵀ (Σ⁻¹)_xy h_xy / 4), which 2-D noise filtered by the Gaussian with
    covariance ((Σ⁻¹)_xy)⁻¹ reproduces exactly (up to the variance, which we standardise away). So a
    section costs one 2-D FFT instead of a 3-D one. That covariance is the Schur complement
    Σ_xy - Σ_xz Σ_zz⁻¹ Σ_zx (the section of the ellipsoid), not the plain x-y block Σ_xy (its shadow):
    the two agree only when the kernel is not tilted out of the plane.
    """
    precision = np.linalg.inv(kernel_covariance_3d(sigmas, angles_deg))
    return np.linalg.inv(precision[:2, :2])


def planar_covariance(sigma_along: np.ndarray, sigma_across: np.ndarray, angle_rad: np.ndarray) -> np.ndarray:
    """(x, y) covariances (..., 2, 2) of 2-D Gaussians elongated along `angle_rad` (from +x towards +y)."""
    cos, sin = np.cos(angle_rad), np.sin(angle_rad)
    along, across = np.square(sigma_along), np.square(sigma_across)
    xx = along * cos**2 + across * sin**2
    yy = along * sin**2 + across * cos**2
    xy = (along - across) * sin * cos
    return np.stack([np.stack([xx, xy], -1), np.stack([xy, yy], -1)], -2)


def gaussian_transfer(height: int, width: int, covariance_xy: np.ndarray) -> np.ndarray:
    """Fourier transform exp(-2π² fᵀ Σ f) of unit-mass Gaussian kernels on the rfft2 grid.

    covariance_xy: (..., 2, 2) in pixels², x along image columns, y along rows.
    Returns float32 (..., height, width // 2 + 1).
    """
    freq_y = np.fft.fftfreq(height)[:, None]
    freq_x = np.fft.rfftfreq(width)[None, :]
    cov = np.asarray(covariance_xy, dtype=np.float64)[..., None, None]
    quadratic = (cov[..., 0, 0, :, :] * freq_x**2 + 2 * cov[..., 0, 1, :, :] * freq_x * freq_y
                 + cov[..., 1, 1, :, :] * freq_y**2)
    return np.exp(-2 * np.pi**2 * quadratic).astype(np.float32)


def filtered_noise(noise: np.ndarray, covariance_xy: np.ndarray) -> np.ndarray:
    """White noise (B, H, W) convolved (periodically) with Gaussian kernels, standardised per image.

    covariance_xy is (2, 2) for the whole stack or (B, 2, 2) per image.
    """
    _, height, width = noise.shape
    transfer = gaussian_transfer(height, width, covariance_xy)
    if transfer.ndim == 2:
        transfer = transfer[None]
    fields = np.fft.irfft2(np.fft.rfft2(noise) * transfer, s=(height, width)).astype(np.float32)
    return standardise(fields)


def standardise(images: np.ndarray) -> np.ndarray:
    """Zero mean, unit standard deviation per image (constant images stay zero)."""
    centred = images - images.mean(axis=(-2, -1), keepdims=True)
    spread = centred.std(axis=(-2, -1), keepdims=True)
    return centred / np.maximum(spread, 1e-12)


def fraction_thresholds(fields: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Per-image level t with exactly round(fraction * H * W) pixels >= t (B,)."""
    count, height, width = fields.shape
    pixels = height * width
    fractions = np.asarray(fractions, dtype=np.float64)
    if np.any((fractions <= 0) | (fractions >= 1)):
        raise ValueError(f"area fractions must lie strictly between 0 and 1, got {fractions.min()}..{fractions.max()}")
    above = np.clip(np.rint(fractions * pixels).astype(np.int64), 1, pixels - 1)
    ordered = np.sort(fields.reshape(count, pixels), axis=1)
    return ordered[np.arange(count), pixels - above]


def threshold_at_fraction(fields: np.ndarray, fractions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Binary phase maps (B, H, W) whose white fraction is the nearest multiple of 1/(H W) to each target,
    and the measured white fraction (B,) float32."""
    thresholds = fraction_thresholds(fields, fractions)
    white = fields >= thresholds[:, None, None]
    return white, white.mean(axis=(1, 2), dtype=np.float64).astype(np.float32)


def soft_step(values: np.ndarray, edge_width: float | np.ndarray) -> np.ndarray:
    """0 below -edge/2, 1 above +edge/2, linear between: an anti-aliased threshold at 0."""
    return np.clip(values / edge_width + 0.5, 0.0, 1.0)


def zoom_about_centre(images: np.ndarray, zooms: np.ndarray, out_size: int) -> np.ndarray:
    """Bilinear resampling of square images (B, R, R) magnified by zooms (B,) about the centre, cropped
    to out_size. The canvas must be large enough: R - 1 >= (out_size - 1) / min(zooms)."""
    canvas = images.shape[-1]
    offsets = np.arange(out_size, dtype=np.float64) - (out_size - 1) / 2
    source = (canvas - 1) / 2 + offsets[None, :] / np.asarray(zooms, dtype=np.float64)[:, None]
    if source.min() < -1e-9 or source.max() > canvas - 1 + 1e-9:
        raise ValueError(f"canvas of {canvas} px is too small to zoom by {np.min(zooms):.3f} into {out_size} px")
    lower = np.clip(np.floor(source).astype(np.int64), 0, canvas - 2)
    weight = (source - lower).astype(np.float32)
    rows = _lerp_gather(images, lower, weight, axis=1)
    return _lerp_gather(rows, lower, weight, axis=2)


def _lerp_gather(images: np.ndarray, lower: np.ndarray, weight: np.ndarray, axis: int) -> np.ndarray:
    shape = [len(lower), 1, 1]
    shape[axis] = lower.shape[1]
    lower, weight = lower.reshape(shape), weight.reshape(shape)
    below = np.take_along_axis(images, lower, axis=axis)
    above = np.take_along_axis(images, lower + 1, axis=axis)
    return below + (above - below) * weight


def gaussian_blur(images: np.ndarray, sigmas: np.ndarray, max_sigma: float) -> np.ndarray:
    """Separable Gaussian blur with a per-image sigma (pixels), edges reflected.

    The kernel radius comes from max_sigma, not from the batch, so an image blurs to the same bits
    whatever else shares its batch.
    """
    radius = max(1, math.ceil(3 * max_sigma))
    taps = np.arange(-radius, radius + 1, dtype=np.float32)
    sigmas = np.maximum(np.asarray(sigmas, dtype=np.float32), 1e-3)[:, None]
    weights = np.exp(-0.5 * (taps[None, :] / sigmas) ** 2)
    weights /= weights.sum(axis=1, keepdims=True)
    for axis in (1, 2):
        images = _convolve_axis(images, weights, axis)
    return images


def _convolve_axis(images: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
    radius = weights.shape[1] // 2
    length = images.shape[axis]
    pad = [(0, 0)] * 3
    pad[axis] = (radius, radius)
    padded = np.pad(images, pad, mode="reflect")
    blurred = np.zeros_like(images)
    for tap in range(weights.shape[1]):
        window = padded[:, tap : tap + length, :] if axis == 1 else padded[:, :, tap : tap + length]
        blurred += weights[:, tap, None, None] * window
    return blurred


def illumination_gain(size: int, slopes_yx: np.ndarray, vignetting: np.ndarray) -> np.ndarray:
    """Smooth multiplicative illumination (B, size, size): a linear ramp plus radial fall-off.

    slopes_yx (B, 2): gain change from centre to edge along y and x; vignetting (B,): loss at the corners.
    """
    coords = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    ramp = slopes_yx[:, 0, None, None] * coords[None, :, None] + slopes_yx[:, 1, None, None] * coords[None, None, :]
    radius2 = (coords[:, None] ** 2 + coords[None, :] ** 2) / 2
    return (1.0 + ramp - vignetting[:, None, None] * radius2[None]).astype(np.float32)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Intensities in [0, 1] (clipped) to 0..255."""
    return np.rint(np.clip(images, 0.0, 1.0) * 255).astype(np.uint8)
