"""The `metallo` console script: subcommands present, JSON output, user errors as exit code 2."""

import json

import pytest

from metallo_core.cli import build_parser, main
from tests.image_fixtures import make_image_folder


def test_only_existing_subcommands_are_listed(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "data" in text
    assert "not implemented" not in text.lower()
    for action in build_parser()._subparsers._group_actions[0].choices.values():
        assert action.get_default("func") is not None or action._subparsers is not None


def test_ingest_then_info_json(tmp_path, capsys):
    make_image_folder(tmp_path / "src", {"a": 3, "b": 3, "c": 2, "d": 2})
    out = tmp_path / "ds"
    assert main(["data", "ingest", "--format", "imagefolder", "--src", str(tmp_path / "src"), "--out", str(out),
                 "--split-classes", "2,1,1", "--json"]) == 0
    capsys.readouterr()
    assert main(["data", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["name"] == "src"
    assert info["num_images"] == 10
    assert info["classes"] == ["a", "b", "c", "d"]
    assert info["split_kind"] == "classes"
    assert sorted(sum(info["splits"].values(), [])) == ["a", "b", "c", "d"]
    assert [len(info["splits"][s]) for s in ("train", "val", "test")] == [2, 1, 1]
    assert main(["data", "verify", str(out)]) == 0
    assert "checksums match" in capsys.readouterr().out


def test_human_info_lists_splits(tmp_path, capsys):
    make_image_folder(tmp_path / "src", {"a": 4, "b": 4})
    main(["data", "ingest", "--format", "imagefolder", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "ds"),
          "--split-rows", "0.5,0.5"])
    text = capsys.readouterr().out
    assert "splits    (row)" in text and "train" in text and "test" in text


def test_user_error_is_one_line_and_exit_code_2(tmp_path, capsys):
    code = main(["data", "info", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("metallo: error: no dataset at") and "Traceback" not in err
