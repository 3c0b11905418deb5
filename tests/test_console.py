"""The console a user reads: quiet by default (metallo's lines and warnings on stderr, the result on stdout),
everything with --verbose; the same for a stage run on Ray."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest

from metallo_core import console
from metallo_core.progress import EpochProgress, Progress, format_duration

# What Ray, Ray Data, tqdm and MLflow print when left alone.
PROGRESS_BAR = re.compile(r"\d+%\|")
LIBRARY_INFO = re.compile(r"\bINFO\b")
RAY_INTERNALS = ("Running Dataset", "Execution plan", "Starting execution", "Setting up process group",
                 "Started training worker group", "Reporting training result", "Downloading artifacts")


@pytest.mark.parametrize("verbose", [False, True])
def test_quiet_shows_metallo_info_and_library_warnings_verbose_shows_library_info(verbose, restore_console,
                                                                                   capsys):
    console.configure(verbose=verbose)
    console.configure(verbose=verbose)  # configuring twice must not print lines twice
    logging.getLogger("metallo_core.train.dino").info("stage line")
    logging.getLogger("some.library").info("library chatter")
    logging.getLogger("some.library").warning("library warning")
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert ([line for line in lines if "stage line" in line]
            and len([line for line in lines if "stage line" in line]) == 1)
    assert any("library warning" in line for line in lines)
    assert any("library chatter" in line for line in lines) is verbose
    assert os.environ["METALLO_VERBOSE"] == ("1" if verbose else "0")
    assert ("MLFLOW_LOGGING_LEVEL" in os.environ) is not verbose


def test_progress_lines_carry_an_eta():
    class Clock:
        now = 0.0

    import metallo_core.progress as progress_module

    stream = __import__("io").StringIO()
    original = progress_module.time.perf_counter
    progress_module.time.perf_counter = lambda: Clock.now
    try:
        epochs = EpochProgress("pretrain", epochs=4, first_epoch=1, stream=stream)
        Clock.now = 30.0
        epochs.epoch_done(1, {"epoch_loss": 5.0})  # first epoch of this session: 30 s, 2 left
        Clock.now = 60.0
        epochs.epoch_done(3, {"epoch_loss": 4.0})  # the last: no ETA
        tasks = Progress("evaluate", total=100, every_s=0.0, stream=stream)
        Clock.now = 70.0
        tasks.advance(25)  # 2.5 tasks/s: 75 left in 30 s
    finally:
        progress_module.time.perf_counter = original
    assert stream.getvalue().splitlines() == [
        "[pretrain] epoch 2/4: epoch_loss 5.0000 (30.0 s/epoch, ETA 60 s)",
        "[pretrain] epoch 4/4: epoch_loss 4.0000 (20.0 s/epoch)",
        "[evaluate] 25/100 in 10.0s (2.5/s, ETA 30 s)",
    ]
    assert [format_duration(s) for s in (42, 210, 9000)] == ["42 s", "3.5 min", "2.5 h"]


@pytest.mark.ray
def test_a_stage_on_ray_prints_its_result_on_stdout_and_only_its_own_lines_on_stderr(ray_cluster, tmp_path,
                                                                                    repo_root):
    """`python -m metallo_core pretrain` as a second driver on the session cluster (RAY_ADDRESS): one epoch of
    tiny DINO on two Train workers fed by the Ray Data reader (decoding in Ray Data tasks, shards split by Ray
    Train), whose progress bars and INFO logs would otherwise fill the terminal. Quiet: the result on stdout,
    the epoch line (forwarded from a Train worker) on stderr. The reader feeds both workers a full epoch:
    every step is logged (a short shard raises instead)."""
    from metallo_core import tracking
    from metallo_core.data.synth_dataset import write_fewshot

    data = tmp_path / "fewshot"
    write_fewshot(str(data), num_classes=15, images_per_class=12, size=40, seed=0)  # train split: 60 images
    steps = (60 // 2) // 8  # shared by 2 workers in batches of 8
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    env.pop("METALLO_VERBOSE", None)
    command = [sys.executable, "-m", "metallo_core", "pretrain", "--config", "configs/pretrain/tiny_cpu.yaml",
               f"data.uri={data}", "epochs=1", "knn.max_images=60", "registry.register=false",
               f"run.storage={tmp_path / 'ray'}", "run.name=quiet-console", "run.log_every_steps=1",
               "data.reader=ray_data", "compute.num_workers=2", "optim.batch_size_per_worker=8",
               # schedules that suit a 3-step run: no warning from each worker about the run being short
               "optim.warmup_epochs=0", "optim.freeze_last_layer_epochs=0", "optim.momentum_teacher=0.7"]
    done = subprocess.run(command, cwd=repo_root, env=env, capture_output=True, text=True, timeout=900,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    client = tracking.client()
    experiment = client.get_experiment_by_name("metallo-pretrain")
    [run] = client.search_runs([experiment.experiment_id], filter_string="tags.`metallo.run_name` = 'quiet-console'")
    assert sorted({m.step for m in client.get_metric_history(run.info.run_id, "loss")}) == list(range(steps))

    out_lines = done.stdout.splitlines()
    assert out_lines[0].startswith("DINO pretraining done: 1 epoch(s), MLflow run ")
    assert any(line.strip().startswith("epoch_loss:") for line in out_lines)
    assert len(out_lines) <= 6, done.stdout

    err_lines = done.stderr.splitlines()
    assert any("[pretrain] epoch 1/1: epoch_loss" in line for line in err_lines), done.stderr[-3000:]
    for line in err_lines:
        assert not PROGRESS_BAR.search(line), done.stderr
        assert not LIBRARY_INFO.search(line), done.stderr
        assert not any(noise in line for noise in RAY_INTERNALS), done.stderr
    assert len(err_lines) <= 15, done.stderr


def test_a_quiet_driver_gives_its_workers_a_quiet_console(restore_console, monkeypatch):
    """What a Ray worker runs first (ray_setup.prepare_worker): the driver's choice arrives in the job's env."""
    from ray.data import DataContext

    from metallo_core.train import ray_setup

    console.configure(verbose=False)
    runtime_env = ray_setup.worker_runtime_env()
    assert runtime_env == {"worker_process_setup_hook": ray_setup.WORKER_SETUP_HOOK,
                           "env_vars": {"METALLO_VERBOSE": "0"}}
    context = DataContext.get_current()
    monkeypatch.setattr(context, "enable_progress_bars", True)
    monkeypatch.setattr(context, "enable_operator_progress_bars", True)
    data_console = [handler for handler in logging.getLogger("ray.data").handlers
                    if type(handler).__name__ == "PlainRayHandler"]
    assert data_console
    for handler in data_console:
        monkeypatch.setattr(handler, "level", logging.INFO)
    ray_setup.prepare_worker()
    assert not context.enable_progress_bars and not context.enable_operator_progress_bars
    assert all(handler.level == logging.WARNING for handler in data_console)

    console.configure(verbose=True)
    assert ray_setup.worker_runtime_env()["env_vars"] == {"METALLO_VERBOSE": "1"}


def test_a_progress_line_is_not_repeated_by_finish():
    import io

    stream = io.StringIO()
    tasks = Progress("evaluate protonet", total=3, every_s=0.0, stream=stream)
    tasks.advance(3)  # prints 3/3
    tasks.finish()  # nothing new to say
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and "3/3" in lines[0]
    quiet = Progress("evaluate finetune", total=3, every_s=3600.0, stream=io.StringIO())
    quiet.advance(3)
    quiet.finish()
    assert len(quiet.stream.getvalue().splitlines()) == 1  # the closing line when advance printed nothing
