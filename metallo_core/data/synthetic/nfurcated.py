"""Seed 002's two-label synthetic dataset: thresholded anisotropic Gaussian random fields labelled
with a morphology (7 classes) and a white-phase volume fraction (10 classes)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from metallo_core.data.synthetic.fields import (
    fft_length,
    filtered_noise,
    per_image,
    section_covariance,
    threshold_at_fraction,
)
from metallo_core.errors import ConfigError


@dataclass(frozen=True)
class Morphology:
    """A 3-D anisotropic Gaussian kernel: standard deviations along its own axes, as fractions of the
    image side (so a morphology looks the same at any resolution), rotated by angles about z, y, x."""

    name: str
    sigmas: tuple[float, float, float]
    angles_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def section_covariance(self, size: int) -> np.ndarray:
        """(x, y) covariance in pixels² of the 2-D kernel that samples a z-section of this 3-D field."""
        return section_covariance([sigma * size for sigma in self.sigmas], self.angles_deg)


MORPHOLOGIES: tuple[Morphology, ...] = (
    Morphology("isotropic-fine", (0.015, 0.015, 0.015)),
    Morphology("isotropic-coarse", (0.045, 0.045, 0.045)),
    Morphology("elongated-x", (0.08, 0.02, 0.02)),
    Morphology("elongated-y", (0.02, 0.08, 0.02)),
    Morphology("elongated-diagonal", (0.08, 0.02, 0.02), (45.0, 0.0, 0.0)),
    # A thin plate tilted 30° about x, then turned -60° about z: its sections are broad traces at -60°.
    Morphology("plate-tilted", (0.07, 0.07, 0.012), (-60.0, 0.0, 30.0)),
    Morphology("banded", (0.2, 0.012, 0.05)),
)
VOLUME_FRACTIONS: tuple[float, ...] = tuple(round(0.05 * step, 2) for step in range(1, 11))

# Fields are sampled on a periodic grid 1.5x the image and cropped, so structures do not wrap
# around from one edge to the opposite one.
_GRID_FACTOR = 1.5
_IMAGE_STREAM = 1
_ORDER_STREAM = 2


@dataclass
class NfurcatedBatch:
    images: np.ndarray  # uint8 (B, H, W), 0 or 255; white phase = 255
    morphology: np.ndarray  # int64 (B,), index into MORPHOLOGIES
    volume_fraction_class: np.ndarray  # int64 (B,), index into VOLUME_FRACTIONS
    volume_fraction: np.ndarray  # float32 (B,), measured white fraction


def nfurcated_batches(
    images_per_combination: int = 50,
    size: int = 128,
    seed: int = 0,
    batch_size: int = 64,
    fraction_jitter: float = 0.01,
) -> Iterator[NfurcatedBatch]:
    """Yields every (morphology, volume fraction) combination `images_per_combination` times.

    Round r holds each of the 70 combinations once in a seeded order, so batches mix classes. Image r
    of a combination depends only on (seed, combination, r, size, fraction_jitter), never on the batching.
    """
    _check_arguments(images_per_combination, size, batch_size, fraction_jitter)
    return _generate(_image_order(images_per_combination, seed), size, seed, batch_size, fraction_jitter)


def _generate(order: np.ndarray, size: int, seed: int, batch_size: int,
              fraction_jitter: float) -> Iterator[NfurcatedBatch]:
    covariances = np.stack([morphology.section_covariance(size) for morphology in MORPHOLOGIES])
    for start in range(0, len(order), batch_size):
        yield _render_batch(order[start : start + batch_size], covariances, size, seed, fraction_jitter)


def _check_arguments(images_per_combination: int, size: int, batch_size: int, fraction_jitter: float) -> None:
    if images_per_combination < 1 or batch_size < 1:
        raise ConfigError(f"images_per_combination ({images_per_combination}) and batch_size ({batch_size}) "
                          "must be >= 1")
    if size < 16:
        raise ConfigError(f"size={size} is too small for the nfurcated morphologies; use at least 16 px")
    if not 0 <= fraction_jitter < 0.05:
        raise ConfigError(f"fraction_jitter={fraction_jitter} must lie in [0, 0.05) "
                          "so the volume-fraction classes stay apart")


def _image_order(images_per_combination: int, seed: int) -> np.ndarray:
    """(N, 3) rows of (morphology, volume-fraction class, replicate), one seeded round after another."""
    combinations = len(MORPHOLOGIES) * len(VOLUME_FRACTIONS)
    rounds = []
    for replicate in range(images_per_combination):
        shuffled = np.random.default_rng([seed, replicate, 0, _ORDER_STREAM]).permutation(combinations)
        morphology, fraction_class = np.divmod(shuffled, len(VOLUME_FRACTIONS))
        rounds.append(np.stack([morphology, fraction_class, np.full(combinations, replicate)], 1))
    return np.concatenate(rounds).astype(np.int64)


def _render_batch(rows: np.ndarray, covariances: np.ndarray, size: int, seed: int,
                  fraction_jitter: float) -> NfurcatedBatch:
    morphology, fraction_class, replicate = rows.T
    combination = morphology * len(VOLUME_FRACTIONS) + fraction_class
    rngs = [np.random.default_rng([seed, int(c), int(r), _IMAGE_STREAM]) for c, r in zip(combination, replicate)]
    grid = fft_length(math.ceil(size * _GRID_FACTOR))
    jitter = per_image(rngs, lambda rng: rng.uniform(-fraction_jitter, fraction_jitter))
    noise = per_image(rngs, lambda rng: rng.standard_normal((grid, grid), dtype=np.float32))
    fields = filtered_noise(noise, covariances[morphology])[:, :size, :size]
    targets = np.asarray(VOLUME_FRACTIONS)[fraction_class] + jitter
    white, measured = threshold_at_fraction(fields, targets)
    return NfurcatedBatch(
        images=white.astype(np.uint8) * np.uint8(255),
        morphology=morphology.copy(),
        volume_fraction_class=fraction_class.copy(),
        volume_fraction=measured,
    )
