"""Clusters and runs that fail: the user reads which address was tried and where it came from, and an
error raised by metallo's own code in a Ray worker arrives as its own message and exit code."""

from __future__ import annotations

import argparse
import socket

import pytest
import yaml
from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

from metallo_core import cli
from metallo_core.errors import ClusterError, ConfigError, user_error_in
from metallo_core.train import ray_setup


@pytest.fixture
def fresh_driver(monkeypatch):
    """A process that has not joined a cluster yet: the session's own Ray (started by earlier tests in the
    same pytest process) must not make connect() return early. Only for tests that never reach Ray itself."""
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_closed_ray_address_from_the_environment_is_named_with_the_way_out(fresh_driver, monkeypatch):
    port = _closed_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(ClusterError) as caught:
        ray_setup.connect(None)
    message = str(caught.value)
    assert f"127.0.0.1:{port} (from the environment variable RAY_ADDRESS)" in message
    assert "unset RAY_ADDRESS and compute.ray_address to let metallo start a local cluster" in message


def test_a_closed_ray_address_from_the_config_names_the_setting(fresh_driver, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ClusterError, match=r"\(from search\.ray_address \(config\)\)"):
        ray_setup.connect(f"127.0.0.1:{_closed_port()}", "search.ray_address")


def _wrapped_like_ray_train(error: Exception) -> Exception:
    return WorkerGroupError("rank 0 failed", {0: UserExceptionWithTraceback(error, "Traceback ...\n" + str(error))})


def test_a_user_error_inside_ray_is_found_through_the_wrappers():
    error = ConfigError("optim.lr=inf made the loss non-finite at step 1; lower optim.lr")
    assert user_error_in(_wrapped_like_ray_train(error)) is error
    assert user_error_in(ControllerError(_wrapped_like_ray_train(error))) is error
    assert user_error_in(RuntimeError("a bug")) is None


@pytest.mark.parametrize("verbose", [False, True])
def test_the_cli_prints_the_message_and_exits_2_with_details_only_when_verbose(verbose, capsys):
    error = ConfigError("the loss went non-finite; lower optim.lr")

    def fails(args):
        raise _wrapped_like_ray_train(error)

    code = cli._run(argparse.Namespace(func=fails, verbose=verbose), "metallo")
    err = capsys.readouterr().err
    assert code == 2
    assert err.rstrip().endswith("metallo: error: the loss went non-finite; lower optim.lr")
    assert ("WorkerGroupError" in err) == verbose


def test_a_bug_keeps_its_traceback():
    def fails(args):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError):
        cli._run(argparse.Namespace(func=fails, verbose=False), "metallo")


@pytest.mark.ray
def test_a_diverging_metatraining_run_reports_the_trainers_message(ray_cluster, tmp_path, capsys):
    from tests.fewshot_fixtures import TINY_SPEC, write_tiny_fewshot

    data = write_tiny_fewshot(tmp_path / "fewshot")
    config = tmp_path / "metatrain.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"uri": data}, "backbone": {"source": "scratch", **TINY_SPEC},
        "episodes": {"way": 5, "shot": 1, "query": 2}, "episodes_per_epoch": 2, "val_episodes": 2, "val_shot": 1,
        "optim": {"name": "sgd", "lr": float("inf")}, "epochs": 1,
        "run": {"name": "diverges", "max_failures": 0}, "registry": {"register": False},
    }))
    code = cli.main(["metatrain", "--config", str(config)])
    err = capsys.readouterr().err
    assert code == 2
    assert "metallo: error: meta-training loss is " in err and "lower optim.lr" in err
    assert "TrainingFailedError" not in err and "WorkerGroupError" not in err
