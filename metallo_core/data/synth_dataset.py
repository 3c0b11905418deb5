"""Write the built-in synthetic datasets as shards: `nfurcated` (seed 002) and `fewshot` (class-disjoint)."""

from __future__ import annotations

from metallo_core.data.images import encode_png
from metallo_core.data.manifest import ColumnInfo, Manifest
from metallo_core.data.shards import DatasetWriter
from metallo_core.data.synthetic import (
    MORPHOLOGIES,
    VOLUME_FRACTIONS,
    fewshot_classes,
    nfurcated_batches,
    render_images,
    split_classes,
)
from metallo_core.errors import DataError
from metallo_core.progress import Progress

RENDER_CHUNK = 64


def nfurcated_class_name(morphology: int, fraction_class: int) -> str:
    return f"{MORPHOLOGIES[morphology].name}/vf{round(VOLUME_FRACTIONS[fraction_class] * 100):02d}"


def write_nfurcated(
    out: str, *, images_per_combination: int = 50, size: int = 128, seed: int = 0, overwrite: bool = False
) -> Manifest:
    """7 morphologies x 10 volume fractions; `label` is the combination, the properties are extra columns."""
    _check_size(size)
    if images_per_combination < 1:
        raise DataError(f"--images-per-class must be at least 1, got {images_per_combination}")
    class_names = [nfurcated_class_name(m, f) for m in range(len(MORPHOLOGIES)) for f in range(len(VOLUME_FRACTIONS))]
    extra_columns = {
        "morphology": ColumnInfo("class", [m.name for m in MORPHOLOGIES], "morphology class of the white phase"),
        "volume_fraction_class": ColumnInfo(
            "class", [f"{round(v * 100)}%" for v in VOLUME_FRACTIONS], "white-phase volume fraction class"
        ),
        "volume_fraction": ColumnInfo("value", [], "measured white-phase area fraction (0..1)"),
    }
    total = images_per_combination * len(class_names)
    progress = Progress("synth nfurcated", total)
    writer = DatasetWriter(
        out,
        "synthetic-nfurcated",
        class_names,
        split_kind="rows",
        extra_columns=extra_columns,
        overwrite=overwrite,
        source={"generator": "nfurcated", "images_per_combination": images_per_combination, "size": size, "seed": seed},
    )
    with writer:
        counter = 0
        for batch in nfurcated_batches(images_per_combination=images_per_combination, size=size, seed=seed):
            for image, morphology, fraction_class, fraction in zip(
                batch.images, batch.morphology, batch.volume_fraction_class, batch.volume_fraction
            ):
                class_name = nfurcated_class_name(int(morphology), int(fraction_class))
                writer.write(
                    "train",
                    image=encode_png(image),
                    class_name=class_name,
                    source=f"synthetic:nfurcated/{seed}/{counter}",
                    height=size,
                    width=size,
                    encoding="png",
                    morphology=int(morphology),
                    volume_fraction_class=int(fraction_class),
                    volume_fraction=float(fraction),
                )
                counter += 1
            progress.advance(len(batch.images))
    progress.finish()
    return writer.manifest


def write_fewshot(
    out: str,
    *,
    num_classes: int = 100,
    images_per_class: int = 60,
    size: int = 84,
    seed: int = 0,
    overwrite: bool = False,
) -> Manifest:
    """The class-disjoint few-shot benchmark (train/val/test classes, 64/16/20 by default)."""
    _check_size(size)
    if images_per_class < 2:
        raise DataError(f"--images-per-class must be at least 2 for few-shot tasks, got {images_per_class}")
    classes = fewshot_classes(num_classes, seed=seed)
    splits = split_classes(classes, seed=seed)
    class_index = {spec.name: index for index, spec in enumerate(classes)}
    progress = Progress("synth fewshot", images_per_class * len(classes))
    writer = DatasetWriter(
        out,
        "synthetic-fewshot",
        [spec.name for spec in classes],
        split_kind="classes",
        split_classes={split: [spec.name for spec in members] for split, members in splits.items()},
        overwrite=overwrite,
        source={
            "generator": "fewshot",
            "num_classes": num_classes,
            "images_per_class": images_per_class,
            "size": size,
            "seed": seed,
            "families": {spec.name: spec.family for spec in classes},
        },
    )
    with writer:
        for split, members in splits.items():
            for spec in members:
                index = class_index[spec.name]
                for start in range(0, images_per_class, RENDER_CHUNK):
                    count = min(RENDER_CHUNK, images_per_class - start)
                    images = render_images(spec, index, count, size=size, seed=seed, start=start)
                    for offset, image in enumerate(images):
                        writer.write(
                            split,
                            image=encode_png(image),
                            class_name=spec.name,
                            source=f"synthetic:fewshot/{seed}/{spec.name}/{start + offset}",
                            height=size,
                            width=size,
                            encoding="png",
                        )
                    progress.advance(count)
    progress.finish()
    return writer.manifest


def _check_size(size: int) -> None:
    if not 16 <= size <= 1024:
        raise DataError(f"--size must be between 16 and 1024 pixels, got {size}")
