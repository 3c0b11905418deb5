"""Ingest CIFAR-FS (Bertinetto et al., ICLR 2019) from the CIFAR-100 python pickles, as 32x32 RGB PNGs.

Each class pools its CIFAR-100 train and test images (500 + 100 = 600) and the classes are split
class-disjointly into train/val/test (64/16/20) by `train.txt`, `val.txt`, `test.txt` (one class name
per line) from `--splits-dir`, else `<src>/splits/bertinetto/`, else the standard split built in here.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass

import numpy as np

from metallo_core.data.images import ImageInfo, encode_png, resize_encoded
from metallo_core.data.ingest.common import IngestOptions, class_split_writer
from metallo_core.data.manifest import Manifest
from metallo_core.errors import DataError
from metallo_core.progress import Progress
from metallo_core.storage import Location, locate

PICKLE_DIR = "cifar-100-python"
POOLED_FILES = ("train", "test")
DEFAULT_SPLITS_DIR = "splits/bertinetto"
SPLITS = ("train", "val", "test")
IMAGE_SIDE = 32

# The standard split of Bertinetto et al. (the splits/bertinetto/*.txt files of their data release), found
# identical in two independent public copies: tristandeleu/pytorch-meta
# (torchmeta/datasets/assets/cifar100/cifar-fs/{train,val,test}.json) and nathanielsimard/improving-fs-ssl
# (mcp/data/dataset/cifar.py). Sorted here; together they are the 100 CIFAR-100 fine labels.
BERTINETTO_SPLIT = {
    "train": (
        "apple", "aquarium_fish", "bear", "bee", "bottle", "bowl", "boy", "bridge", "bus", "can", "castle",
        "caterpillar", "chair", "clock", "cloud", "cockroach", "couch", "cup", "dinosaur", "dolphin", "elephant",
        "forest", "girl", "hamster", "house", "kangaroo", "keyboard", "lawn_mower", "lion", "lizard", "lobster",
        "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid", "palm_tree", "pear", "pine_tree", "plate",
        "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "seal", "shrew", "skunk", "skyscraper", "snake",
        "spider", "squirrel", "streetcar", "sunflower", "tank", "tiger", "train", "trout", "tulip", "turtle",
        "willow_tree", "wolf",
    ),
    "val": (
        "beaver", "beetle", "butterfly", "camel", "cattle", "crab", "crocodile", "flatfish", "lamp", "maple_tree",
        "motorcycle", "otter", "sea", "shark", "television", "tractor",
    ),
    "test": (
        "baby", "bed", "bicycle", "chimpanzee", "fox", "leopard", "man", "pickup_truck", "plain", "poppy", "rocket",
        "rose", "snail", "sweet_pepper", "table", "telephone", "wardrobe", "whale", "woman", "worm",
    ),
}
BUILT_IN_SPLIT = "the built-in Bertinetto et al. split"


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds only plain containers and numpy arrays: a pickle can run code, and these files come from the web."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which a CIFAR-100 pickle never holds")
        if module.startswith("numpy.core."):  # files written by numpy 1 name the module numpy 2 renamed
            module = "numpy._core." + module[len("numpy.core."):]
        return super().find_class(module, name)


def load_pickle(location: Location) -> dict:
    if not location.is_file():
        raise DataError(
            f"{location.uri} is missing; cifar-fs expects the CIFAR-100 python pickles at "
            f"<src>/{PICKLE_DIR}/{{train,test,meta}} (unpack cifar-100-python.tar.gz into --src)"
        )
    try:
        loaded = _ArrayUnpickler(io.BytesIO(location.read_bytes()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as exc:
        raise DataError(f"{location.uri} is not a readable CIFAR-100 pickle ({exc}); download it again") from exc
    if not isinstance(loaded, dict):
        raise DataError(f"{location.uri} holds a {type(loaded).__name__}, not the dict of a CIFAR-100 pickle")
    return loaded


def _field(loaded: dict, key: str, location: Location):
    # Python 2 wrote the keys as str, which load as bytes; a re-pickled file may hold str keys.
    for candidate in (key.encode(), key):
        if candidate in loaded:
            return loaded[candidate]
    raise DataError(f"{location.uri} has no {key!r} entry; it is not a CIFAR-100 pickle (keys: {list(loaded)[:6]})")


@dataclass
class CifarPart:
    """One pickle file's images as (N, 32, 32, 3) uint8 and their fine labels."""

    name: str  # train | test
    images: np.ndarray
    labels: np.ndarray


def read_class_names(location: Location) -> list[str]:
    names = _field(load_pickle(location), "fine_label_names", location)
    try:
        decoded = [name.decode() if isinstance(name, bytes) else str(name) for name in names]
    except (TypeError, UnicodeDecodeError) as exc:
        raise DataError(f"{location.uri}: 'fine_label_names' is not a list of names ({exc})") from exc
    if not decoded or len(set(decoded)) != len(decoded):
        raise DataError(f"{location.uri}: 'fine_label_names' is empty or repeats a name")
    return decoded


def read_part(location: Location, name: str, num_classes: int) -> CifarPart:
    loaded = load_pickle(location)
    data = np.asarray(_field(loaded, "data", location))
    labels = np.asarray(_field(loaded, "fine_labels", location))
    side_pixels = 3 * IMAGE_SIDE * IMAGE_SIDE
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != side_pixels:
        raise DataError(
            f"{location.uri}: 'data' is {data.dtype} {data.shape}, expected uint8 (N, {side_pixels}) "
            "(channel-major 3x32x32 rows); this is not CIFAR-100"
        )
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{location.uri}: 'fine_labels' must be {len(data)} integers, one per image")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise DataError(
            f"{location.uri}: image {bad[0]} has fine label {labels[bad[0]]}, outside the {num_classes} classes of meta"
        )
    images = data.reshape(-1, 3, IMAGE_SIDE, IMAGE_SIDE).transpose(0, 2, 3, 1)
    return CifarPart(name=name, images=images, labels=labels)


def read_split_file(location: Location) -> list[tuple[str, str]]:
    """(class name, "<file>:<line>") for each non-blank line."""
    if not location.is_file():
        raise DataError(
            f"split file {location.uri} is missing; the splits folder (--splits-dir, default "
            f"<src>/{DEFAULT_SPLITS_DIR}/) needs train.txt, val.txt and test.txt, one CIFAR-100 class name per line"
        )
    try:
        text = location.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"split file {location.uri} is not UTF-8 text ({exc}); list one class name per line") from exc
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            entries.append((line.strip(), f"{location.uri}:{number}"))
    if not entries:
        raise DataError(f"split file {location.uri} names no class")
    return entries


def resolve_split(root: Location, splits_dir: str | None) -> tuple[dict[str, list[tuple[str, str]]], str]:
    """split -> [(class, where)] and where the split came from: --splits-dir, <src>/splits/bertinetto, or built in."""
    directory = locate(splits_dir) if splits_dir is not None else root.join(DEFAULT_SPLITS_DIR)
    if splits_dir is not None and not directory.exists():
        raise DataError(f"--splits-dir {directory.uri} does not exist")
    if splits_dir is not None or directory.exists():
        return {split: read_split_file(directory.join(f"{split}.txt")) for split in SPLITS}, directory.uri
    built_in = {split: [(name, BUILT_IN_SPLIT) for name in names] for split, names in BERTINETTO_SPLIT.items()}
    return built_in, BUILT_IN_SPLIT


def check_split(split_entries: dict[str, list[tuple[str, str]]], class_names: list[str], meta: Location) -> None:
    known = set(class_names)
    first_seen: dict[str, tuple[str, str]] = {}
    for split, entries in split_entries.items():
        for name, where in entries:
            if name not in known:
                if where == BUILT_IN_SPLIT:
                    raise DataError(
                        f"{BUILT_IN_SPLIT} names class {name!r}, which {meta.uri} does not have: this is not the "
                        "standard CIFAR-100; pass --splits-dir with train.txt, val.txt and test.txt for its classes"
                    )
                raise DataError(f"{where}: {name!r} is not a class of {meta.uri}; fix the split file")
            earlier = first_seen.setdefault(name, (split, where))
            if earlier != (split, where):
                raise DataError(
                    f"class {name!r} is listed in split {earlier[0]!r} ({earlier[1]}) and again in split {split!r} "
                    f"({where}); CIFAR-FS splits must not share classes"
                )


def ingest_cifar_fs(src: str, out: str, options: IngestOptions, *, splits_dir: str | None = None) -> Manifest:
    """--on-error has nothing to act on here: a pickle loads whole or the ingest stops naming the file."""
    root = locate(src)
    if not root.exists():
        raise DataError(f"--src {root.uri} does not exist")
    pickles = root.join(PICKLE_DIR)
    meta = pickles.join("meta")
    all_class_names = read_class_names(meta)
    split_entries, split_source = resolve_split(root, splits_dir)
    check_split(split_entries, all_class_names, meta)
    parts = [read_part(pickles.join(name), name, len(all_class_names)) for name in POOLED_FILES]

    split_classes = {split: sorted(name for name, _ in entries) for split, entries in split_entries.items()}
    class_names = [name for split in SPLITS for name in split_classes[split]]
    used = set(class_names)
    progress = Progress("ingest cifar-fs")
    writer = class_split_writer(out, options, "cifar-fs", {split: split_classes[split] for split in SPLITS},
                                src=root.uri, split=split_source, size=options.size,
                                unused_classes=[name for name in all_class_names if name not in used])
    with writer:
        for split in SPLITS:
            for class_name in split_classes[split]:
                label = all_class_names.index(class_name)
                for part in parts:
                    for index in np.flatnonzero(part.labels == label):
                        source = f"{PICKLE_DIR}/{part.name}#{index}"
                        image = encode_png(np.ascontiguousarray(part.images[index]))
                        info = ImageInfo(height=IMAGE_SIDE, width=IMAGE_SIDE, encoding="png")
                        if options.size is not None:
                            image, info = resize_encoded(image, options.size, source)
                        writer.write_encoded(split, image, info, class_name=class_name, source=source)
                        progress.advance()
    progress.finish()
    return writer.manifest
