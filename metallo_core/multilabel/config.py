"""Typed configuration of multi-label training (`configs/multilabel/*.yaml`) and of the seed-002 experiment grid."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from metallo_core.config import Renamed, require
from metallo_core.multilabel.feature_layers import AUTO, DEFAULT_CANDIDATES, FINAL_LAYERS, FeatureLayers
from metallo_core.settings import RegistrySettings
from metallo_core.user_paths import PathSetting

PROPERTY_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


@dataclass
class PropertySettings:
    """One predicted property: a label column of the dataset (`label` is the dataset's own class)."""

    name: str = ""
    kind: Literal["auto", "class", "value"] = "auto"  # auto: the column's kind in the dataset manifest
    weight: float = 1.0  # its loss is multiplied by this in the summed loss
    regression_loss: Literal["mse", "huber"] = "mse"  # value properties; on standardised targets
    huber_delta: float = 1.0  # in standard deviations of the training targets

    def validate(self) -> None:
        require(bool(PROPERTY_NAME.match(self.name)),
                f"properties: name {self.name!r} must be a label column name (letters, digits, _ . -)")
        require(self.weight >= 0, f"properties: {self.name}.weight must be >= 0, got {self.weight}")
        require(self.huber_delta > 0, f"properties: {self.name}.huber_delta must be positive, got {self.huber_delta}")


@dataclass
class MultilabelData:
    uri: PathSetting = ""  # dataset URI: local directory or s3://bucket/prefix
    split: str = "train"
    # "" carves `test_fraction` of `split` out as the test set, stratified by the dataset's class label
    # (for the nfurcated set: every morphology x volume-fraction combination); else a split of the dataset.
    test_split: str = ""
    test_fraction: float = 0.1
    split_seed: int = 0
    image_size: int = 0  # 0: the backbone's own input size (64 for the small CNN)
    max_images: int = 0  # 0: every image of the split (a smaller number for quick tries)

    def validate(self) -> None:
        require(bool(self.uri), "data.uri is required: the labelled dataset (a directory or s3://bucket/prefix); "
                                "pass --data URI or data.uri=...")
        require(0 < self.test_fraction < 1, f"data.test_fraction must be in (0, 1), got {self.test_fraction}")
        require(self.image_size == 0 or 16 <= self.image_size <= 1024,
                f"data.image_size must be 0 (the backbone's) or 16..1024, got {self.image_size}")
        require(self.max_images >= 0, "data.max_images must be >= 0 (0: all)")
        require(self.test_split != self.split, f"data.test_split must differ from data.split ({self.split!r})")


@dataclass
class BackboneSettings:
    """The frozen feature extractor: any backbone source of `metallo_core.models.sources`.

    `source`:
    - `imagenet-offline` (default): the ImageNet EfficientNet-Lite0 installed with metallo (seed 002
      prescribes an ImageNet network, and this one runs on every machine without a download; 1280-d
      features, 224 px native, inputs scaled to [-1, 1]);
    - a weights file of `library`/`arch`: `/path/w.pth` (e.g. a torchvision resnet50-11ad3fa6.pth), or
      `file:/path/checkpoint.pth#student` (torchvision, timm and DINO formats);
    - `download` or `download:<tag>`: the library's own pretrained weights, downloaded now (needs internet);
    - `models:/name@alias`, `models:/name/<version>`, `runs:/...`, `m-<id>`: a metallo-registered backbone
      (e.g. `models:/metallo-backbone@current` from `metallo pretrain`), with its own spec;
    - `scratch`: random initialisation of `library`/`arch`. A *frozen* random extractor gives meaningless
      accuracy; a warning says so.
    Older values, still read: `auto` is `imagenet-offline`, `torchvision` is `scratch` of a torchvision `arch`
    (the older `backbone.weights_path: w.pth` is read as `backbone.source: w.pth`).
    """

    # imagenet-offline, scratch, a weights file (/path/w.pth, file:/path/checkpoint.pth#student), download[:tag],
    # models:/name@alias, models:/name/<version>, runs:/... (see the class docstring)
    source: PathSetting = "imagenet-offline"
    arch: str = "resnet50"  # file, download and scratch sources: a torchvision or timm model name
    library: Literal["torchvision", "timm"] = "torchvision"  # which library builds `arch`
    small_input: bool = False  # torchvision ResNets only: CIFAR-style stem for inputs under ~96 px
    # Train the last stage (ResNet `layer4`; EfficientNet: last block group and head conv) with the heads.
    # Features then change every step, so the feature cache cannot be used: each epoch runs the whole
    # backbone on the images.
    unfreeze_last_stage: bool = False
    # Which features the heads read (metallo_core/multilabel/feature_layers.py, models/pooling.py):
    # - auto (default): train the heads once per `feature_candidates` entry on the training rows, keep the
    #   one with the lowest cumulative error on the validation rows early stopping watches (never the test
    #   rows; ties: the earlier entry). The candidates are extracted once, as one table. Only where features
    #   are cached: with unfreeze_last_stage, auto means `final`.
    # - final: the backbone's pooled features; early<N>: the spatial averages of its first N stages (ResNet
    #   layer1.., EfficientNet block groups); early<N>+final: both, averages first. Deep features ignore how
    #   much of the image is bright, which is what a volume fraction is; the early stages keep it.
    feature_layers: str = "auto"
    # Fewest features first, so a tie goes to the smaller head.
    feature_candidates: list[str] = field(default_factory=lambda: list(DEFAULT_CANDIDATES))
    # The older spelling of an explicit choice (either one set: auto is off): average the first N stages
    # (0: none) and (final_features) keep the final pooled features; unset ones read 0 and true.
    pooled_early_stages: int | None = None
    final_features: bool | None = None
    extract_batch_size: int = 64
    cache: bool = True  # reuse features computed before for the same backbone, image size and dataset
    cache_dir: PathSetting = ""  # "": $METALLO_HOME/cache/features

    def validate(self) -> None:
        require(is_backbone_source(self.source),
                f"backbone.source must be imagenet-offline, scratch, a weights file (/path/w.pth or "
                f"file:/path/w.pth), download[:tag], models:/<name>@<alias>, models:/<name>/<version>, runs:/... "
                f"or m-<id>, got {self.source!r}")
        require(self.extract_batch_size >= 1, "backbone.extract_batch_size must be >= 1")
        require(self.pooled_early_stages is None or self.pooled_early_stages >= 0,
                "backbone.pooled_early_stages must be >= 0")
        require(self.final_features is not False or (self.pooled_early_stages or 0) >= 1,
                "backbone.final_features: false needs backbone.pooled_early_stages >= 1 (no features otherwise)")
        legacy = self.pooled_early_stages is not None or self.final_features is not None
        require(not legacy or self.feature_layers == AUTO,
                f"backbone.feature_layers: {self.feature_layers} and backbone.pooled_early_stages/final_features "
                "both choose the features; keep one (e.g. feature_layers: early2 is pooled_early_stages: 2 with "
                "final_features: false)")
        if self.feature_layers != AUTO:
            FeatureLayers.parse(self.feature_layers)
        require(bool(self.feature_candidates), "backbone.feature_candidates must list at least one feature set")
        names = [FeatureLayers.parse(text, "backbone.feature_candidates").name for text in self.feature_candidates]
        require(len(set(names)) == len(names), f"backbone.feature_candidates lists a set twice: {names}")

    @property
    def explicit_layers(self) -> FeatureLayers | None:
        """The feature set the settings name, or None under auto (chosen on the validation rows)."""
        if self.pooled_early_stages is not None or self.final_features is not None:
            return FeatureLayers(self.pooled_early_stages or 0, self.final_features is not False)
        return None if self.feature_layers == AUTO else FeatureLayers.parse(self.feature_layers)

    @property
    def candidate_layers(self) -> list[FeatureLayers]:
        return [FeatureLayers.parse(text, "backbone.feature_candidates") for text in self.feature_candidates]


WEIGHTS_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
OLDER_SOURCES = ("auto", "torchvision")  # see BackboneSettings


def is_backbone_source(source: str) -> bool:
    """True for a source string `BackboneSettings.source` accepts (see its docstring)."""
    from metallo_core.models.sources import OFFLINE_IMAGENET, SCRATCH, source_kind

    if source in (*OLDER_SOURCES, OFFLINE_IMAGENET, SCRATCH):
        return True
    kind = source_kind(source)
    if kind in ("download", "registry"):
        return True
    # A file: spelled file:..., or a path (so a typo such as `imagenet` is an error, not a missing file).
    return source.startswith("file:") or "/" in source or source.lower().endswith(WEIGHTS_SUFFIXES)


@dataclass
class HeadSettings:
    fc_width: int = 1000  # the shared fc layer (seed 002: 100 or 1000)
    activation: Literal["relu", "none"] = "relu"
    dropout: float = 0.0
    # Standardise cached features with the training set's per-dimension mean and std (kept in the head).
    input_norm: bool = True

    def validate(self) -> None:
        require(self.fc_width >= 1, f"head.fc_width must be >= 1, got {self.fc_width}")
        require(0 <= self.dropout < 1, f"head.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class SmallCnnSettings:
    """The from-scratch baseline of seed 002: only convolution, pooling and linear layers."""

    channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    pooled_size: int = 4  # the last feature map is average-pooled to pooled_size x pooled_size

    def validate(self) -> None:
        require(len(self.channels) >= 1 and all(c >= 1 for c in self.channels),
                f"cnn.channels must be a non-empty list of positive widths, got {self.channels}")
        require(self.pooled_size >= 1, "cnn.pooled_size must be >= 1")


@dataclass
class OptimSettings:
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 0.001
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    # Rows per step. On cached features an epoch costs ~3 matrix products of (rows x D x fc_width) whatever
    # the batch size, but each step adds fixed optimiser and Python work: small batches make an epoch
    # several times dearer on a CPU (see tests/multilabel/test_head_training.py and the README figures).
    batch_size: int = 128
    max_epochs: int = 1024  # seed 002 allows up to 1,024 epochs
    # Early stopping: this fraction of the training rows (stratified, seeded) is held out as a validation
    # set; training stops when its score (cumulative classification error, ties broken by a loss lower
    # by min_delta) has not improved for `patience` epochs, and the weights of the best validation epoch
    # are kept. 0: no validation set (then `patience` watches the training loss, and the last epoch's
    # weights are kept). The test set never decides anything.
    validation_fraction: float = 0.1
    patience: int = 30  # epochs without improvement before stopping (0: never stop early)
    min_delta: float = 0.0001
    restore_best: bool = True  # with a validation set: keep the best validation epoch's weights
    eval_every_epochs: int = 1
    # "Epochs to saturation": the first evaluated epoch whose test error is within this many (absolute,
    # 0.005 = 0.5 percentage points) of the lowest test error of the run.
    saturation_tolerance: float = 0.005

    def validate(self) -> None:
        require(self.lr > 0, f"optim.lr must be positive, got {self.lr}")
        require(self.weight_decay >= 0, "optim.weight_decay must be >= 0")
        require(self.batch_size >= 1, "optim.batch_size must be >= 1")
        require(self.max_epochs >= 1, "optim.max_epochs must be >= 1")
        require(0 <= self.validation_fraction < 1,
                f"optim.validation_fraction must be in [0, 1) (0: no validation set), got {self.validation_fraction}")
        require(self.patience >= 0, "optim.patience must be >= 0 (0: never stop early)")
        require(self.eval_every_epochs >= 1, "optim.eval_every_epochs must be >= 1")
        require(self.saturation_tolerance >= 0, "optim.saturation_tolerance must be >= 0")


@dataclass
class MultilabelRun:
    experiment: str = "metallo-multilabel"
    name: str = "multilabel"

    def validate(self) -> None:
        require(bool(self.experiment), "run.experiment must not be empty")
        require(bool(self.name), "run.name must not be empty")


@dataclass
class MultilabelConfig:
    # The older spelling of a torchvision weights file, beside source auto or torchvision: read for one release.
    RENAMED_SETTINGS: ClassVar[tuple[Renamed, ...]] = (
        Renamed("backbone.weights_path", "backbone.source", replaces=OLDER_SOURCES),)

    data: MultilabelData = field(default_factory=MultilabelData)
    # Empty: one property per label column the dataset declares, each of the column's kind.
    properties: list[PropertySettings] = field(default_factory=list)
    # pretrained: the backbone below, frozen (or with its last stage trained); small_cnn: trained from scratch.
    encoder: Literal["pretrained", "small_cnn"] = "pretrained"
    backbone: BackboneSettings = field(default_factory=BackboneSettings)
    cnn: SmallCnnSettings = field(default_factory=SmallCnnSettings)
    head: HeadSettings = field(default_factory=HeadSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    run: MultilabelRun = field(default_factory=MultilabelRun)
    registry: RegistrySettings = field(default_factory=lambda: RegistrySettings(name="metallo-multilabel"))
    torch_threads: int = 0  # 0: torch's default
    seed: int = 0

    def validate(self) -> None:
        names = [prop.name for prop in self.properties]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        require(not duplicates, f"properties: {duplicates} declared more than once")
        require(self.torch_threads >= 0, "torch_threads must be >= 0")
        require(not self.chooses_feature_layers or self.optim.validation_fraction > 0,
                "backbone.feature_layers: auto chooses the features on the validation rows, and "
                "optim.validation_fraction is 0; set it > 0 (e.g. 0.1) or name the features "
                "(backbone.feature_layers: final, early2, ...)")

    @property
    def chooses_feature_layers(self) -> bool:
        """True when training picks the feature set on the validation rows (auto on cached features)."""
        return self.uses_feature_cache and self.backbone.explicit_layers is None

    @property
    def feature_layers(self) -> FeatureLayers | None:
        """The fixed feature set of a pretrained encoder (auto with an unfrozen stage: final); None when
        it is chosen on the validation rows, or for the small CNN."""
        if self.encoder != "pretrained":
            return None
        if self.backbone.explicit_layers is None and self.backbone.unfreeze_last_stage:
            return FINAL_LAYERS  # one training on images per candidate would cost too much
        return self.backbone.explicit_layers

    @property
    def uses_feature_cache(self) -> bool:
        return self.encoder == "pretrained" and not self.backbone.unfreeze_last_stage


@dataclass
class VariantSettings:
    """One model of the grid, trained once per test fraction."""

    name: str = ""
    properties: list[str] = field(default_factory=list)  # names from `properties`; empty: all of them
    fc_width: int = 1000
    encoder: Literal["pretrained", "small_cnn"] = "pretrained"
    test_fractions: list[float] = field(default_factory=list)  # empty: the grid's test_fractions
    max_epochs: int = 0  # 0: optim.max_epochs

    def validate(self) -> None:
        require(bool(re.fullmatch(r"[A-Za-z0-9_.-]+", self.name)),
                f"variants: name {self.name!r} must be letters, digits, '_', '.' or '-'")
        require(self.fc_width >= 1, f"variants: {self.name}.fc_width must be >= 1")
        require(all(0 < f < 1 for f in self.test_fractions), f"variants: {self.name}.test_fractions must lie in (0, 1)")
        require(self.max_epochs >= 0, f"variants: {self.name}.max_epochs must be >= 0")


@dataclass
class TuneSettings:
    max_concurrent_trials: int = 0  # 0: the machine's CPU count
    cpus_per_trial: float = 1.0
    ray_address: str | None = None  # None: $RAY_ADDRESS, else a local cluster

    def validate(self) -> None:
        require(self.max_concurrent_trials >= 0, "tune.max_concurrent_trials must be >= 0")
        require(self.cpus_per_trial > 0, "tune.cpus_per_trial must be positive (Tune rejects empty trial resources)")


def _seed002_variants() -> list[VariantSettings]:
    both = ["morphology", "volume_fraction_class"]
    return [
        VariantSettings("morphology", ["morphology"], fc_width=1000),
        VariantSettings("volume_fraction_class", ["volume_fraction_class"], fc_width=1000),
        VariantSettings("bifurcated-fc100", both, fc_width=100),
        VariantSettings("bifurcated-fc1000", both, fc_width=1000),
        # The mixed head the seed proposes: both classifications plus the continuous volume fraction.
        VariantSettings("trifurcated-regression-fc1000", [*both, "volume_fraction"], fc_width=1000),
        # The seed's comparison: a small CNN from scratch, trained on 90% of the data.
        VariantSettings("small-cnn-bifurcated", both, fc_width=1000, encoder="small_cnn", test_fractions=[0.1],
                        max_epochs=60),
    ]


@dataclass
class ExperimentsConfig(MultilabelConfig):
    """The seed-002 grid: every variant x test fraction is one Ray Tune trial on the shared feature cache."""

    properties: list[PropertySettings] = field(default_factory=lambda: [
        PropertySettings("morphology"), PropertySettings("volume_fraction_class"), PropertySettings("volume_fraction"),
    ])
    test_fractions: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9, 0.95])
    variants: list[VariantSettings] = field(default_factory=_seed002_variants)
    tune: TuneSettings = field(default_factory=TuneSettings)
    run: MultilabelRun = field(default_factory=lambda: MultilabelRun(name="seed002-experiments"))

    # The grid does not choose feature sets (each trial would train once per candidate): under
    # backbone.feature_layers: auto its trials read the final pooled features; name a set to change that.
    @property
    def chooses_feature_layers(self) -> bool:
        return False

    @property
    def feature_layers(self) -> FeatureLayers | None:
        layers = super().feature_layers
        return FINAL_LAYERS if layers is None and self.encoder == "pretrained" else layers

    def validate(self) -> None:
        super().validate()
        require(bool(self.variants), "variants must list at least one model")
        require(bool(self.test_fractions) and all(0 < f < 1 for f in self.test_fractions),
                f"test_fractions must be a non-empty list of numbers in (0, 1), got {self.test_fractions}")
        names = [variant.name for variant in self.variants]
        require(len(set(names)) == len(names), f"variants: names must be unique, got {names}")
        declared = {prop.name for prop in self.properties}
        for variant in self.variants:
            unknown = [name for name in variant.properties if name not in declared]
            require(not unknown, f"variants: {variant.name} uses {unknown}, which `properties` does not declare "
                                 f"(declared: {sorted(declared)})")
        require(not self.data.test_split,
                "data.test_split cannot be used by the experiment grid: it sweeps test_fractions of data.split")
        require(not self.backbone.unfreeze_last_stage,
                "backbone.unfreeze_last_stage cannot be used by the experiment grid: its trials train heads on "
                "cached features (run `metallo multilabel train` for an unfrozen model)")
