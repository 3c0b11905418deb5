"""Global averages of a backbone's early stages, to sit beside its final pooled features.

Why: a frozen ImageNet network's last stage is built to ignore first-order image statistics (how much of
the image is bright), and those are exactly what a volume fraction is, while the morphology is read best
from the later stages. The averages of the first block groups carry both; beside them the much wider final
features can drown the early ones, which is why the final features can be left out. Which layers a
multi-label model uses is chosen on validation rows (`multilabel.feature_layers`); the README's
multi-label section gives the error of each choice on seed 002's synthetic set.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from metallo_core.errors import ConfigError
from metallo_core.models.stages import stage_names


def early_stage_names(backbone: nn.Module, count: int) -> tuple[str, ...]:
    """The first `count` stages of `backbone` (`stage_names`); ConfigError if it has fewer than `count` + 1
    (the last stage already feeds the final pooled features)."""
    names = stage_names(backbone)
    if not 0 <= count < len(names):
        raise ConfigError(f"backbone.pooled_early_stages must be in 0..{len(names) - 1} for this "
                          f"{type(backbone).__name__} ({len(names)} stages), got {count} (the same bound holds "
                          f"for N in backbone.feature_layers: early<N>)")
    return names[:count]


class StageAverages:
    """Collects the spatial mean (B, C_i) of named submodules' outputs (B, C_i, H_i, W_i) while a forward
    runs inside `collecting()`; outside it the hooks do nothing, so other users of the backbone are not
    affected."""

    def __init__(self, backbone: nn.Module, names: Sequence[str]):
        self.names = tuple(names)
        self._averages: list[Tensor] | None = None
        self._handles = [backbone.get_submodule(name).register_forward_hook(self._keep) for name in self.names]

    def _keep(self, module: nn.Module, inputs, output: Tensor) -> None:
        if self._averages is not None:
            self._averages.append(output.float().mean(dim=(2, 3)))

    @contextmanager
    def collecting(self):
        self._averages = []
        try:
            yield self._averages
        finally:
            self._averages = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def pooled_with_early_stages(backbone: nn.Module, averages: StageAverages, images: Tensor, *,
                             include_final: bool = True) -> Tensor:
    """(B, 3, H, W) normalised images -> (B, sum C_i [+ D]): the early stages' averages, in stage order, then
    (`include_final`) the backbone's own pooled features (B, D)."""
    with averages.collecting() as collected:
        final = backbone(images)
    if len(collected) != len(averages.names):
        raise RuntimeError(f"expected outputs of {averages.names}, the forward produced {len(collected)}")
    return torch.cat([*collected, final.float()] if include_final else collected, dim=1)


def stage_widths(backbone: nn.Module, names: Sequence[str], image_size: int) -> tuple[int, ...]:
    """Channels C_i of each named stage's output, from one probe forward of a (1, 3, S, S) zero image in
    eval mode without gradients (the widths do not depend on the size; the probe only needs a valid one)."""
    if not names:
        return ()
    averages = StageAverages(backbone, names)
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad(), averages.collecting() as collected:
            backbone(torch.zeros(1, 3, image_size, image_size))
    finally:
        averages.remove()
        backbone.train(was_training)
    return tuple(int(average.shape[1]) for average in collected)
