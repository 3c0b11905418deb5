"""Bringing support and query images to one physical scale from their pixel sizes (metres per pixel).

A texture imaged at 2,000x and at 500x is one texture at two pixel sizes; compared pixel for pixel it looks
like two classes. When every image of a support+query set has a known pixel size, each is resampled to one
common pixel size before tiling (`fewshot.tiles.image_tiles`'s `scale`):

    target = max(median(support pixel sizes), max(all pixel sizes) / MAX_UPSAMPLE)
    factor_i = pixel_size_i / target        (the image's resampling factor: > 1 enlarges it)

The support's median keeps most support images at their own resolution (they define the classes); the
bound keeps the coarsest image from being enlarged more than MAX_UPSAMPLE times (enlarging invents no
detail, and past 2x the blur itself becomes a texture). When only some images have a pixel size, no
rescaling is done (mixing measured and guessed scales would be worse than neither) and the caller falls
back to its manual factor (`metallo classify --query-scale`), saying which images lack one.

Pure functions of the pixel sizes: reading them from files is `metallo_core/data/microscope.py`'s job.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

MAX_UPSAMPLE = 2.0


@dataclass(frozen=True)
class ScalePlan:
    """The common pixel size (`target_m`, metres; None: no physical rescaling) and each image's resampling
    factor (`support_factors`, `query_factors`; all 1.0 without rescaling), with the rule's outcome in words."""

    target_m: float | None
    support_factors: list[float]
    query_factors: list[float]
    description: str


def plan_physical_scale(support_sizes: list[float | None], query_sizes: list[float | None],
                        query_names: list[str] | None = None, support_names: list[str] | None = None) -> ScalePlan:
    """The plan for one support+query set (see the module docstring); sizes in metres per pixel, None where
    unknown. Names, when given, are used to say which images lack a pixel size. ValueError for a
    non-positive size or an empty support."""
    if not support_sizes:
        raise ValueError("the support set is empty")
    sizes = support_sizes + query_sizes
    if any(size is not None and not size > 0 for size in sizes):
        raise ValueError(f"pixel sizes must be positive, got {sizes}")
    unscaled_support, unscaled_query = [1.0] * len(support_sizes), [1.0] * len(query_sizes)
    known = [size for size in sizes if size is not None]
    if not known:
        return ScalePlan(None, unscaled_support, unscaled_query, "no image has a pixel size")
    if len(known) < len(sizes):
        names = ((support_names or [f"support image {i + 1}" for i in range(len(support_sizes))])
                 + (query_names or [f"query image {i + 1}" for i in range(len(query_sizes))]))
        missing = [name for name, size in zip(names, sizes) if size is None]
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        return ScalePlan(None, unscaled_support, unscaled_query,
                         f"pixel size known for {len(known)} of {len(sizes)} images only (none for {shown}): "
                         "no physical rescaling")
    support_median = statistics.median(size for size in support_sizes if size is not None)
    target = max(support_median, max(known) / MAX_UPSAMPLE)
    bounded = (f", raised so the coarsest image is enlarged at most {MAX_UPSAMPLE:g}x"
               if target > support_median else "")
    return ScalePlan(target, [size / target for size in support_sizes if size is not None],
                     [size / target for size in query_sizes if size is not None],
                     f"every image resampled to {target * 1e9:.4g} nm per pixel (the support's median"
                     f"{bounded}; resampling factors {min(known) / target:.3g} to {max(known) / target:.3g})")
