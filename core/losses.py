"""Losses of the lab: contrastive (pairwise), triplet and InfoNCE (NT-Xent).

Each is a small `nn.Module` whose forward takes `(embeddings, labels, indices_tuple=None)` as in
pytorch-metric-learning, so a miner's indices can drive any of them. Bad arguments fail in
`__init__`; a batch with nothing to learn from gives a zero loss with a gradient path, never NaN.
Distances are taken on the embeddings as given: the encoder L2-normalises them (DESIGN.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.config import DEFAULT_MINER, LOSSES, MINERS_FOR  # torch-free, so pages can offer the choices
from core.mining import (
    DISTANCES,
    TRIPLET_KINDS,
    pairwise_distances,
    range_triplet_loss,
    squared_euclidean_distances,
)


def _require_positive(name: str, value: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number > 0, got {value!r}") from None
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be > 0, got {value}")
    return number


def _require_choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _require_batch(embeddings: Tensor, labels: Tensor | None) -> None:
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must have shape (batch, dim), got {tuple(embeddings.shape)}")
    if labels is not None and labels.shape != (len(embeddings),):
        raise ValueError(f"labels must have shape ({len(embeddings)},), got {tuple(labels.shape)}")


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of values[mask]; 0 (still differentiable) when the mask is empty."""
    return torch.where(mask, values, 0).sum() / mask.sum().clamp_min(1)


class ContrastiveLoss(nn.Module):
    """Pairwise loss L = (1 - Y) D² + Y max(0, m - D)², Y = 0 similar, Y = 1 dissimilar.

    Every unordered pair i < j of the batch counts once. The result is the mean over positive
    pairs plus the mean over the negative pairs with a non-zero loss (pytorch-metric-learning's
    AvgNonZero for negatives). miner "all" keeps every pair; "hard" keeps the pairs that break
    the ordering from either end: a positive pair farther than that point's closest negative,
    a negative pair closer than that point's farthest positive.

    Shape: embeddings (batch, dim), labels (batch,) long -> scalar.
    """

    def __init__(self, margin: float = 0.5, distance: str = "euclidean", miner: str = "all"):
        super().__init__()
        self.margin = _require_positive("margin", margin)
        self.distance = _require_choice("distance", distance, DISTANCES)
        self.miner = _require_choice("miner", miner, MINERS_FOR["contrastive"])

    def forward(
        self, embeddings: Tensor, labels: Tensor | None, indices_tuple: tuple[Tensor, ...] | None = None
    ) -> Tensor:
        _require_batch(embeddings, labels)
        dist = pairwise_distances(embeddings, self.distance)
        if indices_tuple is not None:
            return self._loss_on_indices(dist, indices_tuple)
        if labels is None:
            raise ValueError("ContrastiveLoss needs labels when no indices_tuple is given")
        positive, negative = self._pair_masks(dist, labels)
        negative_loss = F.relu(self.margin - dist).pow(2)
        return _masked_mean(dist.pow(2), positive) + _masked_mean(
            negative_loss, negative & (negative_loss > 0)
        )

    def _pair_masks(self, dist: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Boolean (B, B) masks of the positive and negative pairs kept, upper triangle only."""
        same = labels[:, None] == labels[None, :]
        upper = torch.ones_like(same).triu(diagonal=1)
        positive, negative = same & upper, ~same & upper
        if self.miner == "hard":
            with torch.no_grad():
                eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
                closest_negative = dist.masked_fill(same, float("inf")).amin(dim=1, keepdim=True)
                other_positive = same & ~eye
                farthest_positive = dist.masked_fill(~other_positive, float("-inf")).amax(dim=1, keepdim=True)
                hard_positive = dist > closest_negative  # row i is the point of view of i
                hard_negative = dist < farthest_positive
                positive &= hard_positive | hard_positive.T
                negative &= hard_negative | hard_negative.T
        return positive, negative

    def _loss_on_indices(self, dist: Tensor, indices_tuple: tuple[Tensor, ...]) -> Tensor:
        # Pairs (a1, p, a2, n) as pytorch-metric-learning's pair miners return, or triplets
        # (a, p, n) split into the pairs (a, p) and (a, n).
        if len(indices_tuple) == 3:
            a, p, n = indices_tuple
            indices_tuple = (a, p, a, n)
        if len(indices_tuple) != 4:
            raise ValueError("indices_tuple must be (a1, p, a2, n) pairs or (a, p, n) triplets")
        a1, p, a2, n = indices_tuple
        positive_loss = dist[a1, p].pow(2)
        negative_loss = F.relu(self.margin - dist[a2, n]).pow(2)
        every_positive = torch.ones_like(positive_loss, dtype=torch.bool)
        return _masked_mean(positive_loss, every_positive) + _masked_mean(negative_loss, negative_loss > 0)


class TripletLoss(nn.Module):
    """Triplet loss max(0, d(A,P) - d(A,N) + m), averaged over the non-zero triplets.

    Without indices the whole set chosen by `miner` ("semihard", "hard" or "all") is used,
    computed from the B×B distance matrix without listing its B³ triplets; with
    indices_tuple=(a, p, n) those triplets are used. squared=True uses squared euclidean
    distances. Shape: embeddings (batch, dim), labels (batch,) long -> scalar.
    """

    def __init__(
        self,
        margin: float = 0.2,
        distance: str = "euclidean",
        miner: str = "semihard",
        squared: bool = False,
    ):
        super().__init__()
        self.margin = _require_positive("margin", margin)
        self.distance = _require_choice("distance", distance, DISTANCES)
        self.miner = _require_choice("miner", miner, MINERS_FOR["triplet"])
        if squared and distance != "euclidean":
            raise ValueError(f"squared=True needs the euclidean distance, got {distance!r}")
        self.squared = squared

    def distances(self, embeddings: Tensor) -> Tensor:
        """The (B, B) distance matrix this loss compares."""
        if self.squared:
            return squared_euclidean_distances(embeddings)
        return pairwise_distances(embeddings, self.distance)

    def forward(
        self, embeddings: Tensor, labels: Tensor | None, indices_tuple: tuple[Tensor, ...] | None = None
    ) -> Tensor:
        _require_batch(embeddings, labels)
        dist = self.distances(embeddings)
        if indices_tuple is None:
            if labels is None:
                raise ValueError("TripletLoss needs labels when no indices_tuple is given")
            loss, _ = range_triplet_loss(dist, labels, self.margin, self.miner)
            return loss
        if len(indices_tuple) != 3:
            raise ValueError("indices_tuple must be (anchor, positive, negative) triplets")
        a, p, n = indices_tuple
        losses = F.relu(dist[a, p] - dist[a, n] + self.margin)
        return _masked_mean(losses, losses > 0)


class InfoNCELoss(nn.Module):
    """NT-Xent (SimCLR): -log softmax of the other view's cosine similarity over the batch.

    embeddings (2N, dim): rows i and i + N are two views of one image; every other row is a
    negative. Labels and indices_tuple are ignored. temperature > 0, typically 0.05 to 0.5.
    Shape: (2N, dim) -> scalar.
    """

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.temperature = _require_positive("temperature", temperature)

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor | None = None,
        indices_tuple: tuple[Tensor, ...] | None = None,
    ) -> Tensor:
        _require_batch(embeddings, None)
        batch = len(embeddings)
        if batch == 0 or batch % 2:
            raise ValueError(f"InfoNCELoss needs an even batch of two views per image, got {batch} rows")
        unit = F.normalize(embeddings, dim=1)
        logits = unit @ unit.T / self.temperature
        eye = torch.eye(batch, dtype=torch.bool, device=embeddings.device)
        logits = logits.masked_fill(eye, float("-inf"))  # a view is not its own negative
        other_view = (torch.arange(batch, device=embeddings.device) + batch // 2) % batch
        return F.cross_entropy(logits, other_view)


def make_loss(loss: str, miner: str, margin: float, temperature: float, distance: str) -> nn.Module:
    """Build the loss a run asks for. margin is used by contrastive and triplet, temperature by
    infonce; distance by contrastive and triplet (InfoNCE is always cosine)."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of: {', '.join(LOSSES)}")
    if miner not in MINERS_FOR[loss]:
        raise ValueError(
            f"miner {miner!r} does not apply to the {loss} loss; "
            f"choose one of: {', '.join(MINERS_FOR[loss])}"
        )
    if loss == "contrastive":
        return ContrastiveLoss(margin=margin, distance=distance, miner=miner)
    if loss == "triplet":
        return TripletLoss(margin=margin, distance=distance, miner=miner)
    return InfoNCELoss(temperature=temperature)
