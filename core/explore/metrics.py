"""Retrieval metrics of an embedding: Precision@1, R-Precision, MAP@R, Recall@k.

Every image is a query against the others of the same set (itself left out), as
pytorch-metric-learning's AccuracyCalculator does when query and reference are one set.

MAP@R reads each query's R nearest others, R being its class's size less one: a set of 200,000
test images in ten classes needs 20,000 neighbours per query, 30 GB of ids for all of them at once
(what a million-image run's test split asked for). So queries go in blocks of bounded memory, and
past EXACT_UP_TO images the metrics are the means over a seeded random sample of SAMPLE queries
(each of them still exact, against every image of the set); `sampled_queries` then says how many.
"""
from __future__ import annotations

import numpy as np

from core.explore.search import NeighbourIndex, nonfinite_rows

RECALL_KS = (1, 5, 10)
EXACT_UP_TO = 50_000  # images in the set; more and the metrics come from SAMPLE random queries
SAMPLE = 10_000  # sampled queries: a mean's 95 % interval is then within about ±0.006 for Precision@1
BLOCK_BYTES = 256 * 2**20  # a block of queries' (queries, R) arrays at most


def retrieval_metrics(embeddings: np.ndarray, labels: np.ndarray, sample: int | None = None,
                      seed: int = 0) -> dict[str, float]:
    """embeddings (N, d), labels (N,) int. Queries whose class has no other member are skipped.

    sample: how many queries (seeded by `seed`); None = every query up to EXACT_UP_TO images,
    else SAMPLE. With a sample, the result has `sampled_queries` besides the metrics.
    ValueError when the numbers would mean nothing: fewer than two classes (every neighbour is
    relevant, so every metric is 1), no class with two images, or embeddings with NaN or infinity.
    """
    labels = np.asarray(labels)
    _check_embeddings(embeddings, labels)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if len(counts) < 2:
        raise ValueError(f"metrics need at least two classes in the test set; this one has {len(counts)}")
    r_all = counts[inverse] - 1  # relevant items per query, itself excluded
    usable = np.flatnonzero(r_all > 0)
    if not len(usable):
        raise ValueError("retrieval metrics need at least two images of some class; every class in the test set has one")
    if sample is None and len(labels) > EXACT_UP_TO:
        sample = SAMPLE
    sampled = sample is not None and sample < len(usable)
    queries = np.sort(np.random.default_rng(seed).choice(usable, sample, replace=False)) if sampled else usable
    k = int(min(max(r_all[queries].max(), max(RECALL_KS)), len(labels) - 1))
    embeddings = np.asarray(embeddings)
    index = NeighbourIndex(embeddings, approximate=False)  # metrics are exact, whatever the size
    sums = dict.fromkeys(["precision_at_1", "r_precision", "map_at_r", *(f"recall_at_{kk}" for kk in RECALL_KS)], 0.0)
    rows = max(1, BLOCK_BYTES // (32 * (k + 1)))  # ids, distances, and the few (rows, k) arrays below
    columns = np.arange(1, k + 1)[None, :]
    for start in range(0, len(queries), rows):
        block = queries[start:start + rows]
        _, ids = index.search(embeddings[block], k + 1)
        # drop the query itself wherever faiss put it (ties can move it from column 0)
        is_self = ids == block[:, None]
        keep_first_k = np.where(is_self.any(axis=1, keepdims=True), ~is_self, np.arange(k + 1)[None, :] < k)
        neighbours = ids[keep_first_k].reshape(len(block), k)
        del ids, is_self, keep_first_k
        relevant = labels[neighbours] == labels[block][:, None]  # (b, k)
        r = r_all[block]
        hits_within_r = relevant & (columns <= r[:, None])
        sums["precision_at_1"] += float(relevant[:, 0].sum())
        sums["r_precision"] += float((hits_within_r.sum(axis=1) / r).sum())
        precision_at_i = np.cumsum(relevant, axis=1, dtype=np.int32) / columns
        sums["map_at_r"] += float(((precision_at_i * hits_within_r).sum(axis=1) / r).sum())
        for kk in RECALL_KS:
            sums[f"recall_at_{kk}"] += float(relevant[:, :kk].any(axis=1).sum())
    metrics = {name: total / len(queries) for name, total in sums.items()}
    if sampled:
        metrics["sampled_queries"] = int(len(queries))
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
