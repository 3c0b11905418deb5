"""Synthetic microstructures: seed 002's labelled fields, the 2-D section shortcut, and the few-shot benchmark."""

import json

import numpy as np
import pytest

from metallo_core.data.synthetic import (
    FEWSHOT_SPLIT_SIZES,
    MORPHOLOGIES,
    VOLUME_FRACTIONS,
    fewshot_classes,
    nfurcated_batches,
    render_images,
    split_classes,
)
from metallo_core.data.synthetic.fields import filtered_noise, kernel_covariance_3d, section_covariance
from metallo_core.errors import ConfigError

# ----------------------------------------------------------------------------------------- nfurcated


def _collect(**kwargs):
    batches = list(nfurcated_batches(**kwargs))
    fields = ("images", "morphology", "volume_fraction_class", "volume_fraction")
    return batches, {name: np.concatenate([getattr(batch, name) for batch in batches]) for name in fields}


def test_nfurcated_batches_cover_every_label_combination_with_binary_images():
    batches, data = _collect(images_per_combination=2, size=32, seed=0, batch_size=64)
    assert [len(batch.images) for batch in batches] == [64, 64, 12]
    assert data["images"].dtype == np.uint8 and data["images"].shape == (140, 32, 32)
    assert set(np.unique(data["images"])) == {0, 255}
    assert data["morphology"].dtype == np.int64 and data["volume_fraction_class"].dtype == np.int64
    assert data["volume_fraction"].dtype == np.float32
    combinations = data["morphology"] * len(VOLUME_FRACTIONS) + data["volume_fraction_class"]
    assert np.array_equal(np.bincount(combinations, minlength=70), np.full(70, 2))
    # Classes are interleaved: the first round already holds all 70 combinations once.
    assert len(set(combinations[:70].tolist())) == 70


def test_nfurcated_measured_fraction_is_the_white_area_within_jitter_of_its_class():
    _, data = _collect(images_per_combination=3, size=48, seed=1, fraction_jitter=0.01)
    white_area = (data["images"] == 255).mean(axis=(1, 2))
    np.testing.assert_allclose(data["volume_fraction"], white_area, atol=1e-6)
    class_fraction = np.asarray(VOLUME_FRACTIONS)[data["volume_fraction_class"]]
    assert np.abs(data["volume_fraction"] - class_fraction).max() <= 0.01 + 0.005
    # The jitter makes the measured fraction continuous rather than ten spikes.
    assert len(np.unique(np.round(data["volume_fraction"], 3))) > 50


def test_nfurcated_is_deterministic_by_seed_and_independent_of_batching():
    _, first = _collect(images_per_combination=1, size=32, seed=5, batch_size=64)
    _, again = _collect(images_per_combination=1, size=32, seed=5, batch_size=7)
    _, other = _collect(images_per_combination=1, size=32, seed=6, batch_size=64)
    assert first["images"].tobytes() == again["images"].tobytes()
    assert np.array_equal(first["morphology"], again["morphology"])
    assert first["images"].tobytes() != other["images"].tobytes()


def test_nfurcated_morphologies_are_distinct_and_named():
    assert len(MORPHOLOGIES) == 7 and len({m.name for m in MORPHOLOGIES}) == 7
    assert VOLUME_FRACTIONS == (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)
    sections = [m.section_covariance(128) for m in MORPHOLOGIES]
    for i in range(len(sections)):
        for j in range(i + 1, len(sections)):
            assert np.abs(sections[i] - sections[j]).max() > 1.0, (MORPHOLOGIES[i].name, MORPHOLOGIES[j].name)


def test_nfurcated_rejects_a_jitter_that_would_blur_the_fraction_classes():
    with pytest.raises(ConfigError, match="fraction_jitter"):
        nfurcated_batches(fraction_jitter=0.1)


# ----------------------------------------------------------------------------------------- 2-D sections

# A kernel tilted out of the section plane about all three axes: the case where the shortcut matters.
TILTED_SIGMAS = (6.0, 2.0, 1.5)  # pixels
TILTED_ANGLES = (30.0, 40.0, 25.0)  # degrees about z, y, x
LAGS_XY = [(1, 0), (2, 0), (4, 0), (0, 1), (0, 2), (0, 4), (2, 2), (2, -2), (3, -1)]


def _autocorrelation(sections: np.ndarray) -> np.ndarray:
    """Periodic autocorrelation of zero-mean fields (N, H, W) at LAGS_XY (x along columns)."""
    sections = sections - sections.mean()
    variance = np.mean(sections**2)
    return np.array([np.mean(sections * np.roll(sections, (dy, dx), axis=(1, 2))) / variance for dx, dy in LAGS_XY])


def _slices_of_3d_fields(rng, count: int, side: int) -> np.ndarray:
    """The slow way: white noise on a side³ grid filtered by the rotated 3-D kernel; every z-slice."""
    frequencies = np.meshgrid(*[np.fft.fftfreq(side)] * 3, indexing="ij")  # axes x, y, z
    frequency = np.stack(frequencies, -1)
    covariance = kernel_covariance_3d(TILTED_SIGMAS, TILTED_ANGLES)
    transfer = np.exp(-2 * np.pi**2 * np.einsum("...i,ij,...j->...", frequency, covariance, frequency))
    slices = []
    for _ in range(count):
        field = np.fft.ifftn(np.fft.fftn(rng.standard_normal((side,) * 3)) * transfer).real
        slices.append(np.transpose(field, (2, 1, 0)))  # (z, y, x): one image per z
    return np.concatenate(slices)


def test_section_shortcut_matches_slices_of_a_real_3d_field():
    side = 48
    rng = np.random.default_rng(0)
    slow = _autocorrelation(_slices_of_3d_fields(rng, 4, side))
    shortcut_covariance = section_covariance(TILTED_SIGMAS, TILTED_ANGLES)
    fast = _autocorrelation(filtered_noise(rng.standard_normal((192, side, side)).astype(np.float32),
                                           shortcut_covariance))
    # Both against each other and against the exact correlation exp(-hᵀ S⁻¹ h / 4) of the shortcut.
    lags = np.array(LAGS_XY, dtype=np.float64)
    exact = np.exp(-np.einsum("ni,ij,nj->n", lags, np.linalg.inv(shortcut_covariance), lags) / 4)
    np.testing.assert_allclose(fast, slow, atol=0.05)
    np.testing.assert_allclose(slow, exact, atol=0.05)
    # The x-y block of the 3-D covariance (the kernel's shadow, not its section) would be wrong here.
    shadow = kernel_covariance_3d(TILTED_SIGMAS, TILTED_ANGLES)[:2, :2]
    shadow_correlation = np.exp(-np.einsum("ni,ij,nj->n", lags, np.linalg.inv(shadow), lags) / 4)
    assert np.abs(shadow_correlation - slow).max() > 0.2


# ----------------------------------------------------------------------------------------- few-shot classes


def test_fewshot_classes_are_many_unique_and_spread_over_families():
    classes = fewshot_classes()
    assert len(classes) == 100
    assert len({spec.name for spec in classes}) == 100
    families = {spec.family for spec in classes}
    assert len(families) >= 6
    assert all(spec.name.startswith(spec.family + "-") for spec in classes)
    json.dumps([spec.params for spec in classes])  # plain values only
    # No two classes share a parameter set.
    assert len({(spec.family, json.dumps(spec.params, sort_keys=True)) for spec in classes}) == 100
    assert fewshot_classes(seed=3) != classes and fewshot_classes(seed=3) == fewshot_classes(seed=3)


def test_split_classes_is_disjoint_mixed_and_deterministic():
    classes = fewshot_classes()
    splits = split_classes(classes)
    assert [len(splits[name]) for name in ("train", "val", "test")] == list(FEWSHOT_SPLIT_SIZES)
    names = [{spec.name for spec in splits[name]} for name in ("train", "val", "test")]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert set.union(*names) == {spec.name for spec in classes}
    assert all(len({spec.family for spec in members}) >= 3 for members in splits.values())
    assert split_classes(classes, seed=0) == splits and split_classes(classes, seed=1) != splits


def test_split_classes_scales_to_other_class_counts():
    splits = split_classes(fewshot_classes(num_classes=30))
    sizes = [len(splits[name]) for name in ("train", "val", "test")]
    assert sum(sizes) == 30 and sizes[1] >= 5 and sizes[2] >= 5
    with pytest.raises(ConfigError, match="num_classes"):
        fewshot_classes(num_classes=10_000)


# ----------------------------------------------------------------------------------------- few-shot images


def test_render_images_depends_only_on_seed_class_and_index():
    classes = fewshot_classes()
    for class_index in (0, 17, 60, 99):
        spec = classes[class_index]
        head = render_images(spec, class_index, 6, size=40, seed=2)
        tail = render_images(spec, class_index, 3, size=40, seed=2, start=3)
        assert head.dtype == np.uint8 and head.shape == (6, 40, 40)
        assert tail.tobytes() == head[3:].tobytes()
        assert not np.array_equal(head[0], head[1])
        assert not np.array_equal(render_images(spec, class_index, 2, size=40, seed=3), head[:2])


def test_a_fixed_length_scale_keeps_features_as_many_pixels_wide_over_a_larger_frame():
    """What benchmarks/resolution.py renders: a micrograph of SEM size whose features are as wide as at 84 px."""
    classes = fewshot_classes()
    lamellae = next(index for index, spec in enumerate(classes) if spec.family == "lamellae")
    spec = classes[lamellae]
    default = render_images(spec, lamellae, 2, size=64, seed=1)
    assert render_images(spec, lamellae, 2, size=64, seed=1, length_scale=64 / 84).tobytes() == default.tobytes()

    def mean_frequency(images: np.ndarray) -> float:
        """The power spectrum's centroid in cycles per pixel: higher for finer features."""
        centred = images.astype(np.float64) - images.mean(axis=(1, 2), keepdims=True)
        power = np.abs(np.fft.rfft2(centred)) ** 2
        radius = np.hypot(np.fft.fftfreq(images.shape[1])[:, None], np.fft.rfftfreq(images.shape[2])[None])
        return float((power * radius).sum() / power.sum())

    same_micrograph = render_images(spec, lamellae, 2, size=256, seed=1)  # features grow with the frame
    wide_field = render_images(spec, lamellae, 2, size=256, seed=1, length_scale=1.0)
    assert wide_field.shape == same_micrograph.shape == (2, 256, 256)
    # Measured: 0.19 vs 0.10 cycles per pixel (the features of an 84-px render vs three times as wide).
    assert mean_frequency(wide_field) > 1.4 * mean_frequency(same_micrograph)


@pytest.mark.parametrize("size", [32, 224])
def test_every_family_renders_textured_grayscale_at_small_and_large_sizes(size):
    classes = fewshot_classes()
    first_of_family: dict[str, int] = {}
    for index, spec in enumerate(classes):
        first_of_family.setdefault(spec.family, index)
    for family, class_index in first_of_family.items():
        images = render_images(classes[class_index], class_index, 1, size=size)
        assert images.shape == (1, size, size) and images.dtype == np.uint8, family
        assert images.std() > 5, f"{family} renders flat at {size} px"


def _texture_features(images: np.ndarray) -> np.ndarray:
    """A hand-made texture descriptor: mean log power in 6 log-spaced radial x 4 angular frequency bins
    (periods of 2.9 px to half the image) plus a 16-bin grey-level histogram, both of the image
    standardised to zero mean and unit variance (which discards brightness and contrast)."""
    count, size, _ = images.shape
    standard = images.astype(np.float64)
    standard = ((standard - standard.mean(axis=(1, 2), keepdims=True))
                / (standard.std(axis=(1, 2), keepdims=True) + 1e-6))
    log_power = np.log(np.abs(np.fft.fft2(standard)) ** 2 + 1e-3).reshape(count, -1)
    freq_y, freq_x = np.fft.fftfreq(size)[:, None], np.fft.fftfreq(size)[None, :]
    radial = np.digitize(np.hypot(freq_y, freq_x), np.geomspace(2 / size, 0.35, 7)) - 1
    angular = np.minimum((np.mod(np.arctan2(freq_y, freq_x), np.pi) / np.pi * 4).astype(int), 3)
    bins = np.where((radial >= 0) & (radial < 6), radial * 4 + angular, -1).ravel()
    spectrum = np.stack([log_power[:, bins == b].mean(axis=1) for b in range(24)], axis=1)
    histogram = np.stack([np.histogram(image, bins=16, range=(-3, 3))[0] for image in standard]) / size**2
    return np.concatenate([spectrum, 32 * histogram], axis=1)  # weight: both parts move by ~1 between classes


def _nearest_mean_accuracy(features: np.ndarray, tasks: int, seed: int) -> float:
    """5-way 1-shot, 5 queries per class, nearest (Euclidean) class mean; features (classes, images, dims)."""
    rng = np.random.default_rng(seed)
    correct = 0
    for _ in range(tasks):
        ways = rng.choice(len(features), 5, replace=False)
        picks = np.stack([rng.permutation(features.shape[1])[:6] for _ in ways])
        support = features[ways, picks[:, 0]]  # (5, D): one shot is its own class mean
        queries = features[ways[:, None], picks[:, 1:]].reshape(25, -1)
        distances = ((queries[:, None] - support[None]) ** 2).sum(-1)
        correct += int((distances.argmin(1) == np.repeat(np.arange(5), 5)).sum())
    return correct / (tasks * 25)


def test_fewshot_tasks_defeat_raw_pixels_but_not_a_texture_feature():
    classes = fewshot_classes()
    index_of = {spec.name: index for index, spec in enumerate(classes)}
    test_classes = split_classes(classes)["test"]
    images = np.stack([render_images(spec, index_of[spec.name], 12, size=64) for spec in test_classes])
    raw = images.reshape(len(test_classes), 12, -1).astype(np.float64)
    texture = _texture_features(images.reshape(-1, 64, 64)).reshape(len(test_classes), 12, -1)
    raw_accuracy = _nearest_mean_accuracy(raw, tasks=200, seed=0)
    texture_accuracy = _nearest_mean_accuracy(texture, tasks=200, seed=0)
    # Measured here: raw 0.317, texture 0.799 (chance 0.20). Over class seeds 0-3, test and val
    # splits, the ranges were raw 0.28-0.32 and texture 0.76-0.85.
    assert raw_accuracy < 0.40, raw_accuracy
    assert texture_accuracy > 0.65, texture_accuracy
    assert texture_accuracy > raw_accuracy + 0.3
