"""Tiny mini-ImageNet, ImageNet-1k and CIFAR-100 sources in their real on-disk layouts, for the ingest tests."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from tests.image_fixtures import image_bytes

# The 100 CIFAR-100 fine labels, in the order of the real `meta` pickle's b'fine_label_names'.
CIFAR100_FINE_LABELS = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
    "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
    "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster "
    "man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck "
    "pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger "
    "tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()


def jpeg_bytes(seed: int) -> bytes:
    return image_bytes(seed, size=20, fmt="JPEG", mode="RGB")


def truncated_jpeg(seed: int) -> bytes:
    data = jpeg_bytes(seed)
    return data[: len(data) // 2]


def make_miniimagenet(root: Path, splits: dict[str, dict[str, int]], seed: int = 0) -> dict[str, bytes]:
    """root/images/<wnid><index:08d>.jpg plus root/<split>.csv; returns 'images/<file>' -> bytes written."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    written = {}
    for split, classes in splits.items():
        lines = ["filename,label"]
        for wnid, count in classes.items():
            for index in range(count):
                filename = f"{wnid}{index + 1:08d}.jpg"
                data = jpeg_bytes(seed)
                seed += 1
                (root / "images" / filename).write_bytes(data)
                written[f"images/{filename}"] = data
                lines.append(f"{filename},{wnid}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return written


def make_imagenet(root: Path, images_per_synset: dict[str, int], seed: int = 100) -> dict[str, bytes]:
    """root/<wnid>/<wnid>_<n>.JPEG as in the ILSVRC train folder; returns '<wnid>/<file>' -> bytes written."""
    written = {}
    for wnid, count in images_per_synset.items():
        (root / wnid).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            relative = f"{wnid}/{wnid}_{1000 + index}.JPEG"
            data = jpeg_bytes(seed)
            seed += 1
            (root / relative).write_bytes(data)
            written[relative] = data
    return written


def _cifar_pickle(obj: dict) -> bytes:
    # The real files were written by Python 2 and numpy 1: protocol 2, numpy.core module names.
    return pickle.dumps(obj, protocol=2).replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def make_cifar100(
    root: Path, class_names: list[str], train_per_class: int, test_per_class: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """root/cifar-100-python/{train,test,meta} in the CIFAR-100 pickle format, images in shuffled order.

    Returns class name -> (n, 32, 32, 3) uint8 pixels in the order CIFAR-FS pools them: train, then test.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    pooled: dict[str, list[np.ndarray]] = {name: [] for name in class_names}
    for part, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(len(class_names)), per_class))
        pixels = rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8)
        for label, image in zip(labels, pixels):
            pooled[class_names[label]].append(image)
        rows = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)).reshape(len(labels), 3072)
        (folder / part).write_bytes(_cifar_pickle({
            b"filenames": [f"img_{part}_{i}.png".encode() for i in range(len(labels))],
            b"batch_label": f"{part} batch".encode(),
            b"fine_labels": [int(label) for label in labels],
            b"coarse_labels": [0] * len(labels),
            b"data": rows,
        }))
    (folder / "meta").write_bytes(_cifar_pickle({
        b"fine_label_names": [name.encode() for name in class_names],
        b"coarse_label_names": [b"everything"],
    }))
    return {name: np.stack(images) for name, images in pooled.items()}


def write_split_files(folder: Path, splits: dict[str, list[str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, names in splits.items():
        (folder / f"{split}.txt").write_text("\n".join(names) + "\n")
