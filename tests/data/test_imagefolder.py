"""`metallo data ingest --format imagefolder`: round trips, splits, and bad input."""

import io

import numpy as np
import pytest
from PIL import Image

from metallo_core.data.ingest import IngestOptions, ingest
from metallo_core.data.shards import read_split_table
from metallo_core.errors import DataError
from tests.image_fixtures import image_bytes, make_image_folder


def ingest_folder(src, out, **kwargs):
    split_classes = kwargs.pop("split_classes", None)
    split_rows = kwargs.pop("split_rows", None)
    return ingest("imagefolder", str(src), str(out), IngestOptions(**kwargs),
                  split_classes=split_classes, split_rows=split_rows)


def test_bytes_labels_and_counts_read_back_identical(tmp_path):
    written = make_image_folder(tmp_path / "src", {"ferrite": 3, "martensite": 2, "pearlite": 4})
    manifest = ingest_folder(tmp_path / "src", tmp_path / "ds")
    assert manifest.class_names == ["ferrite", "martensite", "pearlite"]
    assert manifest.split_kind == "rows" and list(manifest.splits) == ["train"]
    assert manifest.splits["train"].counts == {"ferrite": 3, "martensite": 2, "pearlite": 4}
    table = read_split_table(str(tmp_path / "ds"), "train")
    rows = dict(zip(table.column("source").to_pylist(), table.column("image").to_pylist()))
    assert rows == written
    labels = dict(zip(table.column("source").to_pylist(), table.column("label").to_pylist()))
    assert all(labels[s] == manifest.class_ids[s.split("/")[0]] for s in labels)


def test_split_classes_is_seeded_and_disjoint(tmp_path):
    make_image_folder(tmp_path / "src", {f"c{i:02d}": 2 for i in range(25)})
    first = ingest_folder(tmp_path / "src", tmp_path / "a", split_classes=(15, 5, 5), seed=3)
    second = ingest_folder(tmp_path / "src", tmp_path / "b", split_classes=(15, 5, 5), seed=3)
    other = ingest_folder(tmp_path / "src", tmp_path / "c", split_classes=(15, 5, 5), seed=4)
    assert first.split_kind == "classes"
    assert [len(first.splits[s].classes) for s in ("train", "val", "test")] == [15, 5, 5]
    assert {s: first.splits[s].classes for s in first.splits} == {s: second.splits[s].classes for s in second.splits}
    assert first.splits["test"].classes != other.splits["test"].classes
    all_classes = sum((first.splits[s].classes for s in first.splits), [])
    assert sorted(all_classes) == first.class_names


def test_split_classes_must_add_up(tmp_path):
    make_image_folder(tmp_path / "src", {"a": 1, "b": 1, "c": 1})
    with pytest.raises(DataError, match="adds up to 4 classes but the source has 3"):
        ingest_folder(tmp_path / "src", tmp_path / "ds", split_classes=(2, 1, 1))


def test_split_rows_is_stratified(tmp_path):
    make_image_folder(tmp_path / "src", {"a": 10, "b": 20})
    manifest = ingest_folder(tmp_path / "src", tmp_path / "ds", split_rows=(0.8, 0.2))
    assert manifest.splits["train"].counts == {"a": 8, "b": 16}
    assert manifest.splits["test"].counts == {"a": 2, "b": 4}


def test_class_too_small_for_row_split(tmp_path):
    make_image_folder(tmp_path / "src", {"a": 10, "rare": 2})
    with pytest.raises(DataError, match="class 'rare' has 2 image.*split 'val' would get none"):
        ingest_folder(tmp_path / "src", tmp_path / "ds", split_rows=(0.8, 0.1, 0.1))


def test_corrupt_image_fails_naming_the_file(tmp_path):
    make_image_folder(tmp_path / "src", {"a": 2, "b": 2})
    (tmp_path / "src" / "b" / "broken.png").write_bytes(image_bytes(7)[:60])
    with pytest.raises(DataError, match=r"b/broken\.png: not a readable image.*--on-error skip"):
        ingest_folder(tmp_path / "src", tmp_path / "ds")
    assert not (tmp_path / "ds" / "manifest.json").exists()


def test_skip_reports_how_many_and_which(tmp_path):
    make_image_folder(tmp_path / "src", {"a": 2, "b": 2})
    (tmp_path / "src" / "b" / "broken.png").write_bytes(b"not an image at all")
    (tmp_path / "src" / "a" / "notes.docx").write_bytes(b"word")
    manifest = ingest_folder(tmp_path / "src", tmp_path / "ds", on_error="skip")
    assert sorted(entry["source"] for entry in manifest.skipped) == ["a/notes.docx", "b/broken.png"]
    assert "unsupported file type" in {e["source"]: e["reason"] for e in manifest.skipped}["a/notes.docx"]
    assert manifest.num_images == 4


def test_unsupported_file_fails_by_default(tmp_path):
    make_image_folder(tmp_path / "src", {"a": 1})
    (tmp_path / "src" / "a" / "scan.gif").write_bytes(b"GIF89a")
    with pytest.raises(DataError, match=r"a/scan\.gif: unsupported file type"):
        ingest_folder(tmp_path / "src", tmp_path / "ds")


def test_empty_class_folder_is_named(tmp_path):
    make_image_folder(tmp_path / "src", {"a": 1})
    (tmp_path / "src" / "bainite").mkdir()
    with pytest.raises(DataError, match="bainite.*hold no image"):
        ingest_folder(tmp_path / "src", tmp_path / "ds")


def test_class_whose_images_are_all_bad_is_named_under_skip(tmp_path):
    make_image_folder(tmp_path / "src", {"a": 1})
    (tmp_path / "src" / "b").mkdir()
    (tmp_path / "src" / "b" / "x.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="'b' have no readable image"):
        ingest_folder(tmp_path / "src", tmp_path / "ds", on_error="skip")


def test_missing_source(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ingest_folder(tmp_path / "nope", tmp_path / "ds")


def test_resize_keeps_aspect_and_16_bit_depth(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "sem.tif").write_bytes(image_bytes(1, size=40, fmt="TIFF", mode="I;16"))
    (tmp_path / "src" / "a" / "photo.jpg").write_bytes(image_bytes(2, size=40, fmt="JPEG", mode="RGB"))
    manifest = ingest_folder(tmp_path / "src", tmp_path / "ds", size=20)
    table = read_split_table(str(tmp_path / "ds"), "train")
    rows = {s: (h, w, img) for s, h, w, img in zip(*(table.column(c).to_pylist()
                                                     for c in ("source", "height", "width", "image")))}
    height, width, data = rows["a/sem.tif"]
    assert (height, width) == (20, 22)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG" and image.mode.startswith("I")
        assert np.asarray(image).max() > 255  # 16-bit range survived
    with Image.open(io.BytesIO(rows["a/photo.jpg"][2])) as image:
        assert image.format == "JPEG" and image.size == (22, 20)
    assert manifest.image_encodings == {"png": 1, "jpeg": 1}
