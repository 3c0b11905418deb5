"""`auto` precision asks the device: bf16 only where it is computed natively; bf16 forced on a CPU that
would emulate it runs as asked, with a warning; fp16 needs a GPU."""

import warnings
from pathlib import Path

import pytest
import torch

from metallo_core import precision
from metallo_core.precision import EmulatedPrecisionWarning, autocast, resolve_precision

CPU = torch.device("cpu")


@pytest.fixture
def cpu_bf16(monkeypatch):
    def set_native(native: bool):
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    return set_native


def test_auto_on_a_cpu_follows_its_bf16_support(cpu_bf16):
    cpu_bf16(True)
    assert resolve_precision("auto", CPU) == "bf16"
    cpu_bf16(False)
    assert resolve_precision("auto", CPU) == "fp32"


def test_forced_bf16_on_an_emulating_cpu_warns_and_is_kept(cpu_bf16):
    cpu_bf16(False)
    with pytest.warns(EmulatedPrecisionWarning, match="emulates bf16"):
        assert resolve_precision("bf16", CPU) == "bf16"
    cpu_bf16(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("bf16", CPU) == "bf16"
        assert resolve_precision("fp32", CPU) == "fp32"


def test_fp16_off_a_gpu_and_unknown_names_are_refused():
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        resolve_precision("fp16", CPU)
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("half", CPU)


def test_autocast_computes_in_the_resolved_precision(cpu_bf16):
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    cpu_bf16(False)
    with autocast(CPU, "auto"):
        assert layer(x).dtype == torch.float32
    cpu_bf16(True)
    with autocast(CPU, "auto"):
        assert layer(x).dtype == torch.bfloat16


def test_the_probe_matches_the_cpu_flags():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to compare with")
    flags = set(cpuinfo.read_text().split())
    assert precision.cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})
