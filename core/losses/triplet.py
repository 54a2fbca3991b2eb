"""Triplet loss, DESIGN.md: L = max(0, d(A,P) - d(A,N) + m), with its squared-distance and
soft-margin variants, over a whole triplet category or over a selection miner's triplets."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.config import MINERS_FOR, TRIPLET_VARIANTS
from core.losses.base import masked_mean, require_batch, require_choice, require_positive
from core.mining import (
    DISTANCES,
    TRIPLET_KINDS,
    batch_hard_triplets,
    pairwise_distances,
    range_triplet_loss,
    semi_hard_facenet_triplets,
    squared_euclidean_distances,
)

SELECTION_MINERS = ("batch-hard", "facenet")  # return O(B) or O(B²) index triplets

# Elements of one (anchors, positives, negatives) block of the soft-margin loss: 4M floats, so a
# block stays in the tens of MB whatever the batch; B³ work is done in B² · chunk pieces.
SOFT_MARGIN_CHUNK_ELEMENTS = 1 << 22


class TripletLoss(nn.Module):
    """Triplet loss averaged over the triplets with a non-zero loss (pytorch-metric-learning's
    AvgNonZeroReducer).

    variant: "standard" max(0, d_ap - d_an + m); "squared" the same on squared euclidean
    distances; "soft-margin" log(1 + exp(d_ap - d_an)), no margin (Hermans et al. 2017).
    miner: "semihard", "hard", "all", "easy" use every triplet of that category, computed from
    the B×B distance matrix without listing its B³ triplets ("easy" triplets all have a zero
    loss); "batch-hard" and "facenet" select triplets (mining.py) and average over those.
    With indices_tuple=(a, p, n) those triplets are used instead of the miner.
    The soft-margin loss has no margin: there `margin` only draws the categories the miner picks
    from (semi-hard, easy, FaceNet's window), and a whole category costs B³ time (in anchor
    blocks, O(B² · chunk) memory; see soft_margin_triplet_loss) since softplus has no prefix sum.
    Shape: embeddings (batch, dim), labels (batch,) long -> scalar.
    """

    def __init__(
        self,
        margin: float = 0.2,
        distance: str = "euclidean",
        miner: str = "semihard",
        variant: str = "standard",
    ):
        super().__init__()
        self.margin = require_positive("margin", margin)
        self.distance = require_choice("distance", distance, DISTANCES)
        self.miner = require_choice("miner", miner, MINERS_FOR["triplet"])
        self.variant = require_choice("variant", variant, TRIPLET_VARIANTS)
        if variant == "squared" and distance != "euclidean":
            raise ValueError(f"the squared variant needs the euclidean distance, got {distance!r}")

    def distances(self, embeddings: Tensor) -> Tensor:
        """The (B, B) distance matrix this loss compares."""
        if self.variant == "squared":
            return squared_euclidean_distances(embeddings)
        return pairwise_distances(embeddings, self.distance)

    @torch.no_grad()
    def select_triplets(self, dist: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The (a, p, n) index triplets of a selection miner, each (T,) long."""
        if self.miner == "batch-hard":
            return batch_hard_triplets(dist, labels)
        if self.miner == "facenet":
            return semi_hard_facenet_triplets(dist, labels, self.margin)
        raise ValueError(f"miner {self.miner!r} uses whole categories, not selected triplets")

    def forward(
        self, embeddings: Tensor, labels: Tensor | None, indices_tuple: tuple[Tensor, ...] | None = None
    ) -> Tensor:
        require_batch(embeddings, labels)
        dist = self.distances(embeddings)
        if indices_tuple is None:
            if labels is None:
                raise ValueError("TripletLoss needs labels when no indices_tuple is given")
            if self.miner in SELECTION_MINERS:
                indices_tuple = self.select_triplets(dist, labels)
            elif self.variant == "soft-margin":
                return soft_margin_triplet_loss(dist, labels, self.margin, self.miner)[0]
            else:
                return range_triplet_loss(dist, labels, self.margin, self.miner)[0]
        if len(indices_tuple) != 3:
            raise ValueError("indices_tuple must be (anchor, positive, negative) triplets")
        a, p, n = indices_tuple
        if self.variant == "soft-margin":
            losses = F.softplus(dist[a, p] - dist[a, n])
        else:
            losses = F.relu(dist[a, p] - dist[a, n] + self.margin)
        return masked_mean(losses, losses > 0)


def soft_margin_triplet_loss(dist: Tensor, labels: Tensor, margin: float, kind: str) -> tuple[Tensor, int]:
    """Mean of softplus(d_ap - d_an) over every triplet of a category: kind "semihard", "hard",
    "easy" (the categories of mining.py for `margin`) or "all". Equals pytorch-metric-learning's
    TripletMarginMiner(margin, kind) + TripletMarginLoss(margin=0, smooth_loss=True).

    softplus has no prefix-sum form, so this takes B³ time, but in blocks of anchors: memory is
    O(B · P · chunk) for P the most positives of an anchor, and backward recomputes each block
    instead of keeping B³ activations. dist: (B, B), differentiable; labels: (B,) long.
    Returns (scalar loss, number of triplets); a zero with a gradient path when there is none.
    """
    if dist.dim() != 2 or dist.shape[0] != dist.shape[1] or labels.shape != (dist.shape[0],):
        raise ValueError(f"dist must be (B, B) and labels (B,), got {tuple(dist.shape)}, {tuple(labels.shape)}")
    require_choice("kind", kind, TRIPLET_KINDS)
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    plan = _TripletBlocks(dist.detach(), labels, margin, kind)
    loss = _SoftMarginMean.apply(dist, plan)
    return loss, plan.total


class _TripletBlocks:
    """Each anchor's positives packed to the left of a (B, P) table, and the anchor blocks
    whose (rows, P, B) violation tensors d_ap - d_an are formed one at a time."""

    def __init__(self, dist: Tensor, labels: Tensor, margin: float, kind: str):
        size = len(labels)
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(size, dtype=torch.bool, device=labels.device)
        positive = same & ~eye
        widest = max(int(positive.sum(dim=1).max()), 1) if size else 1
        # A stable sort puts each row's positives first; the tail past its count is padding.
        self.columns = positive.to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, :widest]
        self.is_positive = positive.gather(1, self.columns)  # (B, P)
        self.negative = ~same  # (B, B)
        self.dist, self.margin, self.kind = dist, margin, kind
        self.rows = max(1, SOFT_MARGIN_CHUNK_ELEMENTS // max(widest * size, 1))
        self.total = 0  # number of valid triplets, set by the forward pass

    def blocks(self, dist: Tensor):
        """Yield (row slice, violation (rows, P, B), valid mask of the same shape)."""
        for start in range(0, len(dist), self.rows):
            rows = slice(start, start + self.rows)
            d_ap = dist[rows].gather(1, self.columns[rows])[:, :, None]  # (rows, P, 1)
            d_an = dist[rows][:, None, :]  # (rows, 1, B)
            valid = self.is_positive[rows, :, None] & self.negative[rows, None, :]
            # The comparisons of mining.py's categories, written the same way.
            if self.kind == "hard":
                valid &= d_an <= d_ap
            elif self.kind == "semihard":
                valid &= (d_ap < d_an) & (d_an <= d_ap + self.margin)
            elif self.kind == "easy":
                valid &= d_an > d_ap + self.margin
            yield rows, d_ap - d_an, valid


class _SoftMarginMean(torch.autograd.Function):
    """sum(softplus(violation)) / count over the valid triplets (0 when there is none); backward
    recomputes the blocks (d softplus(x) / dx = sigmoid(x)) so nothing of size B³ is kept."""

    @staticmethod
    def forward(ctx, dist: Tensor, plan: _TripletBlocks) -> Tensor:
        accumulated = torch.zeros((), dtype=torch.float64, device=dist.device)
        count = torch.zeros((), dtype=torch.long, device=dist.device)
        for _, violation, valid in plan.blocks(dist.detach()):
            accumulated += torch.where(valid, F.softplus(violation), 0).sum(dtype=torch.float64)
            count += valid.sum()
        plan.total = int(count)
        ctx.plan, ctx.divisor = plan, max(plan.total, 1)
        return (accumulated / ctx.divisor).to(dist.dtype)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        plan = ctx.plan
        grad = torch.zeros_like(plan.dist)
        for rows, violation, valid in plan.blocks(plan.dist):
            weight = torch.where(valid, torch.sigmoid(violation), 0)
            # d_ap of (a, p) gathers over negatives; d_an of (a, n) over positives, with a minus.
            grad[rows].scatter_add_(1, plan.columns[rows], weight.sum(dim=2))
            grad[rows] -= weight.sum(dim=1)
        return grad * (grad_output / ctx.divisor), None

