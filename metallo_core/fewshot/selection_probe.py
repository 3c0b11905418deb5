"""Scoring a backbone on fixed, labelled selection tasks: per-task cosine ProtoNet accuracies (what the stage
gate decides on) and a weighted k-NN accuracy on the same images (reported beside it, never decisive).

Every backbone probed on one `SelectionTasks` is scored on the same tasks (drawn once, from the seed), so
their per-task accuracies pair."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from metallo_core.data.class_index import ClassIndexedImages
from metallo_core.fewshot.episodes import Episode, fixed_episodes
from metallo_core.fewshot.evaluation import embed_images, protonet_accuracies
from metallo_core.fewshot.protonet import ImageNormalizer, ProtoNet
from metallo_core.models.backbones import BackboneSpec
from metallo_core.ssl.knn import knn_accuracy, split_bank_and_queries

KNN_K, KNN_TEMPERATURE, KNN_QUERY_FRACTION = 20, 0.07, 0.5  # DINO's k-NN probe


@dataclass
class ProbeScore:
    """A backbone's per-task ProtoNet accuracies on the selection tasks, and its k-NN accuracy."""

    task_accuracies: list[float]
    knn_accuracy: float


@dataclass
class SelectionTasks:
    """`tasks` fixed `way`-way `shot`-shot tasks drawn once from split `split` of the labelled dataset `uri`.

    Images are decoded at each probed backbone's own input size (and kept per size); the tasks name rows,
    which do not depend on the size."""

    uri: str
    split: str
    way: int
    shot: int
    query: int
    tasks: int
    seed: int
    _images: dict[int, ClassIndexedImages] = field(default_factory=dict, repr=False)
    _episodes: list[Episode] | None = field(default=None, repr=False)

    def images(self, image_size: int) -> ClassIndexedImages:
        if image_size not in self._images:
            self._images[image_size] = ClassIndexedImages.load(self.uri, self.split, image_size=image_size)
        return self._images[image_size]

    def episodes(self, images: ClassIndexedImages) -> list[Episode]:
        if self._episodes is None:
            self._episodes = fixed_episodes(images.indices_by_class, self.way, self.shot, self.query, self.tasks,
                                            seed=self.seed, class_names=images.class_names)
        return self._episodes

    def score(self, backbone: nn.Module, spec: BackboneSpec, device: torch.device | str = "cpu") -> ProbeScore:
        """`backbone` (in eval mode; its mode is restored afterwards) on every task: a cosine ProtoNet over its
        features, and the k-NN probe on a fixed per-class half of the split."""
        device = torch.device(device)
        images = self.images(spec.image_size)
        episodes = self.episodes(images)
        was_training = backbone.training
        model = ProtoNet(backbone.to(device), distance="cosine")
        try:
            features = embed_images(model, images.images, ImageNormalizer.for_backbone(spec, device), device,
                                    precision="fp32")
        finally:
            backbone.train(was_training)
        features = features.flatten(1)
        accuracies = protonet_accuracies(model, features, episodes)
        labels = torch.from_numpy(images.labels).to(features.device)
        bank, queries = split_bank_and_queries(labels.cpu(), KNN_QUERY_FRACTION, seed=self.seed)
        knn = knn_accuracy(features[bank], labels[bank], features[queries], labels[queries], images.num_classes,
                           k=KNN_K, temperature=KNN_TEMPERATURE)
        return ProbeScore(task_accuracies=accuracies, knn_accuracy=knn)
