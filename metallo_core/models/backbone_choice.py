"""The `backbone:` block of every stage config that builds a backbone: its architecture and, in `source`,
where its starting weights come from (`metallo_core.models.sources`). One spelling for pretraining,
meta-training and the seed-000 grid:

    backbone:
      source: imagenet-offline        # scratch | imagenet-offline | /path/w.pth | file:/p.pth#student |
                                      # download[:tag] | models:/name@alias | models:/name/3 | runs:/...
      arch: tf_efficientnet_lite0     # the architecture, for sources that do not bring their own
      library: timm
      image_size: 224
"""

from __future__ import annotations

from dataclasses import dataclass

from metallo_core.config import Renamed, require
from metallo_core.models.backbones import IMAGENET_MEAN, IMAGENET_STD, BackboneSpec
from metallo_core.models.sources import SCRATCH, SourceKind, source_kind
from metallo_core.user_paths import PathSetting


@dataclass
class BackboneChoice:
    """A backbone's architecture (the fields of `BackboneSpec` a user sets) and its weights source.

    Sources that carry their own architecture (`imagenet-offline`, registry models) ignore the
    architecture fields, except `image_size` where a stage says so.
    """

    # Any source of metallo_core.models.sources: scratch (random init), imagenet-offline, a weights file
    # (torchvision, timm or DINO checkpoint: /path/w.pth, file:/path/checkpoint.pth#student), download[:tag]
    # (explicit opt-in, needs the internet), models:/name@alias, models:/name/<version>, runs:/..., m-<id>.
    source: PathSetting = SCRATCH
    arch: str = "resnet18"  # a torchvision or timm model name, e.g. resnet50, tf_efficientnet_lite0
    library: str = "torchvision"  # torchvision | timm: which library builds `arch`
    # CIFAR-style stem (3x3 conv, stride 1, no max-pool) for 32-96 px inputs. torchvision ResNets only.
    small_input: bool = False
    image_size: int = 224  # the size the backbone runs at (224 for ImageNet networks)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # the normalisation its weights expect
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def spec(self) -> BackboneSpec:
        """The architecture as a `BackboneSpec` (its provenance, `weights`, is left empty)."""
        return BackboneSpec(arch=self.arch, small_input=self.small_input, image_size=self.image_size,
                            mean=self.mean, std=self.std, library=self.library)

    @property
    def kind(self) -> SourceKind:
        return source_kind(self.source)

    @property
    def pretrained(self) -> bool:
        """Whether the backbone starts from pretrained weights (any source but scratch)."""
        return self.source != SCRATCH

    @classmethod
    def of(cls, source: str, spec: BackboneSpec) -> BackboneChoice:
        """The block for `source` with the architecture of `spec` (its provenance dropped)."""
        return cls(source=source, arch=spec.arch, library=spec.library, small_input=spec.small_input,
                   image_size=spec.image_size, mean=spec.mean, std=spec.std)

    def validate(self) -> None:
        """A source is named; the architecture's own checks (`BackboneSpec.validate`)."""
        require(bool(self.source), "backbone.source must name where the weights come from (scratch: random "
                                   "initialisation, imagenet-offline, a weights file, models:/name@alias, ...)")
        self.spec.validate()


# Meta-training and the grid spelled the architecture as a `spec:` section below `backbone:` (read as this
# block for one release; pretraining's `init_weights` is renamed in ssl/config.py).
SPEC_SECTION_RENAMED = Renamed("backbone.spec", "backbone")
