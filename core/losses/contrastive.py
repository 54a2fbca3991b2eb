"""Contrastive (pairwise) loss, DESIGN.md: L = (1 - Y) D² + Y max(0, m - D)², Y = 0 similar."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.config import MINERS_FOR
from core.losses.base import as_pairs, masked_mean, require_batch, require_choice, require_positive
from core.mining import DISTANCES, pairwise_distances


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
        self.margin = require_positive("margin", margin)
        self.distance = require_choice("distance", distance, DISTANCES)
        self.miner = require_choice("miner", miner, MINERS_FOR["contrastive"])

    def forward(
        self, embeddings: Tensor, labels: Tensor | None, indices_tuple: tuple[Tensor, ...] | None = None
    ) -> Tensor:
        require_batch(embeddings, labels)
        dist = pairwise_distances(embeddings, self.distance)
        if indices_tuple is not None:
            return self._loss_on_indices(dist, indices_tuple)
        if labels is None:
            raise ValueError("ContrastiveLoss needs labels when no indices_tuple is given")
        positive, negative = self._pair_masks(dist, labels)
        negative_loss = F.relu(self.margin - dist).pow(2)
        return masked_mean(dist.pow(2), positive) + masked_mean(
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
        a1, p, a2, n = as_pairs(indices_tuple)
        positive_loss = dist[a1, p].pow(2)
        negative_loss = F.relu(self.margin - dist[a2, n]).pow(2)
        every_positive = torch.ones_like(positive_loss, dtype=torch.bool)
        return masked_mean(positive_loss, every_positive) + masked_mean(negative_loss, negative_loss > 0)
