"""The batched fast decode path gives the careful path's pixels, and hands it everything unusual."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from metallo_core.data.batch_decode import (
    binary_views,
    decode_batch_resized,
    fast_path_fits,
    sniff_fast,
)
from metallo_core.data.images import decode_resized
from metallo_core.errors import DataError


def textured(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Smooth noise plus grain: compresses like a micrograph, and every resize rounding shows."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((max(2, height // 8), max(2, width // 8), channels)).astype(np.float32)
    smooth = np.stack([np.asarray(Image.fromarray((coarse[..., c] * 255).astype(np.uint8)).resize(
        (width, height), Image.BICUBIC)) for c in range(channels)], axis=-1)
    pixels = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
    return pixels[..., 0] if channels == 1 else pixels


def encoded(pixels: np.ndarray, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def careful(images: list[bytes], size: int) -> np.ndarray:
    return np.stack([decode_resized(data, size) for data in images])


@pytest.mark.parametrize("fmt,save", [("JPEG", {"quality": 90}), ("JPEG", {"quality": 90, "progressive": True}),
                                      ("PNG", {})])
@pytest.mark.parametrize("channels", [1, 3])
def test_fast_path_matches_careful_path(fmt, save, channels):
    # Shapes: square shrink, non-square shrink, no resize, upscale, a 4x PNG shrink (no JPEG draft there).
    shapes = [(256, 256), (300, 260), (224, 224), (200, 180)] + ([(640, 700)] if fmt == "PNG" else [])
    images = [encoded(textured(h, w, channels, seed=i), fmt, **save) for i, (h, w) in enumerate(shapes)]
    assert all(sniff_fast(data) is not None for data in images)
    fast = decode_batch_resized(images, 224).numpy()
    reference = careful(images, 224)
    assert fast.shape == reference.shape == (len(images), 224, 224, 3)
    difference = np.abs(fast.astype(int) - reference)
    # Same libjpeg-turbo/libpng values; the only difference is resize rounding (torch vs PIL, one level).
    assert difference.max() <= 1, difference.max()
    assert difference.mean() < 0.05
    # Where nothing is resized the pixels are exactly the stored values.
    np.testing.assert_array_equal(fast[2], reference[2])


def test_unusual_images_take_the_careful_path_exactly():
    rgb = textured(240, 250)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: the careful path applies it
    rotated = io.BytesIO()
    Image.fromarray(rgb).save(rotated, format="JPEG", quality=90, exif=exif.tobytes())
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])
    sixteen = (textured(240, 250, 1).astype(np.uint16) * 200)
    cmyk = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(cmyk, format="JPEG", quality=90)
    images = [
        rotated.getvalue(),
        encoded(rgba, "PNG"),
        encoded(sixteen, "PNG"),
        cmyk.getvalue(),
        encoded(textured(600, 640), "JPEG", quality=90),  # >= 2 x 224: PIL decodes it at half scale
        encoded(rgb, "TIFF"),
        encoded(rgb, "BMP"),
    ]
    assert [sniff_fast(data) is not None and fast_path_fits(sniff_fast(data), 224) for data in images] == [False] * 7
    with pytest.warns(UserWarning):  # the careful path reports rotation and alpha
        fast = decode_batch_resized(images, 224).numpy()
    with pytest.warns(UserWarning):
        reference = careful(images, 224)
    np.testing.assert_array_equal(fast, reference)


def test_mixed_batch_keeps_row_order():
    plain = [encoded(textured(256, 256, seed=i), "JPEG", quality=90) for i in range(3)]
    tiff = encoded(textured(230, 230, seed=9), "TIFF")
    images = [plain[0], tiff, plain[1], plain[2]]
    fast = decode_batch_resized(images, 224).numpy()
    reference = careful(images, 224)
    assert np.abs(fast.astype(int) - reference).max() <= 1
    np.testing.assert_array_equal(fast[1], reference[1])


def test_truncated_jpeg_raises_the_careful_paths_error():
    data = encoded(textured(256, 256), "JPEG", quality=90)
    assert sniff_fast(data[: len(data) // 2]) is None
    with pytest.raises(DataError, match="shard-7"):
        decode_batch_resized([data, data[: len(data) // 2]], 224, sources=["shard-6", "shard-7"])


def test_binary_views_are_the_column_values_without_copies():
    values = [b"a", b"", b"hello", b"\xff\xd8xyz"]
    array = pa.array(values, type=pa.binary())
    assert [view.tobytes() for view in binary_views(array)] == values
    assert [view.tobytes() for view in binary_views(array.slice(1, 2))] == values[1:3]
    chunked = pa.chunked_array([pa.array(values[:2], pa.binary()), pa.array(values[2:], pa.binary())])
    assert [view.tobytes() for view in binary_views(chunked)] == values
    # The views decode like bytes do.
    jpeg = encoded(textured(256, 256), "JPEG", quality=90)
    views = binary_views(pa.array([jpeg, jpeg]))
    np.testing.assert_array_equal(decode_batch_resized(views, 224).numpy(),
                                  decode_batch_resized([jpeg, jpeg], 224).numpy())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvJPEG)")
def test_gpu_decode_matches_careful_path_within_decoder_tolerance():
    # 4:4:4 colour and grey JPEGs: nvJPEG's IDCT and colour conversion agree with libjpeg-turbo, so only the
    # resize rounding is left (measured on an H200: max 1 grey level, mean 0.21).
    images = [encoded(textured(256 + 8 * i, 256, 3 if i % 2 else 1, seed=i), "JPEG", quality=90, subsampling=0)
              for i in range(6)]
    images.append(encoded(textured(230, 240), "PNG"))
    images.append(encoded(textured(600, 640), "JPEG", quality=90))  # careful path, moved to the GPU
    fast = decode_batch_resized(images, 224, device="cuda")
    assert fast.device.type == "cuda" and fast.dtype == torch.uint8
    difference = np.abs(fast.cpu().numpy().astype(int) - careful(images, 224))
    assert difference.max() <= 1, difference.max()
    assert difference.mean() < 0.3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvJPEG)")
def test_gpu_decode_of_subsampled_colour_differs_only_in_chroma_upsampling():
    # With 4:2:0 chroma (PIL's default) nvJPEG replicates chroma samples where libjpeg-turbo interpolates
    # them ("fancy upsampling"): on pixel-level colour noise RGB differs by up to ~30 levels (H200: mean 3.4),
    # but luma is decoded at full resolution by both, so brightness agrees (H200: max 5.1, mean 0.33).
    images = [encoded(textured(256 + 8 * i, 256, 3, seed=i), "JPEG", quality=90) for i in range(3)]
    fast = decode_batch_resized(images, 224, device="cuda").cpu().numpy().astype(float)
    luma_weights = np.array([0.299, 0.587, 0.114])
    luma_difference = np.abs(fast @ luma_weights - careful(images, 224).astype(float) @ luma_weights)
    assert luma_difference.max() <= 8, luma_difference.max()
    assert luma_difference.mean() < 0.5
