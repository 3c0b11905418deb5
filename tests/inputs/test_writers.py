"""Every writer takes any file name and creates files as open() would (mode 0666 less the umask)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from metallo_core import cli
from metallo_core.csv_output import write_csv_atomically
from metallo_core.storage import locate


def _native(path: Path, name: bytes) -> Path:
    return Path(os.fsdecode(os.path.join(os.fsencode(path), name)))


@pytest.fixture
def latin1_source(tmp_path) -> Path:
    """<src>/ferrit\\xe9/caf\\xe9.png and friends: names from an old Windows share, not valid UTF-8."""
    src = tmp_path / "src"
    for class_name in (b"ferrit\xe9", b"pearlite"):
        folder = _native(src, class_name)
        folder.mkdir(parents=True)
        for index, name in enumerate((b"caf\xe9.png", b"plain.png")):
            Image.new("L", (12, 12), 50 + 60 * index).save(_native(folder, name))
    return src


@pytest.fixture
def umask():
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ingest_stores_names_that_are_not_utf8_escaped(latin1_source, tmp_path, capsys):
    out = tmp_path / "ds"
    code = cli.main(["data", "ingest", "--format", "imagefolder", "--src", str(latin1_source), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert sorted(manifest["classes"].values()) == ["ferrit\\xe9", "pearlite"]
    table = pq.read_table(next(out.rglob("*.parquet")), columns=["class_name", "source"])
    assert "ferrit\\xe9/caf\\xe9.png" in table.column("source").to_pylist()
    assert set(table.column("class_name").to_pylist()) == {"ferrit\\xe9", "pearlite"}
    assert cli.main(["data", "verify", str(out)]) == 0


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o002, 0o664)])
def test_writers_create_files_as_open_would(latin1_source, tmp_path, umask, mask, expected):
    umask(mask)
    csv_path = Path(write_csv_atomically(tmp_path / "out" / "predictions.csv", ["image"], [["caf\udce9.png"]]))
    assert _mode(csv_path) == expected
    assert csv_path.read_text(encoding="utf-8").splitlines() == ["image", "caf\\xe9.png"]
    exported = locate(tmp_path / "best_config.yaml")
    exported.write_bytes(b"search: {}\n")
    assert _mode(Path(exported.path)) == expected
    out = tmp_path / "ds"
    assert cli.main(["data", "ingest", "--format", "imagefolder", "--src", str(latin1_source), "--out", str(out)]) == 0
    written = [path for path in out.rglob("*") if path.is_file()]
    assert written and {_mode(path) for path in written} == {expected}
