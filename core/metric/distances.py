"""The distances a run can compare embeddings with: the (B, d) -> (B, B) functions and their
(B, d), (R, d) -> (B, R) counterparts from a batch's rows to references (a cross-batch memory).
Their names (DISTANCES, what RunConfig and the losses accept) are defined once, torch-free, in
core.metric.builtins."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from core.metric.builtins import DISTANCES  # noqa: F401  (read from here by the losses)

# Squared distances below this are treated as exactly 0: sqrt has an infinite slope at 0.
_SQUARED_EPS = 1e-12


def squared_euclidean_distances(embeddings: Tensor) -> Tensor:
    """Squared euclidean distances from the Gram matrix. Shape: (B, d) -> (B, B), >= 0."""
    gram = embeddings @ embeddings.T
    norms = gram.diagonal()
    squared = (norms[:, None] + norms[None, :] - 2 * gram).clamp_min(0)
    # The Gram form leaves rounding noise on the diagonal; a point is at distance 0 from itself.
    eye = torch.eye(len(embeddings), dtype=torch.bool, device=embeddings.device)
    return squared.masked_fill(eye, 0)


def pairwise_distances(embeddings: Tensor, distance: str = "euclidean") -> Tensor:
    """All pairwise distances. Shape: (B, d) -> (B, B); diagonal 0.

    "euclidean" lies in [0, inf) (in [0, 2] for L2-normalised rows); "cosine" is
    1 - cosine similarity, in [0, 2]. Gradients are finite even between identical rows.
    """
    if distance == "euclidean":
        squared = squared_euclidean_distances(embeddings)
        # where() routes no gradient through the clamped sqrt of (near) coincident points.
        root = squared.clamp_min(_SQUARED_EPS).sqrt()
        return torch.where(squared > _SQUARED_EPS, root, torch.zeros_like(root))
    if distance == "cosine":
        unit = F.normalize(embeddings, dim=1)
        dist = (1 - unit @ unit.T).clamp(0, 2)
        eye = torch.eye(len(embeddings), dtype=torch.bool, device=embeddings.device)
        return dist.masked_fill(eye, 0)
    raise ValueError(f"distance must be one of {', '.join(DISTANCES)}; got {distance!r}")


def squared_cross_distances(queries: Tensor, references: Tensor) -> Tensor:
    """Squared euclidean distances from each query to each reference. (B, d), (R, d) -> (B, R), >= 0."""
    squared = queries.pow(2).sum(1)[:, None] + references.pow(2).sum(1)[None, :] - 2 * queries @ references.T
    return squared.clamp_min(0)


def cross_distances(queries: Tensor, references: Tensor, distance: str = "euclidean") -> Tensor:
    """pairwise_distances from queries to references: (B, d), (R, d) -> (B, R), as defined there."""
    if distance == "euclidean":
        squared = squared_cross_distances(queries, references)
        root = squared.clamp_min(_SQUARED_EPS).sqrt()
        return torch.where(squared > _SQUARED_EPS, root, torch.zeros_like(root))
    if distance == "cosine":
        return (1 - F.normalize(queries, dim=1) @ F.normalize(references, dim=1).T).clamp(0, 2)
    raise ValueError(f"distance must be one of {', '.join(DISTANCES)}; got {distance!r}")
