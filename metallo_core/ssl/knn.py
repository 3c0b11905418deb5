"""Weighted k-NN probe on frozen features (DINO's health metric: k=20, T=0.07, votes weighted by exp(sim/T))."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(
    bank_features: torch.Tensor,
    bank_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    *,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 512,
) -> torch.Tensor:
    """Predicted class per query: cosine neighbours in the bank, each vote weighted by exp(similarity / T)."""
    bank = F.normalize(bank_features.float(), dim=1)
    queries = F.normalize(query_features.float(), dim=1)
    k = min(k, bank.shape[0])
    predictions = []
    for start in range(0, queries.shape[0], chunk_size):
        similarity = queries[start:start + chunk_size] @ bank.T
        top_similarity, top_index = similarity.topk(k, dim=1)
        weights = (top_similarity / temperature).exp()
        votes = torch.zeros(similarity.shape[0], num_classes, device=similarity.device)
        votes.scatter_add_(1, bank_labels[top_index], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_accuracy(bank_features, bank_labels, query_features, query_labels, num_classes, *, k=20,
                 temperature=0.07) -> float:
    predicted = knn_predict(bank_features, bank_labels, query_features, num_classes, k=k, temperature=temperature)
    return float((predicted == query_labels).float().mean())


def split_bank_and_queries(labels: torch.Tensor, query_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class split of indices into a bank and queries (each class keeps at least one bank image)."""
    generator = torch.Generator().manual_seed(seed)
    bank, queries = [], []
    for class_id in labels.unique():
        members = (labels == class_id).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        query_count = min(int(round(len(members) * query_fraction)), len(members) - 1)
        queries.append(members[:query_count])
        bank.append(members[query_count:])
    return torch.cat(bank), torch.cat(queries)
