"""Loading weights files into feature backbones: plain state dicts (torchvision, timm), the official
facebookresearch DINO formats, and the efficientnet-lite-pytorch layout, with a clear error on mismatch.

Formats recognised (after `torch.load(..., weights_only=True)`):
- a plain state dict, optionally wrapped as {"state_dict": ...} or {"model": ...};
- DINO full checkpoints (`checkpoint.pth`): {"teacher": ..., "student": ..., ...}; the teacher is used
  unless the source asks for the student (`path#student`);
- key prefixes `module.` (DDP), `backbone.` (DINO's MultiCropWrapper) and `_orig_mod.` (torch.compile)
  are stripped; classifier and DINO projection-head keys (`fc.*`, `head.*`, ...) are dropped;
- efficientnet-lite-pytorch files (`_conv_stem.weight`, `_blocks.N...`): mapped by position onto timm's
  `tf_efficientnet_lite*`, which is the same network (outputs identical to the last bit).
Anything else that does not fit raises `ConfigError` naming the file, the architecture and a few of the
missing and unexpected keys with their counts.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from metallo_core.errors import ConfigError
from metallo_core.models.architectures import classifier_prefixes

STRIPPED_PREFIXES = ("module.", "backbone.", "_orig_mod.")
CHECKPOINT_PARTS = ("teacher", "student")
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
# Keys a file may lack without changing the network: BatchNorm's batch counter only feeds momentum=None.
IGNORABLE_MISSING_SUFFIXES = ("num_batches_tracked",)
SHOWN_KEYS = 5


def read_weights_file(path: str | Path) -> dict:
    """The object stored in a local weights file (never downloaded), loaded safely (`weights_only`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"backbone weights file {path} does not exist; copy the weights there "
            "(metallo downloads weights only for a source spelled `download`)")
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise ConfigError(f"backbone weights file {path} cannot be read as a torch state dict: {exc}") from exc
    if not isinstance(stored, Mapping):
        raise ConfigError(f"backbone weights file {path} holds a {type(stored).__name__}, not a state dict")
    return dict(stored)


def unwrap_state_dict(stored: Mapping, *, part: str = "teacher", name: str = "the weights") -> dict[str, torch.Tensor]:
    """The backbone's tensors out of any recognised checkpoint layout (see the module docstring)."""
    if part not in CHECKPOINT_PARTS:
        raise ConfigError(f"{name}: a DINO checkpoint part must be one of {list(CHECKPOINT_PARTS)}, got {part!r}")
    if any(key in stored for key in CHECKPOINT_PARTS):
        if part not in stored:
            raise ConfigError(f"{name} is a DINO checkpoint without a {part!r} entry; it has {sorted(stored)[:8]}")
        stored = stored[part]
    for key in WRAPPER_KEYS:
        if key in stored and isinstance(stored[key], Mapping):
            stored = stored[key]
            break
    tensors = {}
    for key, value in stored.items():
        if not isinstance(value, torch.Tensor):
            continue  # epoch counters, args, optimiser hyper-parameters
        for prefix in STRIPPED_PREFIXES:
            key = key.removeprefix(prefix)
        tensors[key] = value
    if not tensors:
        raise ConfigError(f"{name} holds no tensors; is it a weights file?")
    return tensors


def load_backbone_weights(backbone: nn.Module, state: Mapping[str, torch.Tensor], *, arch: str, library: str,
                          name: str, skip_prefixes: tuple[str, ...] = ()) -> None:
    """Copy `state` into `backbone`, strictly apart from classifier/projection-head keys and
    `skip_prefixes` (kept at their fresh initialisation). ConfigError names `name` on any mismatch."""
    expected = backbone.state_dict()
    state = dict(state)
    if "_conv_stem.weight" in state and "conv_stem.weight" in expected:
        state = _efficientnet_lite_pytorch_to_timm(state, expected, name)
    droppable = classifier_prefixes(library, arch) + ("head.",)
    state = {key: value for key, value in state.items()
             if key in expected or not key.startswith(droppable)}
    state = {key: value for key, value in state.items() if not key.startswith(skip_prefixes)}
    missing = sorted(key for key in expected if key not in state and not key.startswith(skip_prefixes)
                     and not key.endswith(IGNORABLE_MISSING_SUFFIXES))
    unexpected = sorted(key for key in state if key not in expected)
    wrong_shape = sorted(f"{key} {tuple(state[key].shape)} vs {tuple(expected[key].shape)}"
                         for key in state if key in expected and state[key].shape != expected[key].shape)
    if missing or unexpected or wrong_shape:
        raise ConfigError(
            f"backbone weights {name} does not fit a {arch} ({library}): "
            f"{_listing('missing', missing)}; {_listing('unexpected', unexpected)}; "
            f"{_listing('of another shape', wrong_shape)}. Check backbone.arch and backbone.library "
            "(and backbone.image_size for a torchvision ViT)")
    backbone.load_state_dict(state, strict=False)


def _listing(what: str, keys: list[str]) -> str:
    if not keys:
        return f"0 {what}"
    more = f", ... ({len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else ""
    return f"{len(keys)} {what} keys [{', '.join(keys[:SHOWN_KEYS])}{more}]"


def _efficientnet_lite_pytorch_to_timm(state: dict, expected: Mapping[str, torch.Tensor], name: str) -> dict:
    """efficientnet-lite-pytorch and timm's tf_efficientnet_lite register the same tensors in the same
    order (stem, blocks in sequence, head, classifier), under other names; pair them by position."""
    source = [(key, value) for key, value in state.items() if not key.startswith("_fc.")]
    target = [key for key in expected]
    if len(source) != len(target):
        raise ConfigError(f"backbone weights {name} look like an efficientnet-lite-pytorch file with "
                          f"{len(source)} tensors, but the timm network has {len(target)}; check backbone.arch")
    mapped = {}
    for (source_key, value), target_key in zip(source, target, strict=True):
        if value.shape != expected[target_key].shape:
            raise ConfigError(f"backbone weights {name}: {source_key} {tuple(value.shape)} does not match "
                              f"{target_key} {tuple(expected[target_key].shape)}; check backbone.arch")
        mapped[target_key] = value
    return mapped
