"""Meta-test fine-tuning of a ProtoNet on one task's support set (seed 000 §2.3, P>M>F ProtoNet_Finetune),
its support-only learning-rate search (P>M>F Auto_Finetune), and the choice between modes by name: the one
engine (`FinetuneEngine`) that evaluation, `classify --finetune`, the searches and the benchmarks all run.

Two forms, chosen by `FinetuneSettings.pseudo_queries`:
- "trunk_maps" (the default): the output of the backbone's first stages (stem + stages [0, cache_stage),
  `models.staged`) is computed once per image and cached in float16; every step draws the pseudo-queries as
  random resized crops and flips *of the support's cached maps* and runs only the stages after the cache.
  The trunk ends at 1/8 or 1/16 of the input's side, where a crop of 60-100% of the map is, up to the
  receptive-field border, the map of a crop of the image: the same texture at a slightly different
  magnification, which is what another image of the class shows. Only the part after the cache can adapt.
- "pixels": pseudo-queries are augmented copies of the support images (colour ops clamp to [0, 1], so
  augmentation acts on unit images and everything is normalised just before the backbone); the whole
  backbone runs every step, and any part of it can adapt.

Images enter as float (B, 3, H, W) in [0, 1]; `FinetuneEngine.prepare` turns them into the cache its mode
works on (the images themselves, or (B, C, h, w) float16 trunk maps). A task reaches the engine as a
`fewshot.task.FewShotTask` of cache rows (adapting takes its `SupportSet` alone); the model, the settings and
the random stream stay with the engine and the call.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metallo_core.config import require
from metallo_core.data.tensor_augment import (
    brightness_contrast,
    color_jitter,
    random_flip_rot90,
    random_resized_crop,
    random_translate,
)
from metallo_core.errors import ConfigError
from metallo_core.fewshot.inference import InferenceSettings, query_logits
from metallo_core.fewshot.metrics import accuracy
from metallo_core.fewshot.protonet import ImageNormalizer, ProtoNet
from metallo_core.fewshot.task import FewShotTask, SupportSet
from metallo_core.models.staged import StagedBackbone, split_backbone
from metallo_core.models.stages import LastStage, last_block, last_stage

PARTIAL_UPDATES = {"last_stage": last_stage, "last_block": last_block}
FINETUNE_UPDATES = ("all", *PARTIAL_UPDATES, "batchnorm")  # FinetuneSettings.update spells them out for its docs
PseudoQueries = Literal["pixels", "trunk_maps"]
PSEUDO_QUERIES: tuple[str, ...] = get_args(PseudoQueries)

MetaTestMode = Literal["protonet", "finetune", "finetune_autolr"]
META_TEST_MODES: tuple[str, ...] = get_args(MetaTestMode)
AUGMENTATIONS = ("crop", "flip", "rot90", "translate", "brightness_contrast", "color_jitter")
# Strengths follow P>M>F's DiffAugment: shifts up to 1/8 of a side, contrast factors in [0.5, 1.5].
TRANSLATE_FRACTION = 0.125
TRANSLATE_PADDING = "reflection"
# A crop of 60-100% of the area, resized back: for textures (micrographs) another patch of the same
# structure at a slightly different magnification, i.e. the variation a query of the class shows.
CROP_SCALE = (0.6, 1.0)
BRIGHTNESS = 0.4
CONTRAST = 0.5
# One rule for every caller's per-task random stream (task_generator): a prime stride keeps the streams of
# neighbouring seeds apart for any realistic number of tasks.
TASK_SEED_STRIDE = 1_000_003


@dataclass
class FinetuneSettings:
    """How a ProtoNet adapts to a task's support set. The defaults are the ones chosen on held-apart X-SDD
    selection tasks (5-way 1-shot, ImageNet EfficientNet-Lite0 at 128 px, fine-tuned minus plain ProtoNet
    paired per task; `benchmarks/real_fewshot.py --select`, README "Few-shot on real images"): cached trunk
    maps at stage 3, the last block and head conv, 10 Adam steps at lr 3e-3, BatchNorm in eval mode, 8
    pseudo-queries per class and step, crops of 60-100% of a map, horizontal and vertical flips."""

    # "trunk_maps": pseudo-queries are crops of cached trunk maps, only the part after cache_stage adapts;
    # "pixels": augmented support images through the whole backbone (see the module docstring).
    pseudo_queries: PseudoQueries = "trunk_maps"
    steps: int = 10
    lr: float = 3e-3
    lr_candidates: tuple[float, ...] = (0.0, 1e-4, 5e-4, 1e-3)  # searched by finetune_autolr
    # last_stage / last_block: see models.stages (a ResNet's layer4 / its last residual block, ...).
    # batchnorm: only the scale and shift of the BatchNorm layers (of the whole backbone with pixels, of the
    # part after the cache with trunk_maps): the features are re-weighted for the task, not re-learnt. On the
    # tiny synthetic set of tests/train/test_fewshot_ray.py it helped on the test classes and hurt on the val
    # classes: like every setting here, choose it on meta-validation tasks (select_on_val, a Tune search).
    # all: the whole backbone (pixels only).
    update: Literal["all", "last_stage", "last_block", "batchnorm"] = "last_block"
    # P>M>F fine-tunes in eval mode without saying so; here it is a choice. "train" lets the updated
    # BatchNorm layers use batch statistics while adapting (their running statistics then move to the
    # support set and are used to classify the queries); "eval" keeps the trained statistics.
    bn_mode: Literal["train", "eval"] = "eval"
    # Pseudo-queries per class and step, at least one augmented copy of each support image: the support is
    # copied ceil(this * way / support images) times, each copy with its own draws (pseudo_query_views).
    # More of them give a less noisy gradient per step.
    pseudo_queries_per_class: int = 8
    # trunk_maps only: the trunk is the stem and stages [0, cache_stage) (models.staged); its output is cached.
    cache_stage: int = 3
    crop_scale: float = 0.6  # trunk_maps only: smallest area fraction of a pseudo-query's crop of a map
    vflip: bool = True  # trunk_maps only: vertical flips as well as horizontal (a micrograph has no up/down)
    # pixels only: crop + flip makes pseudo-queries the model still mostly classifies right, on the
    # synthetic benchmark's meta-val tasks, where translation and DiffAugment-strength colour do not.
    # rot90 is a true symmetry only where the classes have no orientation.
    augmentations: tuple[str, ...] = ("crop", "flip")
    augment_p: float = 0.9  # pixels only: the chance a support image's pseudo-query copy is augmented at all
    autolr_steps: int = 20  # fine-tuning steps per lr candidate in finetune_autolr

    def validate(self) -> None:
        require(self.pseudo_queries in PSEUDO_QUERIES,
                f"finetune.pseudo_queries must be one of {', '.join(PSEUDO_QUERIES)}, got {self.pseudo_queries!r}")
        require(self.steps >= 0, f"finetune.steps must be >= 0 (0 means plain ProtoNet), got {self.steps}")
        require(self.lr >= 0, f"finetune.lr must be >= 0 (0 means plain ProtoNet), got {self.lr}")
        require(len(self.lr_candidates) >= 1 and all(lr >= 0 for lr in self.lr_candidates),
                f"finetune.lr_candidates must list at least one lr >= 0, got {list(self.lr_candidates)}")
        unknown = [name for name in self.augmentations if name not in AUGMENTATIONS]
        require(not unknown, f"finetune.augmentations: unknown {unknown}; choose from {list(AUGMENTATIONS)}")
        require(0 <= self.augment_p <= 1, f"finetune.augment_p must be in [0, 1], got {self.augment_p}")
        require(self.pseudo_queries_per_class >= 1,
                f"finetune.pseudo_queries_per_class must be >= 1, got {self.pseudo_queries_per_class}")
        require(self.bn_mode in ("train", "eval"), f"finetune.bn_mode must be 'train' or 'eval', got {self.bn_mode!r}")
        require(self.update in FINETUNE_UPDATES,
                f"finetune.update must be one of {', '.join(FINETUNE_UPDATES)}, got {self.update!r}")
        require(self.autolr_steps >= 1, f"finetune.autolr_steps must be >= 1, got {self.autolr_steps}")
        require(self.cache_stage >= 0, f"finetune.cache_stage must be >= 0, got {self.cache_stage}")
        require(0.05 <= self.crop_scale <= 1.0, f"finetune.crop_scale must be in [0.05, 1], got {self.crop_scale}")
        require(self.pseudo_queries != "trunk_maps" or self.update != "all",
                "finetune.update 'all' would update the cached trunk, which pseudo_queries 'trunk_maps' never "
                "runs again; update last_block, last_stage or batchnorm (the part after finetune.cache_stage), "
                "or use finetune.pseudo_queries: pixels")


def task_generator(seed: int, task_index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The random stream of task `task_index` of a run seeded `seed`: the one rule of every caller (evaluation,
    searches, benchmarks; classify is task 0 of seed 0), so a task's draws never depend on how the tasks were
    chunked, ordered or spread over processes."""
    return torch.Generator(device=device).manual_seed(seed * TASK_SEED_STRIDE + task_index)


# ------------------------------------------------------------------------------------------ the engine


class FinetuneEngine:
    """A ProtoNet, its fine-tuning settings, its inference settings (how support and query features become
    query logits, `fewshot.inference`) and its input normaliser: prepare images once, then adapt to a support
    set, embed, or score whole tasks (restoring the weights after each).

    The model is adapted in place: `adapt` leaves it adapted (classify), `task_logits` restores it bit-exactly,
    also after an exception. ConfigError at construction for settings this model cannot run (trunk_maps on a
    network without stages, an update inside the cached trunk, a cache_stage past the last stage)."""

    def __init__(self, model: ProtoNet, settings: FinetuneSettings, normalizer: ImageNormalizer,
                 inference: InferenceSettings | None = None) -> None:
        settings.validate()
        self.inference = inference or InferenceSettings()
        self.inference.validate()
        self.model, self.settings, self.normalizer = model, settings, normalizer
        self.staged: StagedBackbone | None = None
        if settings.pseudo_queries == "trunk_maps":
            self.staged = split_backbone(model.backbone)
            require(settings.cache_stage <= len(self.staged.stages),
                    f"finetune.cache_stage {settings.cache_stage} is past this backbone's "
                    f"{len(self.staged.stages)} stages; lower it or use finetune.pseudo_queries: pixels")
        self.stage = PARTIAL_UPDATES[settings.update](model.backbone) if settings.update in PARTIAL_UPDATES else None
        self.updated = self._updated_part()
        if self.staged is not None:
            self._check_after_cache()

    def with_settings(self, **changes: Any) -> FinetuneEngine:
        """An engine on the same model and normaliser with some settings changed (e.g. steps for autolr)."""
        return FinetuneEngine(self.model, dataclasses.replace(self.settings, **changes), self.normalizer,
                              self.inference)

    # ---------------------------------------------------------------------------------------- cache

    @torch.no_grad()
    def prepare(self, unit_images: Tensor, batch_size: int = 64) -> Tensor:
        """The cache of (N, 3, H, W) float images in [0, 1]: the images themselves (pixels), or their
        (N, C, h, w) float16 trunk maps computed in batches in eval mode (trunk_maps; half the memory of fp32)."""
        if self.staged is None:
            return unit_images
        with eval_mode(self.model):
            return concat([self.staged.trunk(self.normalizer.normalize(unit_images[start:start + batch_size]),
                                             self.settings.cache_stage).half()
                           for start in range(0, len(unit_images), batch_size)])

    @torch.no_grad()
    def embed(self, cache: Tensor, batch_size: int = 256) -> Tensor:
        """(N, D) float32 features of a cache with the current weights, in eval mode."""
        with eval_mode(self.model):
            return torch.cat([self._features(cache[start:start + batch_size]).float()
                              for start in range(0, len(cache), batch_size)])

    def _features(self, cache: Tensor) -> Tensor:
        if self.staged is None:
            return self.model.embed(self.normalizer.normalize(cache))
        return self.staged.from_trunk(cache.float(), self.settings.cache_stage)

    # ---------------------------------------------------------------------------------------- tasks

    def protonet_logits(self, task: FewShotTask) -> Tensor:
        """(Q, way) ProtoNet logits with the current weights under the engine's inference settings: support and
        queries embedded in one pass (as ProtoNet.forward), eval mode, no gradients. Every fine-tuning mode
        ends with this call."""
        return query_logits(self.model.classifier, self.task_features(task), self.inference)

    def task_features(self, task: FewShotTask) -> FewShotTask:
        """The task with its (S, D) support and (Q, D) query features, float32, with the current weights, one
        pass."""
        support, query = task.support.examples, task.query
        features = self.embed(concat([support, query]))
        support_features, query_features = features.split([len(support), len(query)])
        return FewShotTask(SupportSet(support_features, task.support.labels, task.support.way), query_features)

    def task_logits(self, task: FewShotTask, generator: torch.Generator, lr: float | None = None) -> Tensor:
        """(Q, way) query logits after adapting to the support set (`lr` overrides settings.lr); the model is
        restored bit-exactly afterwards. With steps == 0 or lr == 0 nothing is adapted, so the logits equal
        `protonet_logits` bit for bit."""
        with restored_afterwards(self.model):
            self.adapt(task.support, generator, lr=lr)
            return self.protonet_logits(task)

    def mode_features(self, mode: str, task: FewShotTask, generator: torch.Generator,
                      lr: float | None = None) -> FewShotTask:
        """The task with its (S, D) support and (Q, D) query features after the named meta-test mode's adaptation
        (weights restored afterwards): what any inference settings then score (`inference.query_logits`)."""
        self._check_mode(mode, lr)
        if mode == "finetune_autolr":
            lr = self.auto_lr(task.support, generator)
        with restored_afterwards(self.model):
            if mode != "protonet":
                self.adapt(task.support, generator, lr=lr)
            return self.task_features(task)

    def mode_logits(self, mode: str, task: FewShotTask, generator: torch.Generator, lr: float | None = None) -> Tensor:
        """Query logits of one task under the named meta-test mode; `lr` overrides settings.lr in "finetune"."""
        self._check_mode(mode, lr)
        if mode == "protonet":
            return self.protonet_logits(task)
        if mode == "finetune_autolr":
            lr = self.auto_lr(task.support, generator)
        return self.task_logits(task, generator, lr=lr)

    @staticmethod
    def _check_mode(mode: str, lr: float | None) -> None:
        if mode not in META_TEST_MODES:
            raise ConfigError(f"meta-test mode must be one of {list(META_TEST_MODES)}, got {mode!r}")
        if lr is not None and mode != "finetune":
            raise ValueError(f"an lr applies to mode 'finetune' only; mode {mode!r} "
                             f"{'chooses its own' if mode == 'finetune_autolr' else 'has none'}")

    def auto_lr(self, support: SupportSet, generator: torch.Generator) -> float:
        """P>M>F's Auto_Finetune choice, made from the support set alone (no query labels, no test episodes)."""
        return best_lr(self.autolr_accuracies(support, generator))

    def autolr_accuracies(self, support: SupportSet, generator: torch.Generator) -> dict[float, float]:
        """{lr: accuracy on held-out support images} for each candidate: the first shot of each class is the
        support, the other shots are labelled queries, fine-tuned for autolr_steps (weights restored after each)."""
        held_out, held_out_labels = split_support_for_autolr(support)
        # Inductive whatever the engine's inference: the held-out support images are not a query folder.
        search = FinetuneEngine(self.model, dataclasses.replace(self.settings, steps=self.settings.autolr_steps),
                                self.normalizer)
        start = generator.get_state()
        accuracies = {}
        for lr in sorted(self.settings.lr_candidates):
            generator.set_state(start)  # same augmentation draws for every candidate: only the lr differs
            accuracies[lr] = accuracy(search.task_logits(held_out, generator, lr=lr), held_out_labels)
        return accuracies

    # ---------------------------------------------------------------------------------------- adaptation

    def adapt(self, support: SupportSet, generator: torch.Generator, lr: float | None = None,
              on_step: Callable[[int, float], None] | None = None) -> None:
        """`settings.steps` Adam steps on the updated part, in place (nothing with steps 0 or lr 0): the
        pseudo-queries (augmented support copies, `views` per support image) are the queries of the
        un-augmented support's prototypes, recomputed with the current weights every step so gradients flow
        through them as well. The loss is cross-entropy of the ProtoNet's own logits (its cosine scale stays
        as trained, as in P>M>F). `on_step(step, loss)` after each step."""
        settings = self.settings
        lr = settings.lr if lr is None else lr
        if settings.steps == 0 or lr == 0:
            return
        parameters = (batchnorm_parameters(self.updated) if settings.update == "batchnorm"
                      else list(self.updated.parameters()))
        for parameter in self.model.parameters():  # restored_afterwards puts the flags back
            parameter.requires_grad_(False)
        for parameter in parameters:
            parameter.requires_grad_(True)
        optimizer = torch.optim.Adam(parameters, lr=lr, weight_decay=0.0)
        set_bn_mode(self.model, self.updated, settings.bn_mode)
        views = pseudo_query_views(settings.pseudo_queries_per_class, len(support.labels), support.way)
        pseudo_query_labels = support.labels.repeat(views)  # view-major, as the pseudo-query sets stack them
        step_logits = self._trunk_map_step if self.staged is not None else self._pixel_step(support)
        with torch.enable_grad():  # callers often score tasks under no_grad
            for step in range(settings.steps):
                logits = step_logits(support, views, generator)
                loss = F.cross_entropy(logits.float(), pseudo_query_labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                forget_autocast_casts()
                if on_step is not None:
                    on_step(step, float(loss.detach()))

    def _trunk_map_step(self, support: SupportSet, views: int, generator: torch.Generator) -> Tensor:
        assert self.staged is not None
        settings = self.settings
        support_maps = support.examples.float()
        pseudo_query = crop_trunk_maps(support_maps, views, settings.crop_scale, settings.vflip, generator)
        # One pass for support and pseudo-queries: with bn_mode "train" they share the batch statistics. The
        # stages before the updated part have no trainable weights, so autograd records nothing there.
        features = self.staged.from_trunk(concat([support_maps, pseudo_query]), settings.cache_stage)
        support_features, query_features = features.split([len(support_maps), len(pseudo_query)])
        return self.model.logits_from_features(support_features, support.labels, query_features, support.way)

    def _pixel_step(self, support: SupportSet) -> Callable[[SupportSet, int, torch.Generator], Tensor]:
        normalized = self.normalizer.normalize(support.examples)
        embed = frozen_trunk_embedder(self.stage, normalized) if uses_frozen_trunk(self.stage) else None

        def step_logits(support: SupportSet, views: int, generator: torch.Generator) -> Tensor:
            pseudo_query = self.normalizer.normalize(pseudo_query_set(support.examples, self.settings, views,
                                                                      generator))
            if embed is None:
                return self.model(normalized, support.labels, pseudo_query, support.way)
            support_features, query_features = embed(pseudo_query)
            return self.model.logits_from_features(support_features, support.labels, query_features, support.way)

        return step_logits

    # ---------------------------------------------------------------------------------------- checks

    def _updated_part(self) -> nn.Module:
        """The modules `update` names: the last stage or block, or, for "all" and "batchnorm", the whole
        backbone (pixels) or everything after the cached trunk (trunk_maps)."""
        if self.stage is not None:
            return self.stage.modules
        if self.staged is not None:
            return nn.ModuleList([*self.staged.stages[self.settings.cache_stage:], self.staged.head])
        return self.model.backbone

    def _check_after_cache(self) -> None:
        assert self.staged is not None
        cache_stage = self.settings.cache_stage
        trunk = {id(parameter) for module in (self.staged.stem, *self.staged.stages[:cache_stage])
                 for parameter in module.parameters()}
        if any(id(parameter) in trunk for parameter in self.updated.parameters()):
            raise ConfigError(
                f"finetune.update {self.settings.update!r} reaches into the cached trunk (stem and stages "
                f"[0, {cache_stage}) of {len(self.staged.stages)}), which pseudo_queries 'trunk_maps' never runs "
                f"again; lower finetune.cache_stage, update a later part, or use finetune.pseudo_queries: pixels")


def concat(tensors: list[Tensor]) -> Tensor:
    """torch.cat outside autocast: CPU autocast refuses to concatenate float16 tensors (the trunk-map cache)
    under bfloat16 ("Unexpected floating ScalarType"), and a concatenation needs no cast anyway."""
    with torch.autocast(tensors[0].device.type, enabled=False):
        return torch.cat(tensors)


def best_lr(accuracies: dict[float, float]) -> float:
    """The most accurate lr; ties go to the smaller, the more conservative change to the backbone."""
    return min(accuracies, key=lambda lr: (-accuracies[lr], lr))


def split_support_for_autolr(support: SupportSet) -> tuple[FewShotTask, Tensor]:
    """(task, its query labels): the first shot of each class as the task's support, all the others as its
    labelled queries. ConfigError when a class has fewer than 2 shots."""
    first_rows, other_rows = [], []
    for label in range(support.way):
        rows = (support.labels == label).nonzero().squeeze(1)
        if len(rows) < 2:
            raise ConfigError(
                f"finetune_autolr needs at least 2 shots per class (one becomes the prototype, the others "
                f"validate each lr); class {label} of this task has {len(rows)}: use mode 'finetune' with an lr "
                "chosen on meta-validation tasks"
            )
        first_rows.append(rows[:1])
        other_rows.append(rows[1:])
    validation = torch.cat(other_rows)
    return FewShotTask(support.subset(torch.cat(first_rows)), support.examples[validation]), support.labels[validation]


# ------------------------------------------------------------------------------------------ pixel fast path


def uses_frozen_trunk(stage: LastStage | None) -> bool:
    """pixels with update "last_stage" / "last_block" on a network that splits cleanly before that part
    (models.stages): the frozen trunk then runs once per task, without autograd."""
    return stage is not None and stage.trunk is not None and stage.tail is not None


def frozen_trunk_embedder(stage: LastStage, support: Tensor) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """For pixels with update "last_stage" (or "last_block"): everything before that part is frozen (weights
    and BatchNorm statistics), so the support's trunk features are computed once per task and the
    pseudo-queries' without autograd; only the updated part runs with gradients. Same result as the full
    forward. Support and pseudo-queries still share one pass through the updated part, so with bn_mode
    "train" its BatchNorm sees the same batch as in the full forward."""
    assert stage.trunk is not None and stage.tail is not None
    trunk_of, tail_of = stage.trunk, stage.tail

    def trunk(images: Tensor) -> Tensor:
        with torch.no_grad():
            return trunk_of(images)

    support_trunk = trunk(support)

    def embed(pseudo_query: Tensor) -> tuple[Tensor, Tensor]:
        features = tail_of(torch.cat([support_trunk, trunk(pseudo_query)]))
        return features.split([len(support), len(pseudo_query)])

    return embed


def batchnorm_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The affine scale and shift of every BatchNorm layer in `module` (update "batchnorm")."""
    return [parameter for layer in module.modules() if isinstance(layer, nn.modules.batchnorm._BatchNorm)
            for parameter in layer.parameters(recurse=False)]


def set_bn_mode(model: ProtoNet, updated: nn.Module, bn_mode: str) -> None:
    """Everything in eval mode; with bn_mode "train", the BatchNorm layers of the updated part use batch
    statistics. Only those: the frozen part's running statistics must not move either."""
    model.eval()
    if bn_mode == "train":
        for module in updated.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.train()


# ------------------------------------------------------------------------------------------ pseudo-queries


def pseudo_query_views(per_class: int, support_count: int, way: int) -> int:
    """How many augmented copies of the support make at least `per_class` pseudo-queries per class on
    average: ceil(per_class * way / support_count), at least 1 (5-way 1-shot, 8 per class: 8 copies)."""
    return max(1, math.ceil(per_class * way / support_count))


def crop_trunk_maps(support_maps: Tensor, views: int, crop_scale: float, vflip: bool, generator: torch.Generator,
                    hflip: bool = True) -> Tensor:
    """(views * S, C, h, w): `views` copies of the S support maps (float (S, C, h, w)), view-major, each a
    random resized crop of crop_scale-100% of the map's area resized back to its side, flipped as drawn.
    No antialiasing: a crop is never more than 1/crop_scale larger than the output."""
    copies = support_maps.repeat(views, 1, 1, 1)
    return random_resized_crop(copies, support_maps.shape[-1], scale=(crop_scale, 1.0),
                               hflip_p=0.5 if hflip else 0.0, vflip_p=0.5 if vflip else 0.0,
                               antialias=False, generator=generator)


def pseudo_query_set(support_images: Tensor, settings: FinetuneSettings, views: int,
                     generator: torch.Generator) -> Tensor:
    """(views * S, 3, H, W): `views` pseudo-query copies of the S support images, view-major (row v * S + i
    is a copy of support image i), augmented in one batch; one view draws exactly what augment_support draws."""
    return augment_support(support_images.repeat(views, 1, 1, 1), settings, generator)


@torch.no_grad()
def augment_support(support_images: Tensor, settings: FinetuneSettings, generator: torch.Generator) -> Tensor:
    """Pseudo-query images: each support image, with probability augment_p, passes through the named
    augmentations with its own random draws; the others are used as they are."""
    chosen = torch.rand(len(support_images), device=generator.device, generator=generator) < settings.augment_p
    rows = chosen.nonzero().squeeze(1).to(support_images.device)
    pseudo_query = support_images.clone()
    if rows.numel() and settings.augmentations:
        pseudo_query[rows] = apply_augmentations(support_images[rows], settings.augmentations, generator)
    return pseudo_query


def apply_augmentations(images: Tensor, names: tuple[str, ...], generator: torch.Generator) -> Tensor:
    # Colour first: the translation's zero padding then stays black and does not bias the mean luma
    # that contrast pivots on.
    if "brightness_contrast" in names:
        images = brightness_contrast(images, BRIGHTNESS, CONTRAST, p=1.0, generator=generator)
    if "color_jitter" in names:
        images = color_jitter(images, p=1.0, generator=generator)
    if "crop" in names:
        images = random_resized_crop(images, images.shape[-1], scale=CROP_SCALE, hflip_p=0.0, generator=generator)
    if "flip" in names or "rot90" in names:
        flip_p = 0.5 if "flip" in names else 0.0
        images = random_flip_rot90(images, hflip_p=flip_p, vflip_p=flip_p,
                                   rot90_p=1.0 if "rot90" in names else 0.0, generator=generator)
    if "translate" in names:
        images = random_translate(images, TRANSLATE_FRACTION, generator=generator, padding_mode=TRANSLATE_PADDING)
    return images


# ------------------------------------------------------------------------------------------ state


def forget_autocast_casts() -> None:
    """Drop autocast's cached low-precision copies of the weights; call it after changing weights in place.

    Inside one autocast region, torch casts each weight that requires grad to bf16/fp16 once and reuses that
    copy until the outermost region exits. Callers score a whole task (every fine-tuning step, then the
    queries) inside one region, so without this the forward passes kept using the weights from before the
    first step: under bf16 only the BatchNorm affine parameters, which autocast does not cast, were really
    fine-tuned, and bf16 and fp32 evaluations of the same settings disagreed by 25 points (issue 16).
    Outside autocast the cache is empty and this does nothing."""
    torch.clear_autocast_cache()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def restored_afterwards(model: ProtoNet) -> Iterator[None]:
    """Put back all that fine-tuning changes: backbone weights and BatchNorm buffers (bit-exact copies),
    train/eval flags, and each parameter's requires_grad and .grad. Also after an exception, so a failed
    task cannot leak its adapted weights into the next one."""
    saved_state = {name: value.detach().clone() for name, value in model.backbone.state_dict().items()}
    saved_modes = [(module, module.training) for module in model.modules()]
    saved_parameters = [(parameter, parameter.requires_grad, parameter.grad) for parameter in model.parameters()]
    try:
        yield
    finally:
        model.backbone.load_state_dict(saved_state)
        forget_autocast_casts()
        for module, training in saved_modes:
            module.training = training
        for parameter, requires_grad, grad in saved_parameters:
            parameter.requires_grad_(requires_grad)
            parameter.grad = grad
