"""Miners as objects: each mines a core.metric.mining.MiningBatch (`mine(batch) -> mined`, no_grad),
built by the factory its core.metric.registry entry names. A training step mines once and hands
the same mined output to the loss (which triplets or pairs it averages over) and to the triplet
inspector (which of them a person sees); the per-image tally and the epoch's counts read the same
MiningBatch, so the batch's negatives are sorted once for all of them. `miner(dist, labels)` is the
pytorch-metric-learning-style shorthand for direct use: it wraps the matrix in a MiningBatch.

What a miner returns (registry.MinedKind):
- TripletSet (core.metric.mining): every triplet of a category, as ranges of each anchor's sorted
  negatives, never listed (a B×B×B tensor is a defect; DESIGN.md);
- Triplets (core.metric.mining): O(B²) index triplets (batch-hard, FaceNet semi-hard);
- Pairs: boolean (B, B) masks of the similar and dissimilar pairs kept, upper triangle;
- InBatch: every other row of the batch is a candidate (InfoNCE, supervised contrastive).
dist: (B, B) distances as the loss compares them; labels: (B,) long.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from core.metric import registry
from core.metric.mining import MiningBatch, Triplets, TripletSet, batch_hard_triplets, facenet_triplets


@dataclass
class Pairs:
    """Pairs i < j kept by a pair miner: `similar` and `dissimilar` are (B, B) bool, upper triangle."""

    similar: Tensor
    dissimilar: Tensor

    def __len__(self) -> int:
        return int(self.similar.sum() + self.dissimilar.sum())


@dataclass
class InBatch:
    """Every other row of the batch is a candidate; the softmax loss weighs them itself."""

    size: int


class BaseMiner:
    """A miner: `mine(batch)` returns what it picked from a MiningBatch; calling it on
    (dist, labels) mines a MiningBatch of that matrix at the miner's margin."""

    margin: float

    @torch.no_grad()
    def __call__(self, dist: Tensor, labels: Tensor):
        return self.mine(MiningBatch(dist, labels, self.margin))

    def mine(self, batch: MiningBatch):
        raise NotImplementedError


class CategoryMiner(BaseMiner):
    """Every triplet of one kind: "semi-hard", "hard", "easy" or "all" (core.metric.mining.TRIPLET_KINDS)."""

    def __init__(self, kind: str, margin: float, memory_size: float = 0) -> None:
        self.kind, self.margin, self.memory_size = kind, margin, int(memory_size)

    @torch.no_grad()
    def mine(self, batch: MiningBatch) -> TripletSet:
        return batch.triplet_set(self.kind, self.margin)


def semi_hard_triplets(margin: float, memory_size: float = 0) -> CategoryMiner:
    return CategoryMiner("semi-hard", margin, memory_size)


def hard_triplets(margin: float, memory_size: float = 0) -> CategoryMiner:
    return CategoryMiner("hard", margin, memory_size)


def easy_triplets(margin: float, memory_size: float = 0) -> CategoryMiner:
    return CategoryMiner("easy", margin, memory_size)


def all_triplets(margin: float, memory_size: float = 0) -> CategoryMiner:
    return CategoryMiner("all", margin, memory_size)


class BatchHardMiner(BaseMiner):
    """Per anchor, its farthest positive and its closest negative (one triplet per anchor)."""

    def __init__(self, margin: float, memory_size: float = 0) -> None:
        self.margin = margin  # draws the categories shown, not the picks
        self.memory_size = int(memory_size)

    @torch.no_grad()
    def mine(self, batch: MiningBatch) -> Triplets:
        if batch.square:
            return _triplets(batch.dist, *batch_hard_triplets(batch.dist, batch.labels), self.margin)
        # against references: the farthest positive reference, the closest negative one (the
        # first of the anchor's sorted negatives)
        negatives = batch.negatives
        positive = negatives.positive
        farthest_positive = batch.dist.masked_fill(~positive, float("-inf")).argmax(dim=1)
        anchor = torch.nonzero(positive.any(dim=1) & (negatives.count > 0), as_tuple=True)[0]
        return _triplets(batch.dist, anchor, farthest_positive[anchor], negatives.order[anchor, 0], self.margin)


class FaceNetMiner(BaseMiner):
    """Per anchor-positive pair, the closest negative with d(A,P) < d(A,N) <= d(A,P) + m."""

    def __init__(self, margin: float, memory_size: float = 0) -> None:
        self.margin = margin
        self.memory_size = int(memory_size)

    @torch.no_grad()
    def mine(self, batch: MiningBatch) -> Triplets:
        return _triplets(batch.dist, *facenet_triplets(batch, self.margin), self.margin)


class AllPairsMiner(BaseMiner):
    """Every similar and every dissimilar pair i < j. Against references (a cross-batch memory):
    every (query, reference) pair but a query's own copy (pytorch-metric-learning's pairs there)."""

    def __init__(self, margin: float, memory_size: float = 0) -> None:
        self.margin = margin
        self.memory_size = int(memory_size)

    @torch.no_grad()
    def mine(self, batch: MiningBatch) -> Pairs:
        if not batch.square:
            return Pairs(batch.negatives.positive, batch.labels[:, None] != batch.ref_labels[None, :])
        same = batch.labels[:, None] == batch.labels[None, :]
        upper = torch.ones_like(same).triu(diagonal=1)
        return Pairs(same & upper, ~same & upper)


class HardPairsMiner(BaseMiner):
    """Pairs that break the ordering from either end: a similar pair farther than that image's
    closest dissimilar one, a dissimilar pair closer than that image's farthest similar one.
    Against references (a cross-batch memory) from the query's end only: the references have no rows."""

    def __init__(self, margin: float, memory_size: float = 0) -> None:
        self.margin = margin
        self.memory_size = int(memory_size)

    @torch.no_grad()
    def mine(self, batch: MiningBatch) -> Pairs:
        pairs = AllPairsMiner(self.margin).mine(batch)
        if not batch.square:
            positive, negative = pairs.similar, pairs.dissimilar
            closest_negative = batch.dist.masked_fill(~negative, float("inf")).amin(dim=1, keepdim=True)
            farthest_positive = batch.dist.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
            return Pairs(positive & (batch.dist > closest_negative), negative & (batch.dist < farthest_positive))
        dist, labels = batch.dist, batch.labels
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        closest_negative = dist.masked_fill(same, float("inf")).amin(dim=1, keepdim=True)
        farthest_positive = dist.masked_fill(~(same & ~eye), float("-inf")).amax(dim=1, keepdim=True)
        hard_positive = dist > closest_negative  # row i is the point of view of i
        hard_negative = dist < farthest_positive
        return Pairs(pairs.similar & (hard_positive | hard_positive.T),
                     pairs.dissimilar & (hard_negative | hard_negative.T))


class InBatchMiner(BaseMiner):
    """Every other row of the batch is a candidate negative (softmax losses)."""

    def __init__(self, margin: float) -> None:
        self.margin = margin

    @torch.no_grad()
    def mine(self, batch: MiningBatch) -> InBatch:
        return InBatch(len(batch))


def build_miner(name: str, margin: float, **settings):
    """The miner registered as `name`, for `margin` and the values of its own settings (each
    left out takes its default; core.metric.registry)."""
    spec = registry.miner(name)
    values = {s.name: settings.get(s.name, s.default) for s in spec.settings}
    return registry.resolve(spec.factory)(margin, **values)


def _triplets(dist: Tensor, a: Tensor, p: Tensor, n: Tensor, margin: float) -> Triplets:
    """Index triplets with their distances; categories are named only where shown (inspector),
    not on every training step."""
    return Triplets(a, p, n, dist[a, p].detach(), dist[a, n].detach(), [])


__all__ = ["AllPairsMiner", "BatchHardMiner", "CategoryMiner", "FaceNetMiner", "HardPairsMiner", "InBatch",
           "BaseMiner", "InBatchMiner", "MiningBatch", "Pairs", "TripletSet", "Triplets", "build_miner", "mine"]


@torch.no_grad()
def mine(miner, batch: MiningBatch):
    """What `miner` picks from `batch`: its `mine` for a Miner, else the plain callable's
    (dist, labels) -> mined (a registered factory may build either)."""
    found = getattr(miner, "mine", None)
    return found(batch) if found is not None else miner(batch.dist, batch.labels)
