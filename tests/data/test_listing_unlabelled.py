"""`metallo data ingest` of a flat folder of unlabelled images (domain-adaptive DINO on a user's own images):
one class `unlabelled`, one row split `train`, which the DINO stage reads."""

from __future__ import annotations

import pytest

from metallo_core import cli
from metallo_core.data.ingest import IngestOptions, ingest
from metallo_core.data.manifest import read_manifest
from metallo_core.data.shards import read_split_table
from metallo_core.data.stream import decode_batch
from metallo_core.errors import DataError
from tests.image_fixtures import image_bytes, make_image_folder


def flat_folder(root, count: int = 5):
    root.mkdir(parents=True)
    for index in range(count):
        (root / f"sem_{index:02d}.png").write_bytes(image_bytes(index, size=40))
    (root / "._sem_00.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (root / ".DS_Store").write_bytes(b"Bud1")
    return root


def test_flat_folder_becomes_one_unlabelled_class_that_dino_reads(tmp_path, capsys):
    src = flat_folder(tmp_path / "own-images")
    out = tmp_path / "ds"
    assert cli.main(["data", "ingest", "--format", "imagefolder", "--src", str(src), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "5 unlabelled image(s), ingested as one class 'unlabelled'" in err and "2 os/nas metadata" in err
    manifest = read_manifest(str(out))
    assert manifest.class_names == ["unlabelled"] and manifest.split_kind == "rows"
    assert manifest.splits["train"].num_images == 5 and manifest.source["unlabelled"] is True
    # What the DINO stage does with data.split=train: read the image column and decode it.
    table = read_split_table(str(out), "train", ["image"])
    batch = decode_batch({"image": table.column("image").to_numpy(zero_copy_only=False)}, 32)
    assert batch["image"].shape == (5, 32, 32, 3)


def test_unlabelled_flag_pools_class_folders_and_allows_a_row_split(tmp_path):
    make_image_folder(tmp_path / "src", {"a": 6, "b": 4})
    manifest = ingest("imagefolder", str(tmp_path / "src"), str(tmp_path / "ds"), IngestOptions(),
                      unlabelled=True, split_rows=(0.8, 0.2))
    assert manifest.class_names == ["unlabelled"]
    assert {name: split.num_images for name, split in manifest.splits.items()} == {"train": 8, "test": 2}
    with pytest.raises(DataError, match="--split-classes needs class folders"):
        ingest("imagefolder", str(tmp_path / "src"), str(tmp_path / "ds2"), IngestOptions(),
               unlabelled=True, split_classes=(1, 1))


def test_images_beside_class_folders_are_ambiguous(tmp_path):
    make_image_folder(tmp_path / "src", {"a": 2})
    (tmp_path / "src" / "loose.png").write_bytes(image_bytes(9))
    with pytest.raises(DataError, match="loose.png lies directly under --src beside class folders"):
        ingest("imagefolder", str(tmp_path / "src"), str(tmp_path / "ds"), IngestOptions())
