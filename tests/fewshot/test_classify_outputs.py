"""What `metallo classify` writes and where it looks: names that are not valid UTF-8 are escaped in the CSV,
a failed write leaves no temporary file, and a model look-up from another folder creates no store and says
where it looked."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from metallo_core import cli, csv_output, tracking
from metallo_core.commands import classify_app
from metallo_core.commands.classify_app import classify
from metallo_core.errors import StorageError, TrackingError
from tests.fewshot.test_classify import texture


@pytest.fixture
def folders(tmp_path) -> tuple[Path, Path]:
    support, query = tmp_path / "support", tmp_path / "query"
    for kind in ("horizontal", "vertical"):
        (support / kind).mkdir(parents=True)
        Image.fromarray(texture(kind, 0)).save(support / kind / f"{kind}-0.png")
    query.mkdir()
    shutil.copy(support / "vertical" / "vertical-0.png", query / "ferrite-é.png")  # valid UTF-8: kept as is
    # A Latin-1 name, as copied from an old Windows share: the byte 0xE9 alone is not UTF-8.
    with open(os.path.join(os.fsencode(query), b"caf\xe9.png"), "wb") as stream:
        stream.write((support / "horizontal" / "horizontal-0.png").read_bytes())
    return support, query


def test_names_that_are_not_utf8_are_written_with_byte_escapes(registered_protonet, folders, tmp_path, capsys):
    support, query = folders
    out = tmp_path / "predictions.csv"
    assert cli.main(["classify", "--model", registered_protonet, "--support", str(support), "--query", str(query),
                     "--out", str(out)]) == 0
    with open(out, newline="", encoding="utf-8") as stream:  # the whole file is valid UTF-8
        rows = {row["file"]: row for row in csv.DictReader(stream)}
    assert set(rows) == {"caf\\xe9.png", "ferrite-é.png"}
    assert rows["caf\\xe9.png"]["nearest_support"] == "horizontal/horizontal-0.png"
    err = capsys.readouterr().err
    assert "caf\\\\xe9.png" in err and "not valid UTF-8" in err  # reported, naming the file
    assert "ferrite" not in err
    assert not list(tmp_path.glob(".predictions.csv.*"))


def test_escape_name_is_identity_on_valid_names_and_escapes_each_bad_byte():
    assert csv_output.escape_name("ferrite-é.png") == "ferrite-é.png"
    assert csv_output.escape_name(os.fsdecode(b"caf\xe9-\xff.png")) == "caf\\xe9-\\xff.png"
    names = [os.fsdecode(b"a\xe9"), "ok", os.fsdecode(b"a\xe9")]
    assert csv_output.escaped_names(names) == [(os.fsdecode(b"a\xe9"), "a\\xe9")]


class Boom(RuntimeError):
    pass


def failing_writer(fail_at_row: int, error: BaseException):
    real_writer = csv.writer

    def make(stream, *args, **kwargs):
        writer = real_writer(stream, *args, **kwargs)

        class Writer:
            rows = 0

            def writerow(self, row):
                Writer.rows += 1
                if Writer.rows == fail_at_row:
                    stream.flush()  # the partial file really is on disk when the failure comes
                    raise error
                return writer.writerow(row)

        return Writer()

    return make


def some_predictions() -> list:
    return [classify_app.Prediction(file=f"q{index}.png", predicted="a", probabilities={"a": 0.7, "b": 0.3},
                                    nearest_support="a/s.png", tiles=1, tile_votes={"a": 1}) for index in range(3)]


@pytest.mark.parametrize("error, expected", [
    (Boom("a bug mid-write"), Boom),
    (OSError(28, "No space left on device"), StorageError),
    (KeyboardInterrupt(), KeyboardInterrupt),
])
def test_a_write_that_fails_midway_leaves_no_temporary_file(error, expected, tmp_path, monkeypatch):
    out = tmp_path / "out" / "predictions.csv"
    monkeypatch.setattr(csv_output.csv, "writer", failing_writer(3, error))
    with pytest.raises(expected):
        classify_app.write_predictions(some_predictions(), ["a", "b"], out)
    assert list(out.parent.iterdir()) == []  # neither the CSV nor a .predictions.csv.* file


def test_an_earlier_csv_survives_a_failed_rewrite(tmp_path, monkeypatch):
    out = tmp_path / "predictions.csv"
    out.write_text("earlier results\n")
    monkeypatch.setattr(csv_output.csv, "writer", failing_writer(2, Boom("fails after the header")))
    with pytest.raises(Boom):
        classify_app.write_predictions(some_predictions(), ["a", "b"], out)
    assert out.read_text() == "earlier results\n" and [p.name for p in tmp_path.iterdir()] == ["predictions.csv"]


def test_classify_failing_while_writing_leaves_no_temporary_file(registered_protonet, folders, tmp_path, monkeypatch):
    support, query = folders
    out = tmp_path / "out" / "predictions.csv"
    monkeypatch.setattr(csv_output.csv, "writer", failing_writer(2, Boom("a bug mid-write")))
    with pytest.raises(Boom):
        classify(registered_protonet, support, query, out)
    assert list(out.parent.iterdir()) == []


def test_a_lookup_from_another_folder_creates_no_store_and_says_where_it_looked(registered_protonet, folders,
                                                                                tmp_path, monkeypatch, capsys):
    support, query = folders
    store = Path(os.environ[tracking.ENV_HOME])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv(tracking.ENV_HOME)
    monkeypatch.delenv(tracking.ENV_TRACKING_URI, raising=False)
    with pytest.raises(TrackingError) as caught:
        classify(registered_protonet, support, query, elsewhere / "p.csv")
    message = str(caught.value)
    assert f"no MLflow store at {elsewhere / 'metallo-runs' / 'mlflow.db'}" in message
    assert str(elsewhere) in message and "METALLO_HOME" in message and "MLFLOW_TRACKING_URI" in message
    assert list(elsewhere.iterdir()) == []  # no metallo-runs/, no mlflow.db, no mlruns/

    assert cli.main(["classify", "--model", "runs:/0123456789abcdef/protonet", "--support", str(support),
                     "--query", str(query), "--out", "p.csv"]) == 2
    assert "no MLflow store" in capsys.readouterr().err
    assert list(elsewhere.iterdir()) == []

    monkeypatch.setenv(tracking.ENV_HOME, str(store))  # pointed at the right store, the same command works
    assert classify(registered_protonet, support, query, elsewhere / "p.csv").predictions
