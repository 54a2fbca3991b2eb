"""Retrieval metrics of an embedding: Precision@1, R-Precision, MAP@R, Recall@k.

Every image is a query against the others of the same set (itself left out), as
pytorch-metric-learning's AccuracyCalculator does when query and reference are one set.
"""
from __future__ import annotations

import numpy as np

from core.explore.search import NeighbourIndex, nonfinite_rows

RECALL_KS = (1, 5, 10)


def retrieval_metrics(embeddings: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """embeddings (N, d), labels (N,) int. Queries whose class has no other member are skipped.

    ValueError when the numbers would mean nothing: fewer than two classes (every neighbour is
    relevant, so every metric is 1), no class with two images, or embeddings with NaN or infinity.
    """
    labels = np.asarray(labels)
    _check_embeddings(embeddings, labels)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if len(counts) < 2:
        raise ValueError(f"metrics need at least two classes in the test set; this one has {len(counts)}")
    r = counts[inverse] - 1  # relevant items per query, itself excluded
    usable = r > 0
    if not usable.any():
        raise ValueError("retrieval metrics need at least two images of some class; every class in the test set has one")
    k = int(min(max(r.max(), max(RECALL_KS)), len(labels) - 1))
    index = NeighbourIndex(embeddings, approximate=False)  # metrics are exact, whatever the size
    _, ids = index.search(embeddings, k + 1)
    # drop the query itself wherever faiss put it (ties can move it from column 0)
    is_self = ids == np.arange(len(labels))[:, None]
    keep_first_k = np.where(is_self.any(axis=1, keepdims=True), ~is_self, np.arange(k + 1)[None, :] < k)
    neighbours = ids[keep_first_k].reshape(len(labels), k)
    relevant = labels[neighbours] == labels[:, None]  # (N, k)
    relevant, r = relevant[usable], r[usable]

    columns = np.arange(1, k + 1)[None, :]
    within_r = columns <= r[:, None]
    hits_within_r = relevant & within_r
    precision_at_i = np.cumsum(relevant, axis=1) / columns
    metrics = {
        "precision_at_1": float(relevant[:, 0].mean()),
        "r_precision": float((hits_within_r.sum(axis=1) / r).mean()),
        "map_at_r": float(((precision_at_i * hits_within_r).sum(axis=1) / r).mean()),
    }
    for kk in RECALL_KS:
        metrics[f"recall_at_{kk}"] = float(relevant[:, :kk].any(axis=1).mean())
    return metrics


def knn_accuracy(embeddings: np.ndarray, labels: np.ndarray, k: int = 10) -> float:
    """Leave-one-out majority vote of the k nearest neighbours (k shrinks to N − 1 on small sets)."""
    labels = np.asarray(labels)
    _check_embeddings(embeddings, labels)
    if len(labels) < 2:
        raise ValueError(f"kNN accuracy needs at least two images; this set has {len(labels)}")
    index = NeighbourIndex(embeddings, approximate=False)  # metrics are exact, whatever the size
    _, ids = index.search(embeddings, min(k + 1, index.size))
    votes = labels[ids[:, 1:]]
    predicted = np.array([np.bincount(row).argmax() for row in votes])
    return float((predicted == labels).mean())


def _check_embeddings(embeddings: np.ndarray, labels: np.ndarray) -> None:
    if len(embeddings) != len(labels):
        raise ValueError(f"{len(embeddings)} embeddings but {len(labels)} labels; they must be one per image")
    bad = nonfinite_rows(embeddings)
    if bad:
        raise ValueError(f"embeddings of {bad} of {len(embeddings)} images are NaN or infinite")
