"""`metallo data ingest --format miniimagenet|imagenet|cifar-fs`: round trips on tiny sources in the real
layouts, bad input named clearly, and ImageNet's parallel Ray ingest (every image exactly once; a failed task
leaves no manifest).
"""

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from metallo_core.cli import main
from metallo_core.data.ingest import IngestOptions, ingest
from metallo_core.data.ingest.cifar_fs import BERTINETTO_SPLIT
from metallo_core.data.ingest.imagenet import ingest_chunk, iter_chunks, list_synsets, read_synset_names
from metallo_core.data.manifest import read_manifest
from metallo_core.data.shards import read_split_table
from metallo_core.errors import DataError
from metallo_core.storage import locate
from tests.data.fixtures_ingest import (
    CIFAR100_FINE_LABELS,
    make_cifar100,
    make_imagenet,
    make_miniimagenet,
    truncated_jpeg,
    write_split_files,
)

MINI_SPLITS = {
    "train": {"n01532829": 3, "n01558993": 2, "n01704323": 3},
    "val": {"n01855672": 2, "n02091244": 3},
    "test": {"n01930112": 4},
}


def rows_of(uri, split):
    """source -> row dict for every row of a split (checksums verified on read)."""
    rows = read_split_table(str(uri), split).to_pylist()
    sources = [row["source"] for row in rows]
    assert len(sources) == len(set(sources)), "an image was written twice"
    return {row["source"]: row for row in rows}


def assert_no_dataset(out):
    with pytest.raises(DataError, match="never finished|no dataset at"):
        read_manifest(str(out))


# --- mini-ImageNet ---------------------------------------------------------------------------------------------


def test_miniimagenet_splits_bytes_and_labels_read_back_identical(tmp_path):
    written = make_miniimagenet(tmp_path / "src", MINI_SPLITS)
    (tmp_path / "src" / "LOC_synset_mapping.txt").write_text("n01532829 house finch, linnet\nn01930112 nematode\n")
    manifest = ingest("miniimagenet", str(tmp_path / "src"), str(tmp_path / "ds"), IngestOptions())

    assert manifest.split_kind == "classes"
    assert {split: info.classes for split, info in manifest.splits.items()} == {
        split: sorted(classes) for split, classes in MINI_SPLITS.items()
    }
    assert {split: info.counts for split, info in manifest.splits.items()} == MINI_SPLITS
    assert sorted(manifest.class_names) == sorted(wnid for classes in MINI_SPLITS.values() for wnid in classes)
    assert manifest.source["class_descriptions"] == {"n01532829": "house finch, linnet", "n01930112": "nematode"}
    read_back = {}
    for split, classes in MINI_SPLITS.items():
        for source, row in rows_of(tmp_path / "ds", split).items():
            wnid = source.removeprefix("images/")[:9]
            assert row["class_name"] == wnid and wnid in classes
            assert manifest.classes[row["label"]] == wnid
            read_back[source] = row["image"]
    assert read_back == written


def test_miniimagenet_corrupt_image_fails_naming_it_or_is_skipped(tmp_path):
    make_miniimagenet(tmp_path / "src", MINI_SPLITS)
    (tmp_path / "src" / "images" / "n0185567200000002.jpg").write_bytes(truncated_jpeg(5))
    with pytest.raises(DataError, match=r"images/n0185567200000002\.jpg: not a readable image"):
        ingest("miniimagenet", str(tmp_path / "src"), str(tmp_path / "ds"), IngestOptions())
    assert_no_dataset(tmp_path / "ds")

    manifest = ingest("miniimagenet", str(tmp_path / "src"), str(tmp_path / "ds"), IngestOptions(on_error="skip"))
    assert [entry["source"] for entry in manifest.skipped] == ["images/n0185567200000002.jpg"]
    assert manifest.splits["val"].counts == {"n01855672": 1, "n02091244": 3}
    assert "images/n0185567200000002.jpg" not in rows_of(tmp_path / "ds", "val")


def _drop_val_csv(src):
    (src / "val.csv").unlink()


def _row_names_missing_image(src):
    (src / "images" / "n0155899300000002.jpg").unlink()


def _class_in_two_csvs(src):
    with open(src / "test.csv", "a") as csv_file:
        csv_file.write("n0153282900000001.jpg,n01532829\n")


def _image_listed_twice(src):
    with open(src / "test.csv", "a") as csv_file:
        csv_file.write("n0193011200000001.jpg,n01930112\n")


def _malformed_header(src):
    text = (src / "test.csv").read_text()
    (src / "test.csv").write_text(text.replace("filename,label", "image,wnid", 1))


def _malformed_row(src):
    with open(src / "val.csv", "a") as csv_file:
        csv_file.write("n0185567200000001.jpg\n")


@pytest.mark.parametrize(
    "damage, message",
    [
        (_drop_val_csv, r"src/val\.csv is missing; mini-ImageNet needs train\.csv, val\.csv and test\.csv"),
        (_row_names_missing_image, r"src/train\.csv:6: image .*images/n0155899300000002\.jpg does not exist"),
        (_class_in_two_csvs, r"class 'n01532829' appears in split 'train' \(.*train\.csv:2\) and in split 'test' "
                             r"\(.*test\.csv:6\)"),
        (_image_listed_twice, r"test\.csv:6: image 'n0193011200000001\.jpg' is already listed at .*test\.csv:2"),
        (_malformed_header, r"test\.csv:1: the header is 'image,wnid'; mini-ImageNet CSVs start with 'filename,label'"),
        (_malformed_row, r"val\.csv:7: expected two fields 'filename,label', got 'n0185567200000001\.jpg'"),
    ],
    ids=["missing-csv", "missing-image", "class-in-two-splits", "image-twice", "bad-header", "bad-row"],
)
def test_miniimagenet_bad_layout_is_named_before_anything_is_written(tmp_path, damage, message):
    make_miniimagenet(tmp_path / "src", MINI_SPLITS)
    damage(tmp_path / "src")
    with pytest.raises(DataError, match=message):
        ingest("miniimagenet", str(tmp_path / "src"), str(tmp_path / "ds"), IngestOptions())
    assert not (tmp_path / "ds").exists()


def test_cli_miniimagenet_resizes_and_rejects_flags_of_other_formats(tmp_path, capsys):
    make_miniimagenet(tmp_path / "src", MINI_SPLITS)
    out = tmp_path / "ds"
    argv = ["data", "ingest", "--format", "miniimagenet", "--src", str(tmp_path / "src"), "--out", str(out)]
    assert main(argv + ["--splits-dir", str(tmp_path)]) == 2
    assert "--splits-dir applies to cifar-fs only, not to miniimagenet" in capsys.readouterr().err
    assert main(argv + ["--size", "12", "--json"]) == 0
    for split in MINI_SPLITS:
        for row in rows_of(out, split).values():
            with Image.open(io.BytesIO(row["image"])) as image:
                assert min(image.size) == 12 and (row["width"], row["height"]) == image.size


# --- CIFAR-FS --------------------------------------------------------------------------------------------------

CIFAR_CLASSES = ["apple", "baby", "bear", "bed", "bee", "bus", "cloud", "fox", "lamp", "man"]
CIFAR_SPLITS = {
    "train": ["bus", "apple", "bee", "cloud", "bear"],
    "val": ["lamp", "fox", "bed"],
    "test": ["man", "baby"],
}


def test_cifar_fs_pools_train_and_test_and_reads_back_the_same_pixels(tmp_path):
    pixels = make_cifar100(tmp_path / "src", CIFAR_CLASSES, train_per_class=3, test_per_class=2)
    write_split_files(tmp_path / "src" / "splits" / "bertinetto", CIFAR_SPLITS)
    manifest = ingest("cifar-fs", str(tmp_path / "src"), str(tmp_path / "ds"), IngestOptions())

    assert manifest.split_kind == "classes" and manifest.image_encoding == "png"
    assert {split: info.classes for split, info in manifest.splits.items()} == {
        split: sorted(names) for split, names in CIFAR_SPLITS.items()
    }
    assert all(count == 5 for info in manifest.splits.values() for count in info.counts.values())
    assert manifest.source["split"].endswith("splits/bertinetto")
    for split in CIFAR_SPLITS:
        table = read_split_table(str(tmp_path / "ds"), split)
        by_class: dict[str, list[np.ndarray]] = {}
        for row in table.to_pylist():
            assert manifest.classes[row["label"]] == row["class_name"]
            assert (row["height"], row["width"]) == (32, 32)
            with Image.open(io.BytesIO(row["image"])) as image:
                assert image.format == "PNG" and image.mode == "RGB"
                by_class.setdefault(row["class_name"], []).append(np.asarray(image))
        for class_name, images in by_class.items():
            np.testing.assert_array_equal(np.stack(images), pixels[class_name])


def test_cifar_fs_splits_dir_may_leave_classes_out_and_size_resizes(tmp_path):
    make_cifar100(tmp_path / "src", CIFAR_CLASSES, train_per_class=2, test_per_class=1)
    write_split_files(tmp_path / "mysplit", {"train": ["bus", "apple"], "val": ["lamp"], "test": ["man"]})
    manifest = ingest("cifar-fs", str(tmp_path / "src"), str(tmp_path / "ds"), IngestOptions(size=48),
                      splits_dir=str(tmp_path / "mysplit"))
    assert manifest.class_names == ["apple", "bus", "lamp", "man"]
    assert manifest.source["unused_classes"] == ["baby", "bear", "bed", "bee", "cloud", "fox"]
    rows = read_split_table(str(tmp_path / "ds"), "train").to_pylist()
    assert len(rows) == 6 and all((row["height"], row["width"]) == (48, 48) for row in rows)


def test_built_in_bertinetto_split_is_the_whole_of_cifar100_split_64_16_20(tmp_path):
    assert [len(BERTINETTO_SPLIT[split]) for split in ("train", "val", "test")] == [64, 16, 20]
    union = [name for names in BERTINETTO_SPLIT.values() for name in names]
    assert sorted(union) == sorted(CIFAR100_FINE_LABELS) and len(set(union)) == 100
    make_cifar100(tmp_path / "src", CIFAR100_FINE_LABELS, train_per_class=1, test_per_class=1)
    manifest = ingest("cifar-fs", str(tmp_path / "src"), str(tmp_path / "ds"), IngestOptions())
    assert manifest.source["split"] == "the built-in Bertinetto et al. split"
    assert {split: info.classes for split, info in manifest.splits.items()} == {
        split: list(names) for split, names in BERTINETTO_SPLIT.items()
    }
    assert manifest.splits["val"].counts["otter"] == 2


def _evil_pickle(src):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (src / "cifar-100-python" / "test").write_bytes(pickle.dumps({b"data": Evil()}))


def _wrong_shape(src):
    (src / "cifar-100-python" / "train").write_bytes(
        pickle.dumps({b"data": np.zeros((4, 1024), np.uint8), b"fine_labels": [0, 1, 2, 3]})
    )


@pytest.mark.parametrize(
    "damage, splits_dir, message",
    [
        (lambda src: (src / "sp" / "val.txt").unlink(), "sp",
         r"split file .*sp/val\.txt is missing; the splits folder \(--splits-dir.*needs train\.txt, val\.txt"),
        (lambda src: (src / "sp" / "test.txt").write_text("man\nbaby\nbeaver\n"), "sp",
         r"sp/test\.txt:3: 'beaver' is not a class of .*cifar-100-python/meta"),
        (lambda src: (src / "sp" / "test.txt").write_text("man\nbaby\nfox\n"), "sp",
         r"class 'fox' is listed in split 'val' \(.*sp/val\.txt:2\) and again in split 'test' \(.*sp/test\.txt:3\)"),
        (lambda src: None, None,
         r"the built-in Bertinetto et al\. split names class .* which .*meta does not have.*pass --splits-dir"),
        (lambda src: (src / "cifar-100-python" / "meta").unlink(), "sp",
         r"cifar-100-python/meta is missing; cifar-fs expects the CIFAR-100 python pickles"),
        (_evil_pickle, "sp", r"cifar-100-python/test is not a readable CIFAR-100 pickle \(it asks for builtins\.print"),
        (_wrong_shape, "sp", r"cifar-100-python/train: 'data' is uint8 \(4, 1024\), expected uint8 \(N, 3072\)"),
    ],
    ids=["missing-split-file", "unknown-class", "class-in-two-splits", "no-split-files", "missing-meta",
         "code-in-pickle", "wrong-shape"],
)
def test_cifar_fs_bad_input_is_named(tmp_path, damage, splits_dir, message, capsys):
    src = tmp_path / "src"
    make_cifar100(src, CIFAR_CLASSES, train_per_class=1, test_per_class=1)
    write_split_files(src / "sp", CIFAR_SPLITS)
    damage(src)
    with pytest.raises(DataError, match=message):
        ingest("cifar-fs", str(src), str(tmp_path / "ds"), IngestOptions(),
               splits_dir=str(src / splits_dir) if splits_dir else None)
    assert "pwned" not in capsys.readouterr().out
    assert not (tmp_path / "ds").exists()


# --- ImageNet --------------------------------------------------------------------------------------------------

IMAGENET = {"n01440764": 5, "n01443537": 4, "n01484850": 6, "n01491361": 3}


def test_imagenet_chunks_follow_the_sorted_file_list_across_synsets(tmp_path):
    make_imagenet(tmp_path / "src", {"n02": 3, "n01": 4})
    root = locate(tmp_path / "src")
    synsets = list_synsets(root)
    chunks = list(iter_chunks(root, synsets, chunk_size=3))
    assert synsets == ["n01", "n02"]
    assert [len(chunk) for chunk in chunks] == [3, 3, 1]
    flat = [entry for chunk in chunks for entry in chunk]
    assert flat == sorted(flat) and {label for _, label in flat} == {0, 1}
    assert flat[3] == ("n01/n01_1003.JPEG", 0) and flat[4] == ("n02/n02_1000.JPEG", 1)

    (tmp_path / "src" / "n03").mkdir()
    with pytest.raises(DataError, match=r"synset folder .*src/n03 holds no image"):
        list(iter_chunks(root, list_synsets(root), chunk_size=3))
    (tmp_path / "src" / "stray.JPEG").write_bytes(b"")
    with pytest.raises(DataError, match=r"src/stray\.JPEG lies directly under --src"):
        list_synsets(root)


def test_imagenet_chunk_task_writes_its_own_prefixed_shards_and_reports_skips(tmp_path):
    make_imagenet(tmp_path / "src", {"n01": 2})
    (tmp_path / "src" / "n01" / "n01_bad.JPEG").write_bytes(truncated_jpeg(1))
    entries = [("n01/n01_1000.JPEG", 0), ("n01/n01_bad.JPEG", 0), ("n01/n01_1001.JPEG", 0)]
    out = locate(tmp_path / "ds")
    result = ingest_chunk(str(tmp_path / "src"), out.uri, 7, entries, IngestOptions(on_error="skip"))
    assert [shard.path for shard in result.shards] == ["train/part-t00007-00000.parquet"]
    assert result.num_images == 2 and result.shards[0].class_counts == {"n01": 2}
    assert [entry["source"] for entry in result.skipped] == ["n01/n01_bad.JPEG"]
    with pytest.raises(DataError, match=r"n01/n01_bad\.JPEG: not a readable image"):
        ingest_chunk(str(tmp_path / "src"), out.uri, 8, entries, IngestOptions())
    assert out.list_files() == ["train/part-t00007-00000.parquet"]


def test_synset_names_file_must_be_wnid_and_name(tmp_path):
    path = tmp_path / "LOC_synset_mapping.txt"
    path.write_text("n01440764 tench, Tinca tinca\n\nn01443537\n")
    with pytest.raises(DataError, match=r"LOC_synset_mapping\.txt:3: expected 'WNID name'"):
        read_synset_names(locate(path))


@pytest.mark.ray
@pytest.mark.s3
def test_imagenet_ray_tasks_write_every_image_exactly_once_to_s3(tmp_path, ray_cluster, s3_bucket):
    written = make_imagenet(tmp_path / "src", IMAGENET)
    (tmp_path / "src" / "n01443537" / "n01443537_9999.JPEG").write_bytes(truncated_jpeg(3))
    (tmp_path / "src" / "LOC_synset_mapping.txt").write_text(
        "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n"
    )
    out = f"s3://{s3_bucket}/ds"
    manifest = ingest("imagenet", str(tmp_path / "src"), out, IngestOptions(on_error="skip"),
                      workers=2, chunk_size=4)

    assert manifest.split_kind == "rows" and list(manifest.splits) == ["train"]
    assert manifest.class_names == sorted(IMAGENET)
    assert manifest.splits["train"].counts == IMAGENET
    assert [entry["source"] for entry in manifest.skipped] == ["n01443537/n01443537_9999.JPEG"]
    assert manifest.source["class_descriptions"]["n01443537"] == "goldfish, Carassius auratus"
    tasks = {shard.path.split("/")[1].rsplit("-", 1)[0] for shard in manifest.shards}
    assert len(tasks) == 5  # 19 files in chunks of 4
    rows = rows_of(out, "train")
    assert {source: row["image"] for source, row in rows.items()} == written
    assert all(manifest.classes[row["label"]] == source.split("/")[0] for source, row in rows.items())
    assert read_manifest(out).summary() == manifest.summary()


@pytest.mark.ray
def test_imagenet_failed_task_fails_the_ingest_naming_the_file_and_leaves_no_manifest(tmp_path, ray_cluster):
    make_imagenet(tmp_path / "src", IMAGENET)
    (tmp_path / "src" / "n01484850" / "n01484850_1003.JPEG").write_bytes(truncated_jpeg(9))
    with pytest.raises(DataError, match=r"n01484850/n01484850_1003\.JPEG: not a readable image"):
        ingest("imagenet", str(tmp_path / "src"), str(tmp_path / "ds"), IngestOptions(), chunk_size=3)
    assert not (tmp_path / "ds" / "manifest.json").exists()
    assert_no_dataset(tmp_path / "ds")
