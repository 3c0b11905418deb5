"""`metallo config show STAGE [--json-schema]` and every stage's `--print-config`."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from metallo_core.cli import main
from metallo_core.commands.config import stages_by_word
from metallo_core.config import load_config, to_dict
from metallo_core.config_docs import field_docs
from metallo_core.ssl.config import DinoConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_DINO = str(CONFIGS / "pretrain" / "tiny_cpu.yaml")


def config_class(stage):
    return stages_by_word()[stage].config_type()


@dataclass
class Documented:
    # Two lines above
    # the field.
    above: int = 1
    beside: str = "x"  # on its line
    both: list[int] = field(default_factory=list)  # and beside
    plain: float = 0.5
    # a comment above a blank line documents nothing

    after_blank: bool = True


def test_field_docs_are_the_comments_above_and_beside_each_field():
    assert field_docs(Documented) == {"above": "Two lines above the field.", "beside": "on its line",
                                      "both": "and beside"}


@pytest.mark.parametrize("stage", sorted(stages_by_word()))
def test_show_prints_the_defaults_as_yaml_that_reads_back(stage, capsys):
    assert main(["config", "show", stage]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"# metallo {stage}: the default settings")
    assert yaml.safe_load(text) == to_dict(config_class(stage)())


def test_show_puts_each_fields_documentation_above_it(capsys):
    main(["config", "show", "pretrain"])
    lines = capsys.readouterr().out.splitlines()
    uri = lines.index("  uri: ''  # str")
    assert lines[uri - 1] == "  # dataset URI: local directory or s3://bucket/prefix"
    assert lines[uri - 2] == "data:  # DinoData"
    assert "optim:  # DinoOptimSettings" in lines and "  name: adamw  # Literal['adamw', 'sgd', 'lars']" in lines


def test_json_schema_has_types_choices_documentation_and_the_fields_own_defaults(capsys):
    assert main(["config", "show", "pretrain", "--json-schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "DinoConfig" and schema["additionalProperties"] is False
    optim = schema["$defs"]["DinoOptimSettings"]
    assert optim["properties"]["name"]["enum"] == ["adamw", "sgd", "lars"]
    assert optim["properties"]["lr"]["description"].startswith("at a total batch of 256")
    assert schema["properties"]["run"]["default"] == to_dict(DinoConfig().run)
    assert schema["properties"]["run"]["default"]["name"] == "dino"


def test_print_config_prints_the_resolved_config_and_runs_nothing(tmp_path, capsys, monkeypatch):
    import metallo_core.train.dino as dino

    monkeypatch.setattr(dino, "run_dino_pretraining", lambda config: pytest.fail("--print-config ran the stage"))
    assert main(["pretrain", "--config", TINY_DINO, "epochs=3", "optim.lr=1e-4", "--print-config"]) == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    assert load_config(DinoConfig, printed) == load_config(DinoConfig, TINY_DINO, ["epochs=3", "optim.lr=1e-4"])


def test_print_config_validates_first(capsys):
    assert main(["pretrain", "--config", TINY_DINO, "epochs=0", "--print-config"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "epochs must be >= 1" in captured.err


def test_a_job_entrypoint_prints_its_config_too(capsys):
    from metallo_core.cli import run_job

    assert run_job("jobs.evaluate",
                   ["--config", str(CONFIGS / "evaluate" / "tiny_cpu.yaml"), "tasks=7", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["tasks"] == 7
