"""Which floating-point precision a stage computes in, decided per device.

Mixed precision is part of the recipe wherever the hardware computes it natively: bf16 autocast on
GPUs and on CPUs with AVX512-BF16 or AMX, where it is faster than fp32. On a CPU without them (AVX2-only:
most AMD EPYC/Ryzen and older Intel parts) PyTorch emulates bf16 and the same work runs many times
*slower* than fp32 (`benchmarks/precision_cpu.py` measures both; the README gives the figures). So the
default, `auto`, asks the device; an explicit `bf16` on such a CPU runs as asked, with a warning.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from functools import cache

import torch

PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp16", "fp32")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class EmulatedPrecisionWarning(UserWarning):
    """bf16 was asked for on a CPU that only emulates it."""


@cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 matrix products in hardware (AVX512-BF16 or AMX tiles).

    torch.cpu's probes are private; a torch without them is treated as having no native bf16 (fp32 is
    then the safe choice: never much slower, often much faster)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def resolve_precision(requested: str, device: torch.device) -> str:
    """The precision to compute in on `device`: `requested` unless it is `auto`.

    auto: bf16 on CUDA devices that support it (fp16 on older GPUs), bf16 on CPUs with native bf16,
    fp32 on other CPUs. Raises ValueError for an unknown name or fp16 off a GPU; warns
    (EmulatedPrecisionWarning) for bf16 on a CPU that would emulate it."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {requested!r}")
    if device.type == "cuda":
        if requested == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return requested
    if requested == "fp16":
        raise ValueError("precision fp16 needs a GPU; use auto, bf16 or fp32 on a CPU")
    if requested == "auto":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if requested == "bf16" and not cpu_has_native_bf16():
        warnings.warn(
            "precision bf16 on a CPU without AVX512-BF16/AMX: PyTorch emulates bf16 here, which ran ~13x slower "
            "than fp32 in our measurement; use precision auto (or fp32)", EmulatedPrecisionWarning, stacklevel=2)
    return requested


def autocast(device: torch.device, precision: str):
    """The autocast context that computes in `precision` (resolved for `device`) there: bf16/fp16
    autocast, or a no-op for fp32."""
    dtype = AUTOCAST_DTYPES.get(resolve_precision(precision, device))
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
