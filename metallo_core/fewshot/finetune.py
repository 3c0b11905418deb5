"""Meta-test fine-tuning of a ProtoNet on one task's support set (seed 000 §2.3, P>M>F ProtoNet_Finetune),
its support-only learning-rate search (P>M>F Auto_Finetune), and the choice between modes by name.

Images enter as float (B, 3, H, W) in [0, 1] with an ImageNormalizer: the pseudo-query augmentations
(colour ops clamp to [0, 1]) act on those, and everything is normalised just before the backbone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, get_args

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
from metallo_core.fewshot.metrics import accuracy
from metallo_core.fewshot.protonet import ImageNormalizer, ProtoNet
from metallo_core.models.stages import LastStage, last_block, last_stage

PARTIAL_UPDATES = {"last_stage": last_stage, "last_block": last_block}
FINETUNE_UPDATES = ("all", *PARTIAL_UPDATES, "batchnorm")  # FinetuneSettings.update spells them out for its docs

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


@dataclass
class FinetuneSettings:
    steps: int = 50
    lr: float = 1e-4
    lr_candidates: tuple[float, ...] = (0.0, 1e-4, 5e-4, 1e-3)  # searched by finetune_autolr
    # Measured on meta-val tasks of the synthetic benchmark (data/fewshot-tiny, 5-way): crop + flip makes
    # pseudo-queries the model still mostly classifies right (86% / 97% vs 51% for zero-padded translation
    # and 61% for DiffAugment-strength brightness/contrast) and lifted 5-shot accuracy from 66.1% to 69.9%.
    # rot90 is a true symmetry only where the classes have no orientation.
    augmentations: tuple[str, ...] = ("crop", "flip")
    augment_p: float = 0.9  # per support image: the chance its pseudo-query copy is augmented at all
    # Pseudo-query images per class and step, at least one augmented copy of each support image: the support
    # is copied ceil(this * way / support images) times, each copy with its own draws (pseudo_query_views).
    # More of them give a less noisy gradient per step (measured: tail_finetune.TailFinetuneSettings).
    pseudo_queries_per_class: int = 1
    # P>M>F fine-tunes in eval mode without saying so; here it is a choice. "train" lets the updated
    # BatchNorm layers use batch statistics while adapting (their running statistics then move to the
    # support set and are used to classify the queries); "eval" keeps the meta-trained statistics.
    bn_mode: Literal["train", "eval"] = "eval"
    # last_stage / last_block: see models.stages (a ResNet's layer4 / its last residual block, ...).
    # batchnorm: only the scale and shift of every BatchNorm layer (0.1% of a ResNet-18's weights): the
    # features are re-weighted for the task, not re-learnt. On the tiny synthetic set of
    # tests/train/test_fewshot_ray.py (15 steps, lr 5e-3, bn_mode train) it gained +11.0 +- 2.9 points over
    # ProtoNet on the test classes but -3.9 +- 2.2 on the val classes, where whole-backbone updates lost at
    # every lr: like every setting here, choose it on meta-validation tasks (select_on_val, a Tune search).
    update: Literal["all", "last_stage", "last_block", "batchnorm"] = "all"
    autolr_steps: int = 20  # fine-tuning steps per lr candidate in finetune_autolr

    def validate(self) -> None:
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


# ------------------------------------------------------------------------------------------ the modes


def classify_task(
    model: ProtoNet,
    mode: MetaTestMode,
    support_images: Tensor,
    support_labels: Tensor,
    query_images: Tensor,
    way: int,
    settings: FinetuneSettings,
    *,
    normalizer: ImageNormalizer,
    generator: torch.Generator,
    lr: float | None = None,
) -> Tensor:
    """Query logits of one task under the named meta-test mode; `lr` overrides settings.lr in "finetune"."""
    if mode not in META_TEST_MODES:
        raise ConfigError(f"meta-test mode must be one of {list(META_TEST_MODES)}, got {mode!r}")
    if lr is not None and mode != "finetune":
        raise ValueError(f"an lr applies to mode 'finetune' only; mode {mode!r} "
                         f"{'chooses its own' if mode == 'finetune_autolr' else 'has none'}")
    if mode == "protonet":
        return protonet_task(model, support_images, support_labels, query_images, way, normalizer=normalizer)
    if mode == "finetune":
        return finetune_task(model, support_images, support_labels, query_images, way, settings,
                             normalizer=normalizer, generator=generator, lr=lr)
    return finetune_autolr_task(model, support_images, support_labels, query_images, way, settings,
                                normalizer=normalizer, generator=generator)


def protonet_task(
    model: ProtoNet, support_images: Tensor, support_labels: Tensor, query_images: Tensor, way: int,
    *, normalizer: ImageNormalizer,
) -> Tensor:
    """Plain ProtoNet: eval mode, no gradients. Every fine-tuning mode ends with this call."""
    with eval_mode(model), torch.no_grad():
        return model(normalizer.normalize(support_images), support_labels, normalizer.normalize(query_images), way)


def finetune_task(
    model: ProtoNet,
    support_images: Tensor,
    support_labels: Tensor,
    query_images: Tensor,
    way: int,
    settings: FinetuneSettings,
    *,
    normalizer: ImageNormalizer,
    generator: torch.Generator,
    lr: float | None = None,
) -> Tensor:
    """Adapt the backbone to the support set, classify the queries, then restore the backbone exactly.
    With steps == 0 or lr == 0 nothing is adapted, so the logits equal plain ProtoNet's bit for bit."""
    settings.validate()
    lr = settings.lr if lr is None else lr
    with restored_afterwards(model):
        if settings.steps > 0 and lr > 0:
            adapt_to_support(model, support_images, support_labels, way, settings,
                             normalizer=normalizer, generator=generator, lr=lr)
        return protonet_task(model, support_images, support_labels, query_images, way, normalizer=normalizer)


def finetune_autolr_task(
    model: ProtoNet,
    support_images: Tensor,
    support_labels: Tensor,
    query_images: Tensor,
    way: int,
    settings: FinetuneSettings,
    *,
    normalizer: ImageNormalizer,
    generator: torch.Generator,
) -> Tensor:
    lr = auto_lr(model, support_images, support_labels, way, settings, normalizer=normalizer, generator=generator)
    return finetune_task(model, support_images, support_labels, query_images, way, settings,
                         normalizer=normalizer, generator=generator, lr=lr)


def auto_lr(
    model: ProtoNet,
    support_images: Tensor,
    support_labels: Tensor,
    way: int,
    settings: FinetuneSettings,
    *,
    normalizer: ImageNormalizer,
    generator: torch.Generator,
) -> float:
    """P>M>F's Auto_Finetune choice, made from the support set alone (no query labels, no test episodes)."""
    return best_lr(autolr_accuracies(model, support_images, support_labels, way, settings,
                                     normalizer=normalizer, generator=generator))


def autolr_accuracies(
    model: ProtoNet,
    support_images: Tensor,
    support_labels: Tensor,
    way: int,
    settings: FinetuneSettings,
    *,
    normalizer: ImageNormalizer,
    generator: torch.Generator,
) -> dict[float, float]:
    """{lr: accuracy on held-out support images} for each candidate: the first shot of each class is the
    support, the other shots are labelled queries, fine-tuned for autolr_steps (weights restored after each)."""
    prototype_rows, validation_rows = split_support_for_autolr(support_labels, way)
    search = dataclasses.replace(settings, steps=settings.autolr_steps)
    start = generator.get_state()
    accuracies = {}
    for lr in sorted(settings.lr_candidates):
        generator.set_state(start)  # same augmentation draws for every candidate: only the lr differs
        logits = finetune_task(model, support_images[prototype_rows], support_labels[prototype_rows],
                               support_images[validation_rows], way, search,
                               normalizer=normalizer, generator=generator, lr=lr)
        accuracies[lr] = accuracy(logits, support_labels[validation_rows])
    return accuracies


def best_lr(accuracies: dict[float, float]) -> float:
    """The most accurate lr; ties go to the smaller, the more conservative change to the backbone."""
    return min(accuracies, key=lambda lr: (-accuracies[lr], lr))


def split_support_for_autolr(support_labels: Tensor, way: int) -> tuple[Tensor, Tensor]:
    """(prototype rows, validation rows): the first shot of each class, and all the others."""
    first_rows, other_rows = [], []
    for label in range(way):
        rows = (support_labels == label).nonzero().squeeze(1)
        if len(rows) < 2:
            raise ConfigError(
                f"finetune_autolr needs at least 2 shots per class (one becomes the prototype, the others "
                f"validate each lr); class {label} of this task has {len(rows)}: use mode 'finetune' with an lr "
                "chosen on meta-validation tasks"
            )
        first_rows.append(rows[:1])
        other_rows.append(rows[1:])
    return torch.cat(first_rows), torch.cat(other_rows)


# ------------------------------------------------------------------------------------------ adaptation


def adapt_to_support(
    model: ProtoNet,
    support_images: Tensor,
    support_labels: Tensor,
    way: int,
    settings: FinetuneSettings,
    *,
    normalizer: ImageNormalizer,
    generator: torch.Generator,
    lr: float,
    on_step: Callable[[int, float], None] | None = None,
) -> None:
    """`settings.steps` Adam steps on the updated backbone part (the cosine scale stays as meta-trained, as in
    P>M>F): augmented support copies are the queries of the un-augmented support's prototypes, which are
    recomputed with the current backbone every step so gradients flow through them as well."""
    stage = PARTIAL_UPDATES[settings.update](model.backbone) if settings.update in PARTIAL_UPDATES else None
    updated = stage.modules if stage is not None else model.backbone
    parameters = batchnorm_parameters(updated) if settings.update == "batchnorm" else list(updated.parameters())
    for parameter in model.parameters():  # restored_afterwards puts the flags back
        parameter.requires_grad_(False)
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(parameters, lr=lr, weight_decay=0.0)
    set_bn_mode(model, updated, settings.bn_mode)
    support = normalizer.normalize(support_images)
    views = pseudo_query_views(settings.pseudo_queries_per_class, len(support_labels), way)
    pseudo_query_labels = support_labels.repeat(views)  # view-major, as pseudo_query_set stacks them
    embed = frozen_trunk_embedder(stage, support) if uses_frozen_trunk(stage) else None
    with torch.enable_grad():  # callers often score tasks under no_grad
        for step in range(settings.steps):
            pseudo_query = normalizer.normalize(pseudo_query_set(support_images, settings, views, generator))
            if embed is None:
                logits = model(support, support_labels, pseudo_query, way)
            else:
                support_features, query_features = embed(pseudo_query)
                logits = model.logits_from_features(support_features, support_labels, query_features, way)
            loss = F.cross_entropy(logits.float(), pseudo_query_labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            forget_autocast_casts()
            if on_step is not None:
                on_step(step, float(loss.detach()))


def uses_frozen_trunk(stage: LastStage | None) -> bool:
    """update "last_stage" / "last_block" on a network that splits cleanly before that part (models.stages): the
    frozen trunk then runs once per task, without autograd."""
    return stage is not None and stage.trunk is not None and stage.tail is not None


def frozen_trunk_embedder(stage: LastStage, support: Tensor) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """For update "last_stage" (or "last_block"): everything before that part is frozen (weights and BatchNorm
    statistics), so the support's trunk features are computed once per task and the pseudo-queries'
    without autograd; only the last stage runs with gradients. Same result as the full forward, at
    about a sixth of the cost per step for a ResNet. Support and pseudo-queries still share one pass
    through the last stage, so with bn_mode "train" its BatchNorm sees the same batch as in the full forward."""

    def trunk(images: Tensor) -> Tensor:
        with torch.no_grad():
            return stage.trunk(images)

    support_trunk = trunk(support)

    def embed(pseudo_query: Tensor) -> tuple[Tensor, Tensor]:
        features = stage.tail(torch.cat([support_trunk, trunk(pseudo_query)]))
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


def pseudo_query_views(per_class: int, support_count: int, way: int) -> int:
    """How many augmented copies of the support make at least `per_class` pseudo-queries per class on
    average: ceil(per_class * way / support_count), at least 1 (5-way 1-shot, 8 per class: 8 copies)."""
    return max(1, math.ceil(per_class * way / support_count))


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
