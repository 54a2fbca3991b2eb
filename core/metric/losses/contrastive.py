"""Contrastive (pairwise) loss, DESIGN.md: L = (1 - Y) D² + Y max(0, m - D)², Y = 0 similar."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.metric import inspector
from core.metric.losses.base import InspectsWithItsMiner, as_pairs, check_miner, masked_mean, require_batch, require_choice, require_positive
from core.metric.categories import PairKind
from core.metric.distances import DISTANCES, cross_distances, pairwise_distances
from core.metric.miners import Pairs, mine
from core.metric.mining import MiningBatch


def build(settings: dict, miner) -> "ContrastiveLoss":
    """The registry's factory (core.metric.builtins names it)."""
    return ContrastiveLoss(margin=settings["margin"], distance=settings["distance"], miner=miner)


class ContrastiveLoss(InspectsWithItsMiner, nn.Module):
    """Pairwise loss L = (1 - Y) D² + Y max(0, m - D)², Y = 0 similar, Y = 1 dissimilar.

    Every unordered pair i < j the miner keeps counts once. The result is the mean over the
    similar pairs plus the mean over the dissimilar pairs with a non-zero loss
    (pytorch-metric-learning's AvgNonZero for negatives). miner "all-pairs" keeps every pair;
    "hard-pairs" keeps the pairs that break the ordering from either end (core.metric.miners).

    Shape: embeddings (batch, dim), labels (batch,) long -> scalar.
    """

    def __init__(self, margin: float = 0.5, distance: str = "euclidean", miner="all-pairs"):
        super().__init__()
        self.margin = require_positive("margin", margin)
        self.distance = require_choice("distance", distance, DISTANCES)
        self.miner = check_miner("contrastive", miner, self.margin)

    def distances(self, embeddings: Tensor) -> Tensor:
        return pairwise_distances(embeddings, self.distance)

    def cross_distances(self, queries: Tensor, references: Tensor) -> Tensor:
        """`distances` from a batch's rows to references (a cross-batch memory): (B, R)."""
        return cross_distances(queries, references, self.distance)

    def per_pair(self, distance: Tensor, similar: Tensor) -> Tensor:
        """Each pair's term: D² when similar, max(0, m − D)² when not."""
        return torch.where(similar, distance.pow(2), F.relu(self.margin - distance).pow(2))

    def forward(
        self, embeddings: Tensor, labels: Tensor | None, indices_tuple: tuple[Tensor, ...] | None = None
    ) -> Tensor:
        require_batch(embeddings, labels)
        dist = self.distances(embeddings)
        if indices_tuple is not None:
            return self._loss_on_indices(dist, indices_tuple)
        if labels is None:
            raise ValueError("ContrastiveLoss needs labels when no indices_tuple is given")
        return self.loss_on(dist, labels, mine(self.miner, MiningBatch(dist, labels, self.margin)))

    def loss_on(self, dist: Tensor, labels: Tensor | None, pairs: Pairs) -> Tensor:
        """The loss over a pair miner's pairs; dist (B, B) differentiable."""
        negative_loss = F.relu(self.margin - dist).pow(2)
        return masked_mean(dist.pow(2), pairs.similar) + masked_mean(
            negative_loss, pairs.dissimilar & (negative_loss > 0)
        )

    @torch.no_grad()
    def inspect_mined(self, batch: MiningBatch, pairs: Pairs, per_category: int = inspector.ROWS_PER_CATEGORY,
                      generator: torch.Generator | None = None) -> list[dict]:
        """Up to `per_category` similar and dissimilar pairs from those this loss averaged over
        on this batch (the miner's pairs; dissimilar ones with a non-zero term), with their term."""
        dist = batch.dist
        i, j = torch.nonzero(pairs.similar | pairs.dissimilar, as_tuple=True)
        similar = pairs.similar[i, j]
        terms = self.per_pair(dist[i, j], similar)
        pick = inspector.stratified((~similar).long(), similar | (terms > 0), per_category, generator).to(dist.device)
        i, j, similar, terms = i[pick], j[pick], similar[pick], terms[pick]
        kinds = [(PairKind.SIMILAR if s else PairKind.DISSIMILAR).value for s in similar.tolist()]
        rows = inspector.rows(i, j, j, dist[i, j], dist[i, j], kinds, terms)
        for row in rows:  # a pair has one other member: the positive or the negative
            row["negative" if row["category"] == PairKind.SIMILAR.value else "positive"] = None
            row["d_an" if row["category"] == PairKind.SIMILAR.value else "d_ap"] = None
        return rows

    def _loss_on_indices(self, dist: Tensor, indices_tuple: tuple[Tensor, ...]) -> Tensor:
        a1, p, a2, n = as_pairs(indices_tuple)
        positive_loss = dist[a1, p].pow(2)
        negative_loss = F.relu(self.margin - dist[a2, n]).pow(2)
        every_positive = torch.ones_like(positive_loss, dtype=torch.bool)
        return masked_mean(positive_loss, every_positive) + masked_mean(negative_loss, negative_loss > 0)
