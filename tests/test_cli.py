"""The `metallo` console script: subcommands present, JSON output, user errors as exit code 2."""

import json

import pytest

from metallo_core.cli import build_parser, main
from tests.image_fixtures import make_image_folder

pytestmark = pytest.mark.usefixtures("restore_console")  # main() configures the console


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


# ------------------------------------------------------------------ the one stage table

def test_every_stage_in_the_table_resolves_to_a_config_dataclass_and_functions():
    import dataclasses

    from metallo_core.stage_table import STAGES

    for stage in STAGES:
        assert dataclasses.is_dataclass(stage.config_type()), stage.name
        assert callable(stage.runner_function()), stage.name
        assert stage.describe is None or callable(stage.describe_function()), stage.name
        assert stage.to_json is None or callable(stage._resolve_to_json()), stage.name


def test_every_stage_is_a_metallo_subcommand_and_a_job_module_that_runs_it(repo_root):
    import re

    from metallo_core.stage_table import STAGES, job_stage, stage_named

    for stage in STAGES:
        args = build_parser().parse_args([*stage.name.split(), "a.b=1"])
        assert args.stage == stage.name and args.overrides == ["a.b=1"]
        path = repo_root / (stage.job.replace(".", "/") + ".py")
        # The entrypoint file is the one-line call into the table under its own module name.
        assert re.findall(r'run_job\("([\w.]+)"\)', path.read_text()) == [stage.job], path
        assert job_stage(stage.job, [*stage.job_args, "--json"]) == (stage, ["--json"])
        assert stage_named(stage.name) is stage
        assert stage_named(" ".join((stage.job, *stage.job_args))) is stage
    assert stage_named("pretrain_dino").name == "pretrain"
    assert stage_named("tune.finetune").name == "tune finetune"
    with pytest.raises(KeyError, match="the stages are: pretrain"):
        stage_named("pretrian")


def test_the_wheel_installs_metallo_core_only(repo_root):
    import tomllib

    pyproject = tomllib.loads((repo_root / "pyproject.toml").read_text())
    assert pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"] == ["metallo_core"]
    assert pyproject["project"]["scripts"] == {"metallo": "metallo_core.cli:main"}


def test_job_entrypoint_user_error_is_one_line_and_exit_code_2(tmp_path, capsys):
    from metallo_core.cli import run_job

    code = run_job("jobs.evaluate", ["--config", str(tmp_path / "missing.yaml")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("evaluate: error:") and "missing.yaml" in err and "Traceback" not in err


def test_multilabel_shortcut_and_to_json_go_through_the_table(monkeypatch, capsys):
    """`--data` is `data.uri=`; `--json` on experiments prints the summary the table names, not the whole result."""
    from metallo_core import stage_table

    seen = {}
    stage = stage_table.stage_named("multilabel experiments")
    monkeypatch.setattr(stage_table.Stage, "config_type", lambda self: dict)
    monkeypatch.setattr(stage_table.Stage, "runner_function", lambda self: lambda config: {"raw": True})
    monkeypatch.setattr(stage_table.Stage, "_resolve_to_json", lambda self: lambda result: {"summary": result["raw"]})

    def fake_run_stage(args, config_type, runner, describe):
        seen["overrides"] = args.overrides
        seen["printed"] = runner({})
        return 0

    monkeypatch.setattr(stage_table, "run_stage", fake_run_stage)
    assert main(["multilabel", "experiments", "--data", "/d", "x.y=2", "--json"]) == 0
    assert seen == {"overrides": ["x.y=2", "data.uri=/d"], "printed": {"summary": True}}
    assert stage.job_args == ("experiments",)


def test_verbose_is_accepted_before_and_after_the_command():
    assert build_parser().parse_args(["--verbose", "data", "info", "x"]).verbose is True
    assert build_parser().parse_args(["data", "info", "x", "--verbose"]).verbose is True
    assert build_parser().parse_args(["tune", "metatrain", "-v"]).verbose is True
    assert build_parser().parse_args(["data", "info", "x"]).verbose is False


def test_python_dash_m_metallo_core_is_the_console_script(repo_root):
    import subprocess
    import sys

    from metallo_core import __version__

    done = subprocess.run([sys.executable, "-m", "metallo_core", "--version"], cwd=repo_root,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip() == f"metallo {__version__}"
