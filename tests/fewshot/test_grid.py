"""Seed 000's grid: the config file loads and validates, and the table, CSV and plot carry the numbers."""

import csv
import io
from pathlib import Path

import pytest

from metallo_core.config import load_config
from metallo_core.errors import ConfigError
from metallo_core.fewshot.grid import GridConfig, GridRow, results_csv, results_table
from metallo_core.train.grid import results_figure

REPO = Path(__file__).resolve().parents[2]
ROWS = [
    GridRow("ResNet18", "-", "synthetic", "ProtoNet (PN)", {1: (0.6536, 0.0123), 5: (0.8, 0.01)}, "models:/p/1"),
    GridRow("ResNet18", "-", "synthetic", "PN+FT", {1: (0.9072, 0.0101)}, "models:/p/1"),
]


def test_the_shipped_grid_config_loads_with_the_papers_axes():
    config = load_config(GridConfig, REPO / "configs/grid/seed000_synthetic.yaml")
    assert [b.name for b in config.backbones] == ["ResNet18", "ResNet50", "ResNet50"]
    assert [b.backbone.source for b in config.backbones] == ["scratch", "scratch", "pretrain"]
    assert [s.name for s in config.metatrain_sets] == ["synthetic", "synthetic-other"]
    assert config.shots == [1, 5] and config.modes == ["protonet", "finetune"]


def test_the_tiny_grid_config_loads():
    config = load_config(GridConfig, REPO / "configs/grid/tiny_cpu.yaml")
    assert config.target_uri == "data/fewshot-tiny" and config.shots == [1, 5]


def test_markdown_table_has_one_row_per_method_and_a_column_per_shot():
    table = results_table(ROWS, [1, 5], 5, "MEM-25")
    lines = table.strip().splitlines()
    assert lines[0] == "| Architecture | Pre-training | Meta-training | Method | MEM-25 (5w1s) | MEM-25 (5w5s) |"
    assert lines[2] == "| ResNet18 | - | synthetic | ProtoNet (PN) | 65.36% ± 1.23 | 80.00% ± 1.00 |"
    assert lines[3].startswith("| ResNet18 | - | synthetic | PN+FT | 90.72% ± 1.01 | nan")


def test_csv_has_one_line_per_measured_cell(tmp_path):
    rows = list(csv.DictReader(io.StringIO(results_csv(ROWS, [1, 5]))))
    assert [(r["method"], r["shot"]) for r in rows] == [("ProtoNet (PN)", "1"), ("ProtoNet (PN)", "5"), ("PN+FT", "1")]
    assert float(rows[2]["accuracy"]) == pytest.approx(0.9072) and rows[2]["model"] == "models:/p/1"
    results_figure(ROWS, 5, "MEM-25").savefig(tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_mode_and_missing_target_are_config_errors():
    with pytest.raises(ConfigError, match="target_uri is required"):
        GridConfig(backbones=[ROWS]).validate()
    with pytest.raises(ConfigError, match="unknown \\['maml'\\]"):
        GridConfig(target_uri="data/x", backbones=[ROWS], modes=["maml"]).validate()
