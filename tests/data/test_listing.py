"""One listing policy (metallo_core/data/listing.py) for ingest, classify and multilabel predict: a folder
tree with macOS, Windows and NAS metadata, hidden files, mixed-case extensions and symbolic links (a loop
included) gives the same images to every command, and what was left out is counted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from metallo_core.commands.classify_app import list_queries, read_support
from metallo_core.commands.multilabel_predict import list_images
from metallo_core.data.ingest import IngestOptions, ingest
from metallo_core.data.listing import filter_keys, list_folder
from metallo_core.data.shards import read_split_table
from metallo_core.errors import DataError
from tests.image_fixtures import image_bytes

APPLE_DOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + b"\x00" * 4000  # 4 KB, not an image


def build_tree(tmp_path: Path) -> tuple[Path, list[str]]:
    """A class-folder tree as copied from a Mac onto a Synology NAS; returns (root, the real images)."""
    root = tmp_path / "micrographs"
    outside = tmp_path / "elsewhere"
    (outside / "bainite").mkdir(parents=True)
    (outside / "bainite" / "b1.png").write_bytes(image_bytes(1))
    (outside / "extra.png").write_bytes(image_bytes(2))
    files = {
        "ferrite/f1.png": image_bytes(3),
        "ferrite/F2.PNG": image_bytes(4),  # upper-case extension
        "ferrite/f3.TiF": image_bytes(5, fmt="TIFF"),
        "pearlite/p1.jpg": image_bytes(6, fmt="JPEG"),
        "pearlite/deeper/p2.jpeg": image_bytes(7, fmt="JPEG"),
        # metadata, hidden files and NAS thumbnails: none of these is an image of a class
        "ferrite/._f1.png": APPLE_DOUBLE,
        "pearlite/._p1.jpg": APPLE_DOUBLE,
        "ferrite/@eaDir/f1.png/SYNOPHOTO_THUMB_M.jpg": image_bytes(8, size=20, fmt="JPEG"),
        "ferrite/@eaDir/f1.png/SYNOPHOTO_THUMB_XL.jpg": image_bytes(9, size=20, fmt="JPEG"),
        "@eaDir/ferrite/SYNOPHOTO_THUMB_M.jpg": image_bytes(10, size=20, fmt="JPEG"),
        "#recycle/pearlite/old.png": image_bytes(11),
        "__MACOSX/ferrite/._f1.png": APPLE_DOUBLE,
        ".DS_Store": b"\x00\x00\x00\x01Bud1",
        "ferrite/.DS_Store": b"\x00\x00\x00\x01Bud1",
        "ferrite/Thumbs.db": b"\xd0\xcf\x11\xe0",
        "pearlite/desktop.ini": b"[.ShellClassInfo]",
        "pearlite/.hidden.png": image_bytes(12),
        ".cache/thumb.png": image_bytes(13),
    }
    for relative, data in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)
    os.symlink(outside / "bainite", root / "bainite")  # a class folder that is a link
    os.symlink(outside / "extra.png", root / "pearlite" / "linked.png")  # an image that is a link
    os.symlink(root, root / "ferrite" / "loop")  # a loop back to the top
    os.symlink(tmp_path / "gone.png", root / "pearlite" / "broken.png")  # a broken link
    images = ["bainite/b1.png", "ferrite/F2.PNG", "ferrite/f1.png", "ferrite/f3.TiF", "pearlite/deeper/p2.jpeg",
              "pearlite/linked.png", "pearlite/p1.jpg"]
    return root, images


def test_every_command_lists_the_same_images(tmp_path, capsys):
    root, images = build_tree(tmp_path)

    listing = list_folder(root)
    assert listing.images == images
    assert listing.metadata == sorted([".DS_Store", "#recycle", "@eaDir", "__MACOSX", "ferrite/.DS_Store",
                                       "ferrite/._f1.png", "ferrite/@eaDir", "ferrite/Thumbs.db", "pearlite/._p1.jpg",
                                       "pearlite/desktop.ini"])
    assert listing.hidden == [".cache", "pearlite/.hidden.png"]
    assert listing.repeated_folders == ["ferrite/loop"]
    assert listing.broken_links == ["pearlite/broken.png"]

    # classify: the query list and the support classes
    query_root, queries = list_queries(root)
    assert [p.relative_to(query_root).as_posix() for p in queries] == images
    support = read_support(root)
    assert {name: [p.relative_to(root).as_posix() for p in files] for name, files in support.items()} == {
        "bainite": ["bainite/b1.png"],
        "ferrite": ["ferrite/F2.PNG", "ferrite/f1.png", "ferrite/f3.TiF"],
        "pearlite": ["pearlite/deeper/p2.jpeg", "pearlite/linked.png", "pearlite/p1.jpg"],
    }
    # multilabel predict
    assert [p.relative_to(root).as_posix() for p in list_images(root)] == images
    # what was left out is said, with counts
    assert "ignored 10 os/nas metadata, 2 hidden, 1 repeated folder links, 1 broken links" in capsys.readouterr().err

    # data ingest: the same classes and the same files
    manifest = ingest("imagefolder", str(root), str(tmp_path / "ds"), IngestOptions())
    assert manifest.class_names == ["bainite", "ferrite", "pearlite"]
    table = read_split_table(str(tmp_path / "ds"), "train", ["source", "class_name"])
    assert sorted(table.column("source").to_pylist()) == images
    assert manifest.source["ignored"] == {"os/nas metadata": 10, "hidden": 2, "repeated folder links": 1,
                                          "broken links": 1}


def test_object_store_keys_follow_the_same_name_rules():
    keys = ["ferrite/f1.png", "ferrite/._f1.png", "ferrite/@eaDir/f1.png/SYNOPHOTO_THUMB_M.jpg",
            "@eaDir/ferrite/SYNOPHOTO_THUMB_M.jpg", "pearlite/p1.JPG", "pearlite/notes.txt", ".DS_Store",
            "pearlite/.hidden.png"]
    listing = filter_keys("s3://bucket/src", keys)
    assert listing.images == ["ferrite/f1.png", "pearlite/p1.JPG"]
    assert listing.other_files == ["pearlite/notes.txt"]
    assert listing.metadata == sorted([".DS_Store", "@eaDir", "ferrite/._f1.png", "ferrite/@eaDir"])
    assert listing.hidden == ["pearlite/.hidden.png"]


def test_a_single_apple_double_query_is_not_an_image(tmp_path):
    (tmp_path / "._scan.png").write_bytes(APPLE_DOUBLE)
    with pytest.raises(DataError, match="not an image file"):
        list_queries(tmp_path / "._scan.png")


def test_a_folder_of_only_metadata_says_what_it_ignored(tmp_path):
    (tmp_path / "q" / "@eaDir" / "a.png").mkdir(parents=True)
    (tmp_path / "q" / "@eaDir" / "a.png" / "SYNOPHOTO_THUMB_M.jpg").write_bytes(image_bytes(1, fmt="JPEG"))
    (tmp_path / "q" / "._a.png").write_bytes(APPLE_DOUBLE)
    with pytest.raises(DataError, match=r"holds no images .*ignored 2 os/nas metadata"):
        list_images(tmp_path / "q")
