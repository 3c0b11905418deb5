"""Many-class few-shot benchmark of synthetic grayscale micrographs: eight metallographic families,
each class one parameter set of one family, images varied by seed and by imaging nuisance."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from metallo_core.data.synthetic.fields import (
    fft_length,
    filtered_noise,
    fraction_thresholds,
    gaussian_blur,
    illumination_gain,
    per_image,
    planar_covariance,
    soft_step,
    to_uint8,
    zoom_about_centre,
)
from metallo_core.errors import ConfigError, DataError

FEWSHOT_SPLIT_SIZES = (64, 16, 20)
# Lengths in class params are pixels at this image size; other sizes scale them, so a class looks
# the same (resized) at any resolution.
REFERENCE_SIZE = 84
MAGNIFICATION_RANGE = (0.85, 1.15)
MAX_BLUR_SIGMA = 0.9  # pixels at REFERENCE_SIZE
_CHUNK = 16  # images per vectorised render call: bounds memory at 224 px
_CLASS_STREAM = 1
_SPLIT_STREAM = 2

Rngs = Sequence[np.random.Generator]


@dataclass(frozen=True)
class FewShotClass:
    name: str  # e.g. "lamellae-07"
    family: str
    params: dict  # plain JSON-able values; lengths in pixels at REFERENCE_SIZE


# ----------------------------------------------------------------------------------------- classes


def _grid(**axes: Sequence) -> list[dict]:
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


# Levels along each axis are far enough apart (lengths by >= 1.4x, beyond the ±15% magnification
# jitter) for a texture descriptor to tell neighbouring classes apart.
FAMILY_GRIDS: dict[str, list[dict]] = {
    "blobs": _grid(sigma=[1.3, 2.4], aspect=[1.0, 3.5], angle_deg=[0, 60, 120], fraction=[0.2, 0.45]),
    "lamellae": _grid(spacing=[3.5, 5.0, 7.5, 11.0], colony_size=[16, 34], cementite_fraction=[0.18, 0.4]),
    "grains": _grid(grain_size=[9, 14, 22, 34], boundary_width=[0.8, 2.0], grain_contrast=[0.12, 0.3]),
    "laths": _grid(lath_width=[0.9, 1.5, 2.4], aspect=[4, 9], packet_size=[18, 40], fraction=[0.3, 0.5]),
    "spheroids": _grid(radius=[1.2, 2.0, 3.4], spacing_ratio=[2.6, 4.5], dispersion=[0.1, 0.4], occupancy=[0.6, 1.0]),
    "widmanstatten": _grid(grain_size=[30, 55], plate_width=[1.0, 1.8], plate_length=[8, 18],
                           boundary_ferrite=[1.0, 3.0]),
    "boundaries": _grid(grain_size=[8, 13, 20, 32], boundary_width=[0.7, 1.8], decorated=[False, True]),
    "dual_phase": _grid(grain_size=[10, 20], island_fraction=[0.12, 0.25, 0.4], island_size=[1.2, 2.5],
                        boundary_bias=[0.0, 1.5]),
}
# Blobs with aspect 1 are isotropic: their angle is meaningless, so keep one angle per such class.
FAMILY_GRIDS["blobs"] = [p for p in FAMILY_GRIDS["blobs"] if p["aspect"] > 1 or p["angle_deg"] == 0]


def fewshot_classes(num_classes: int = 100, seed: int = 0) -> list[FewShotClass]:
    """Classes spread evenly over the families, each a seeded pick from its family's parameter grid.

    The position of a class in this list is its `class_index` for `render_images`.
    """
    counts = _classes_per_family(num_classes)
    classes = []
    for family_index, (family, count) in enumerate(counts.items()):
        grid = FAMILY_GRIDS[family]
        picks = np.random.default_rng([seed, family_index, 0, _CLASS_STREAM]).permutation(len(grid))[:count]
        for number, grid_index in enumerate(sorted(picks)):
            classes.append(FewShotClass(f"{family}-{number:02d}", family, dict(grid[grid_index])))
    return classes


def _classes_per_family(num_classes: int) -> dict[str, int]:
    capacity = sum(len(grid) for grid in FAMILY_GRIDS.values())
    if not 1 <= num_classes <= capacity:
        raise ConfigError(f"num_classes={num_classes} is out of range: "
                          f"the few-shot families offer 1..{capacity} classes")
    counts = dict.fromkeys(FAMILY_GRIDS, 0)
    # Round-robin over the families that still have unused parameter sets.
    while sum(counts.values()) < num_classes:
        for family, grid in FAMILY_GRIDS.items():
            if counts[family] < len(grid) and sum(counts.values()) < num_classes:
                counts[family] += 1
    return counts


def split_classes(
    classes: list[FewShotClass], sizes: Sequence[int] = FEWSHOT_SPLIT_SIZES, seed: int = 0
) -> dict[str, list[FewShotClass]]:
    """Class-disjoint train/val/test splits, each drawing from every family in turn.

    `sizes` are used as given when they add up to len(classes), otherwise scaled to it (val and test
    keep at least 5 classes, enough for 5-way tasks).
    """
    train_size, val_size, test_size = _scaled_split_sizes(len(classes), sizes)
    rng = np.random.default_rng([seed, 0, 0, _SPLIT_STREAM])
    by_family: dict[str, list[FewShotClass]] = {}
    for spec in classes:
        by_family.setdefault(spec.family, []).append(spec)
    queues = [[members[i] for i in rng.permutation(len(members))] for members in by_family.values()]
    queues = [queues[i] for i in rng.permutation(len(queues))]
    # Dealing one class per family per round puts every family into test and val before train.
    dealt = [spec for round_ in itertools.zip_longest(*queues) for spec in round_ if spec is not None]
    chosen = {"test": dealt[:test_size], "val": dealt[test_size : test_size + val_size],
              "train": dealt[test_size + val_size :]}
    # Keep each split in the order of `classes`, which is the order of class indices.
    return {split: [spec for spec in classes if spec in members] for split, members in chosen.items()}


def _scaled_split_sizes(num_classes: int, sizes: Sequence[int]) -> tuple[int, int, int]:
    if len(sizes) != 3 or min(sizes) < 0 or sum(sizes) == 0:
        raise ConfigError(f"split sizes must be three non-negative counts (train, val, test), got {tuple(sizes)}")
    if sum(sizes) == num_classes:
        return tuple(sizes)
    val_size = max(5, round(num_classes * sizes[1] / sum(sizes)))
    test_size = max(5, round(num_classes * sizes[2] / sum(sizes)))
    train_size = num_classes - val_size - test_size
    if train_size < 1:
        raise DataError(f"{num_classes} classes cannot fill train, val (>= 5) and test (>= 5); use at least 11 classes")
    return train_size, val_size, test_size


# ----------------------------------------------------------------------------------------- rendering


def render_images(
    spec: FewShotClass, class_index: int, count: int, size: int = 84, seed: int = 0, start: int = 0,
    length_scale: float | None = None,
) -> np.ndarray:
    """Images start .. start + count - 1 of a class, uint8 (count, size, size).

    Lengths (feature sizes, blur) are the class's at REFERENCE_SIZE times `length_scale`, by default
    size / REFERENCE_SIZE (the same micrograph at any size); a fixed `length_scale` keeps the features as many
    pixels wide at any size, as a larger field of view at one magnification does (1.0 on a 640-px image: the
    features of an 84-px render, a few pixels wide, over a frame of SEM size).
    Image i depends only on (seed, class_index, i), size and length_scale, so chunks rendered anywhere agree.
    """
    if spec.family not in _RENDERERS:
        raise DataError(f"class {spec.name!r} has unknown family {spec.family!r}; known: {sorted(_RENDERERS)}")
    if size < 16:
        raise ConfigError(f"size={size} is too small for the few-shot micrographs; "
                          "use at least 16 px (32..224 intended)")
    if min(count, start, class_index, seed) < 0:
        raise ConfigError(f"count ({count}), start ({start}), class_index ({class_index}) "
                          f"and seed ({seed}) must be >= 0")
    stop = start + count
    chunks = [np.zeros((0, size, size), np.uint8)]
    for first in range(start, stop, _CHUNK):
        rngs = [np.random.default_rng([seed, class_index, index]) for index in range(first, min(first + _CHUNK, stop))]
        chunks.append(_render_chunk(spec, rngs, size, size / REFERENCE_SIZE if length_scale is None else length_scale))
    return np.concatenate(chunks)


def _render_chunk(spec: FewShotClass, rngs: Rngs, size: int, scale: float) -> np.ndarray:
    # Render on a canvas big enough for the strongest zoom-out, then resample to `size`.
    canvas = math.ceil((size - 1) / MAGNIFICATION_RANGE[0]) + 2
    clean = _RENDERERS[spec.family](spec.params, rngs, canvas, scale)
    return to_uint8(_apply_nuisance(clean, rngs, size, scale))


def _apply_nuisance(clean: np.ndarray, rngs: Rngs, size: int, scale: float) -> np.ndarray:
    """Magnification, optical blur, uneven illumination, contrast/brightness and sensor noise."""
    zooms = per_image(rngs, lambda rng: rng.uniform(*MAGNIFICATION_RANGE))
    blur = per_image(rngs, lambda rng: rng.uniform(0.2, MAX_BLUR_SIGMA)) * scale
    slopes = per_image(rngs, lambda rng: rng.uniform(-0.2, 0.2, size=2)).astype(np.float32)
    vignetting = per_image(rngs, lambda rng: rng.uniform(0.0, 0.2)).astype(np.float32)
    contrast = per_image(rngs, lambda rng: rng.uniform(0.7, 1.1)).astype(np.float32)
    brightness = per_image(rngs, lambda rng: rng.uniform(-0.1, 0.1)).astype(np.float32)
    noise_level = per_image(rngs, lambda rng: rng.uniform(0.01, 0.04)).astype(np.float32)
    noise = per_image(rngs, lambda rng: rng.standard_normal((size, size), dtype=np.float32))
    image = gaussian_blur(zoom_about_centre(clean, zooms, size), blur, MAX_BLUR_SIGMA * scale)
    image = image * illumination_gain(size, slopes, vignetting)
    image = 0.5 + contrast[:, None, None] * (image - 0.5) + brightness[:, None, None]
    return image + noise_level[:, None, None] * noise


# Each renderer maps (params, per-image generators, canvas side, length scale) to clean intensities
# in [0, 1], float32 (B, canvas, canvas). Lengths in params are multiplied by the scale.


def _render_blobs(params: dict, rngs: Rngs, canvas: int, scale: float) -> np.ndarray:
    """Two-phase anisotropic Gaussian random field (seed 002's morphologies)."""
    sigma_across = params["sigma"] * scale
    covariance = planar_covariance(sigma_across * params["aspect"], sigma_across, np.deg2rad(params["angle_deg"]))
    field = _random_fields(rngs, canvas, covariance[None])[:, 0]
    second_phase = _phase_at_fraction(field, params["fraction"], sigma_across)
    return 0.75 - 0.45 * second_phase


def _render_lamellae(params: dict, rngs: Rngs, canvas: int, scale: float) -> np.ndarray:
    """Pearlite: colonies of parallel cementite lamellae, orientation, phase and spacing set per colony."""
    colonies = _voronoi(rngs, canvas, params["colony_size"] * scale)
    angle = colonies.paint(per_image(rngs, lambda rng: rng.uniform(0, np.pi, colonies.num_cells)))
    offset = colonies.paint(per_image(rngs, lambda rng: rng.uniform(0, 2 * np.pi, colonies.num_cells)))
    spacing_factor = per_image(rngs, lambda rng: np.exp(0.12 * rng.standard_normal(colonies.num_cells)))
    period = params["spacing"] * scale * colonies.paint(spacing_factor)
    across = colonies.x * np.cos(angle) + colonies.y * np.sin(angle)
    wave = np.cos(2 * np.pi * across / period + offset)
    level = np.cos(np.pi * params["cementite_fraction"])
    # Slope of the wave where it crosses the level, so every lamella edge is ~1 px wide.
    edge = np.sin(np.pi * params["cementite_fraction"]) * 2 * np.pi / period
    cementite = soft_step(wave - level, edge)
    colony_boundary = soft_step(0.6 - colonies.boundary_distance, 1.0)
    return 0.8 - 0.5 * cementite - 0.15 * colony_boundary


def _render_grains(params: dict, rngs: Rngs, canvas: int, scale: float) -> np.ndarray:
    """Equiaxed grains etched to orientation-dependent grey levels, with dark boundaries."""
    grains = _voronoi(rngs, canvas, params["grain_size"] * scale)
    shade = grains.paint(per_image(rngs, lambda rng: rng.uniform(-1, 1, grains.num_cells)))
    boundary = soft_step(params["boundary_width"] * scale / 2 - grains.boundary_distance, 1.0)
    interior = 0.6 + params["grain_contrast"] * shade
    return interior * (1 - boundary) + 0.15 * boundary


def _render_boundaries(params: dict, rngs: Rngs, canvas: int, scale: float) -> np.ndarray:
    """Nital-etched single phase: uniform grains, a boundary network, optionally beaded with particles."""
    grains = _voronoi(rngs, canvas, params["grain_size"] * scale)
    width = params["boundary_width"] * scale
    dark = soft_step(width / 2 - grains.boundary_distance, 1.0)
    if params["decorated"]:
        radius = 1.5 * width + scale
        particles = _disc_coverage(rngs, canvas, 4 * radius, radius, dispersion=0.25, occupancy=0.8)
        dark = np.maximum(dark, particles * soft_step(radius - grains.boundary_distance, 1.0))
    return 0.78 - 0.6 * dark


def _render_spheroids(params: dict, rngs: Rngs, canvas: int, scale: float) -> np.ndarray:
    """Spheroidised carbides: dark round particles of set size, density and size spread in a ferrite matrix."""
    radius = params["radius"] * scale
    cover = _disc_coverage(rngs, canvas, params["spacing_ratio"] * radius, radius, params["dispersion"],
                           params["occupancy"])
    return 0.78 - 0.5 * cover


def _render_laths(params: dict, rngs: Rngs, canvas: int, scale: float) -> np.ndarray:
    """Martensite: packets of thin parallel laths, each packet in one of four orientation variants."""
    variants = 4
    packets = _voronoi(rngs, canvas, params["packet_size"] * scale)
    base = per_image(rngs, lambda rng: rng.uniform(0, np.pi))
    angles = base[:, None] + np.pi / variants * np.arange(variants)[None, :]
    variant = packets.paint(per_image(rngs, lambda rng: rng.integers(0, variants, packets.num_cells)))
    width = params["lath_width"] * scale
    fields = _random_fields(rngs, canvas, planar_covariance(width * params["aspect"], width, angles))
    field = np.take_along_axis(fields, variant[:, None], axis=1)[:, 0]
    laths = _phase_at_fraction(field, params["fraction"], width)
    return 0.35 + 0.4 * laths - 0.1 * soft_step(0.6 - packets.boundary_distance, 1.0)


def _render_widmanstatten(params: dict, rngs: Rngs, canvas: int, scale: float) -> np.ndarray:
    """Widmanstätten ferrite: boundary ferrite plus side plates at 0/60/120° growing into each grain."""
    grains = _voronoi(rngs, canvas, params["grain_size"] * scale)
    base = per_image(rngs, lambda rng: rng.uniform(0, np.pi))
    angles = base[:, None] + np.deg2rad([0.0, 60.0, 120.0])[None, :]
    variant = grains.paint(per_image(rngs, lambda rng: rng.integers(0, 3, grains.num_cells)))
    depth = params["plate_length"] * scale * grains.paint(
        per_image(rngs, lambda rng: rng.uniform(0.6, 1.4, grains.num_cells)))
    width = params["plate_width"] * scale
    length = max(4 * width, 0.6 * params["plate_length"] * scale)
    fields = _random_fields(rngs, canvas, planar_covariance(length, width, angles))
    field = np.take_along_axis(fields, variant[:, None], axis=1)[:, 0]
    plates = _phase_at_fraction(field, 0.45, width) * soft_step(depth - grains.boundary_distance, 2.0)
    boundary_ferrite = soft_step(params["boundary_ferrite"] * scale - grains.boundary_distance, 1.0)
    return 0.3 + 0.5 * np.maximum(plates, boundary_ferrite)


def _render_dual_phase(params: dict, rngs: Rngs, canvas: int, scale: float) -> np.ndarray:
    """Dual-phase steel: dark martensite islands in ferrite grains, optionally sitting on the boundaries."""
    grains = _voronoi(rngs, canvas, params["grain_size"] * scale)
    island_size = params["island_size"] * scale
    field = _random_fields(rngs, canvas, planar_covariance(island_size, island_size, 0.0)[None])[:, 0]
    # Islands form where austenite nucleated: on ferrite boundaries when the bias is on.
    field = field + params["boundary_bias"] * np.exp(-grains.boundary_distance / (2 * island_size))
    islands = _phase_at_fraction(field, params["island_fraction"], island_size)
    boundary = soft_step(0.5 * scale - grains.boundary_distance, 1.0)
    return 0.8 - 0.25 * boundary * (1 - islands) - 0.5 * islands


_RENDERERS: dict[str, Callable[[dict, Rngs, int, float], np.ndarray]] = {
    "blobs": _render_blobs,
    "lamellae": _render_lamellae,
    "grains": _render_grains,
    "laths": _render_laths,
    "spheroids": _render_spheroids,
    "widmanstatten": _render_widmanstatten,
    "boundaries": _render_boundaries,
    "dual_phase": _render_dual_phase,
}


# ----------------------------------------------------------------------------------------- geometry


@dataclass
class _Tessellation:
    labels: np.ndarray  # int32 (B, R, R), cell id per pixel, < num_cells
    boundary_distance: np.ndarray  # float32 (B, R, R), pixels to the nearest cell boundary
    num_cells: int
    y: np.ndarray  # float32 (R, 1), pixel-centre rows
    x: np.ndarray  # float32 (1, R), pixel-centre columns

    def paint(self, values: np.ndarray) -> np.ndarray:
        """Per-cell values (B, num_cells) spread over each cell's pixels (B, R, R); floats as float32."""
        if np.issubdtype(values.dtype, np.floating):
            values = values.astype(np.float32)
        return _gather(values, self.labels)


def _voronoi(rngs: Rngs, canvas: int, cell_size: float) -> _Tessellation:
    """Voronoi cells of one seed placed uniformly in each square of a grid with pitch cell_size.

    One seed per square gives roughly equal grains (as real equiaxed grains are). A pixel's nearest
    seed then lies within 2 squares of its own, so 25 candidates per pixel suffice: memory and time
    scale with the image, not with the number of grains.
    """
    squares = math.ceil(canvas / cell_size) + 4
    jitter = per_image(rngs, lambda rng: rng.random((2, squares, squares), dtype=np.float32))
    seed_y = ((np.arange(squares)[:, None] - 2 + jitter[:, 0]) * cell_size).astype(np.float32)
    seed_x = ((np.arange(squares)[None, :] - 2 + jitter[:, 1]) * cell_size).astype(np.float32)
    centres = np.arange(canvas, dtype=np.float32) + 0.5
    home = (centres // cell_size).astype(np.int64) + 2
    (nearest, nearest_id), (second, second_id) = _two_nearest_seeds(seed_y, seed_x, centres, home)
    flat_y, flat_x = seed_y.reshape(len(rngs), -1), seed_x.reshape(len(rngs), -1)
    separation = np.hypot(
        _gather(flat_y, nearest_id) - _gather(flat_y, second_id),
        _gather(flat_x, nearest_id) - _gather(flat_x, second_id),
    )
    # Distance to the bisector of the two nearest seeds: exact near a boundary, which is where it matters.
    boundary_distance = (second - nearest) / (2 * np.maximum(separation, 1e-6))
    return _Tessellation(nearest_id, boundary_distance, squares * squares, centres[:, None], centres[None, :])


def _two_nearest_seeds(
    seed_y: np.ndarray, seed_x: np.ndarray, centres: np.ndarray, home: np.ndarray
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((squared distance, seed id), (second squared distance, seed id)) per pixel, each (B, R, R)."""
    batch, squares, _ = seed_y.shape
    canvas = len(centres)
    best = np.full((batch, canvas, canvas), np.inf, np.float32)
    runner_up = best.copy()
    best_id = np.zeros((batch, canvas, canvas), np.int32)
    runner_up_id = best_id.copy()
    for d_row, d_col in itertools.product(range(-2, 3), repeat=2):
        rows, cols = home + d_row, home + d_col
        # Squared offsets are computed per (pixel row, square column) and (square row, pixel column),
        # then spread to pixels: two gathers instead of one per coordinate per pixel.
        dy2 = np.square(np.take(seed_y, rows, axis=1) - centres[None, :, None])  # (B, R, S)
        dx2 = np.square(np.take(seed_x, cols, axis=2) - centres[None, None, :])  # (B, S, R)
        distance = np.take(dy2, cols, axis=2) + np.take(dx2, rows, axis=1)
        candidate_id = (rows[:, None] * squares + cols[None, :]).astype(np.int32)
        closer_than_best = distance < best
        closer_than_runner_up = distance < runner_up
        # In place, in this order: a new best pushes the old best down to runner-up.
        np.copyto(runner_up, distance, where=closer_than_runner_up)
        np.copyto(runner_up_id, candidate_id, where=closer_than_runner_up)
        np.copyto(runner_up, best, where=closer_than_best)
        np.copyto(runner_up_id, best_id, where=closer_than_best)
        np.copyto(best, distance, where=closer_than_best)
        np.copyto(best_id, candidate_id, where=closer_than_best)
    return (best, best_id), (runner_up, runner_up_id)


def _gather(values: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """values (B, N) looked up at ids (B, ...) per image."""
    return np.take_along_axis(values, ids.reshape(len(ids), -1), axis=1).reshape(ids.shape)


def _disc_coverage(rngs: Rngs, canvas: int, cell_size: float, radius: float, dispersion: float,
                   occupancy: float) -> np.ndarray:
    """Anti-aliased cover (B, R, R) of round particles: at most one per grid square, present with
    probability `occupancy`, radius log-normal about `radius`. Radii are capped below the square
    size so each pixel need only look at the 3 x 3 squares around it."""
    squares = math.ceil(canvas / cell_size) + 2
    shape = (squares, squares)
    centres_in_square = per_image(rngs, lambda rng: rng.random((*shape, 2), dtype=np.float32))
    radii = per_image(rngs, lambda rng: radius * np.exp(dispersion * rng.standard_normal(shape)))
    present = per_image(rngs, lambda rng: rng.random(shape) < occupancy)
    radii = np.where(present, np.minimum(radii, cell_size - 0.5), 0.0).astype(np.float32)
    origin = np.stack(np.meshgrid(np.arange(squares), np.arange(squares), indexing="ij"), -1) - 1
    centres = ((origin + centres_in_square) * cell_size).astype(np.float32)
    pixels = np.arange(canvas, dtype=np.float32) + 0.5
    home = (pixels // cell_size).astype(np.int64) + 1
    cover = np.zeros((len(rngs), canvas, canvas), np.float32)
    for d_row, d_col in itertools.product(range(-1, 2), repeat=2):
        rows, cols = (home + d_row)[:, None], (home + d_col)[None, :]
        centre = centres[:, rows, cols]
        distance = np.sqrt((centre[..., 0] - pixels[:, None]) ** 2 + (centre[..., 1] - pixels[None, :]) ** 2)
        cover = np.maximum(cover, soft_step(radii[:, rows, cols] - distance, 1.0))
    return cover


def _random_fields(rngs: Rngs, canvas: int, covariances: np.ndarray) -> np.ndarray:
    """Standardised Gaussian random fields (B, V, R, R): V kernels per image, covariances (B or 1, V, 2, 2).

    The FFT grid is barely larger than the canvas, so structures may wrap across opposite edges:
    invisible in a texture class, and it keeps the cost at one FFT of about the image size.
    """
    variants = covariances.shape[-3]
    grid = fft_length(canvas)
    noise = per_image(rngs, lambda rng: rng.standard_normal((variants, grid, grid), dtype=np.float32))
    covariances = np.broadcast_to(covariances, (len(rngs), variants, 2, 2))
    fields = filtered_noise(noise.reshape(-1, grid, grid), covariances.reshape(-1, 2, 2))
    return fields.reshape(len(rngs), variants, grid, grid)[:, :, :canvas, :canvas]


def _phase_at_fraction(field: np.ndarray, fraction: float, length_scale: float) -> np.ndarray:
    """Soft phase map covering `fraction` of each image, edges ~1 px wide.

    A standardised field filtered at length scale s changes by about 1 / (s √2) per pixel.
    """
    thresholds = fraction_thresholds(field, np.full(len(field), fraction))
    return soft_step(field - thresholds[:, None, None], 1.0 / (max(length_scale, 0.5) * math.sqrt(2)))
