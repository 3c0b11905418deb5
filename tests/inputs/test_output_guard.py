"""No output replaces an input: every command refuses before any work, naming both paths."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from metallo_core import cli
from metallo_core.errors import StorageError
from metallo_core.output_guard import refuse_output_over_inputs


def _image(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (16, 16), 90).save(path)
    return path.read_bytes()


@pytest.fixture
def folders(tmp_path) -> tuple[Path, Path, bytes]:
    support, query = tmp_path / "support", tmp_path / "query"
    _image(support / "crazing" / "s0.png")
    _image(support / "patches" / "s1.png")
    kept = _image(query / "crazing-q0.png")
    return support, query, kept


def test_classify_refuses_an_out_that_is_a_query_image(folders, capsys):
    support, query, kept = folders
    target = query / "crazing-q0.png"
    code = cli.main(["classify", "--model", "models:/metallo-protonet@current", "--support", str(support),
                     "--query", str(query), "--out", str(target)])
    err = capsys.readouterr().err
    assert code == 2
    assert str(target) in err and str(query) in err and "--query" in err
    assert target.read_bytes() == kept


def test_classify_refuses_an_out_that_is_the_query_file_through_a_link(folders, capsys):
    support, query, kept = folders
    link = query.parent / "link.csv"
    link.symlink_to(query / "crazing-q0.png")
    code = cli.main(["classify", "--model", "models:/m@a", "--support", str(support),
                     "--query", str(query / "crazing-q0.png"), "--out", str(link)])
    assert code == 2 and "would replace the input --query" in capsys.readouterr().err
    assert (query / "crazing-q0.png").read_bytes() == kept


def test_multilabel_predict_refuses_an_out_over_an_image(folders, capsys):
    _, query, kept = folders
    code = cli.main(["multilabel", "predict", "--model", "models:/m@a", "--images", str(query),
                     "--out", str(query / "crazing-q0.png")])
    assert code == 2 and "--images" in capsys.readouterr().err
    assert (query / "crazing-q0.png").read_bytes() == kept


def test_ingest_refuses_an_out_that_holds_the_source(folders, capsys):
    support, _, _ = folders
    code = cli.main(["data", "ingest", "--format", "imagefolder", "--src", str(support),
                     "--out", str(support.parent), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and "the folder holding the input --src" in err
    assert (support / "crazing" / "s0.png").is_file()


def test_report_refuses_to_swap_out_the_tracking_store(tmp_path, monkeypatch, capsys):
    home = tmp_path / "runs"
    (home / "figures").mkdir(parents=True)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{home / 'figures' / 'mlruns'}")
    code = cli.main(["report", "--experiment", "x", "--out", str(home)])
    assert code == 2 and "the tracking store" in capsys.readouterr().err


def test_tune_refuses_a_best_config_out_over_its_own_config(tmp_path, capsys):
    config = tmp_path / "search.yaml"
    config.write_text(Path("tuning/configs/finetune_tiny_cpu.yaml").read_text())
    original = config.read_text()
    code = cli.main(["tune", "finetune", "--config", str(config), f"search.best_config_out={config}",
                     "--print-config"])
    assert code == 2
    assert "search.best_config_out" in capsys.readouterr().err
    assert config.read_text() == original


def test_a_new_file_next_to_the_inputs_is_allowed(folders):
    support, query, _ = folders
    refuse_output_over_inputs({"--out": query / "predictions.csv"}, {"--support": support, "--query": query})
    with pytest.raises(StorageError, match="--support"):
        refuse_output_over_inputs({"--out": support}, {"--support": support})
