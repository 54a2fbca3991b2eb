"""Triplet loss, DESIGN.md: L = max(0, d(A,P) - d(A,N) + m), with its squared-distance and
soft-margin variants, over a whole triplet category or over a selection miner's triplets."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.metric import inspector
from core.metric.losses.base import InspectsWithItsMiner, check_miner, masked_mean, require_batch, require_choice, require_positive
from core.metric.distances import DISTANCES, cross_distances, pairwise_distances, squared_cross_distances, squared_euclidean_distances
from core.metric.miners import mine
from core.metric.builtins import TRIPLET_VARIANTS
from core.metric.mining import (
    TRIPLET_KINDS,
    MiningBatch,
    Triplets,
    TripletSet,
    categorize,
    category_codes,
    set_triplet_loss,
)

# Elements of one (anchors, positives, negatives) block of the soft-margin loss: 4M floats, so a
# block stays in the tens of MB whatever the batch; B³ work is done in B² · chunk pieces.
SOFT_MARGIN_CHUNK_ELEMENTS = 1 << 22


def build(settings: dict, miner) -> "TripletLoss":
    """The registry's factory (core.metric.builtins names it)."""
    return TripletLoss(margin=settings["margin"], distance=settings["distance"], miner=miner,
                       variant=settings["triplet_variant"])


class TripletLoss(InspectsWithItsMiner, nn.Module):
    """Triplet loss averaged over the triplets with a non-zero loss (pytorch-metric-learning's
    AvgNonZeroReducer).

    variant: "standard" max(0, d_ap - d_an + m); "squared" the same on squared euclidean
    distances (the miner and the categories then see squared distances too); "soft-margin"
    log(1 + exp(d_ap - d_an)), no margin (Hermans et al. 2017).
    miner: a registered miner's name or a miner object (core.metric.miners): what `forward` and
    `inspect` mine with when called on embeddings; a training step mines itself and calls
    `loss_on(dist, labels, mined)` and `inspect_mined`. A category miner
    ("semi-hard", "hard", "all", "easy") gives every triplet of its category, used from the B×B
    distance matrix without listing its B³ triplets ("easy" triplets all have a zero loss);
    "batch-hard" and "facenet" select triplets and the loss averages over those.
    With indices_tuple=(a, p, n) those triplets are used instead of the miner.
    The soft-margin loss has no margin: there `margin` only draws the categories the miner picks
    from (semi-hard, easy, FaceNet's window), and a whole category costs B³ time (in anchor
    blocks, O(B² · chunk) memory; see soft_margin_triplet_loss) since softplus has no prefix sum.
    Shape: embeddings (batch, dim), labels (batch,) long -> scalar.
    """

    def __init__(self, margin: float = 0.2, distance: str = "euclidean", miner="semi-hard", variant: str = "standard"):
        super().__init__()
        self.margin = require_positive("margin", margin)
        self.distance = require_choice("distance", distance, DISTANCES)
        self.variant = require_choice("variant", variant, TRIPLET_VARIANTS)
        if variant == "squared" and distance != "euclidean":
            raise ValueError(f"the squared variant needs the euclidean distance, got {distance!r}")
        self.miner = check_miner("triplet", miner, self.margin)

    def distances(self, embeddings: Tensor) -> Tensor:
        """The (B, B) distance matrix this loss compares (and its miner mines)."""
        if self.variant == "squared":
            return squared_euclidean_distances(embeddings)
        return pairwise_distances(embeddings, self.distance)

    def cross_distances(self, queries: Tensor, references: Tensor) -> Tensor:
        """`distances` from a batch's rows to references (a cross-batch memory): (B, R)."""
        if self.variant == "squared":
            return squared_cross_distances(queries, references)
        return cross_distances(queries, references, self.distance)

    def per_triplet(self, d_ap: Tensor, d_an: Tensor) -> Tensor:
        """The loss of each triplet, before the mean."""
        if self.variant == "soft-margin":
            return F.softplus(d_ap - d_an)
        return F.relu(d_ap - d_an + self.margin)

    def forward(
        self, embeddings: Tensor, labels: Tensor | None, indices_tuple: tuple[Tensor, ...] | None = None
    ) -> Tensor:
        require_batch(embeddings, labels)
        dist = self.distances(embeddings)
        if indices_tuple is None:
            if labels is None:
                raise ValueError("TripletLoss needs labels when no indices_tuple is given")
            mined = mine(self.miner, MiningBatch(dist, labels, self.margin))
        else:
            if len(indices_tuple) != 3:
                raise ValueError("indices_tuple must be (anchor, positive, negative) triplets")
            mined = Triplets(*indices_tuple, None, None, [])
        return self.loss_on(dist, labels, mined)

    def loss_on(self, dist: Tensor, labels: Tensor | None, mined) -> Tensor:
        """The loss over a miner's triplets; dist differentiable."""
        if isinstance(mined, TripletSet):
            if self.variant == "soft-margin":
                if dist.shape[0] != dist.shape[1]:
                    raise ValueError("the soft-margin variant over a whole category has no cross-batch memory; "
                                     "use the batch-hard or FaceNet miner with it, or memory size 0")
                return soft_margin_triplet_loss(dist, labels, self.margin, mined.kind)[0]
            return set_triplet_loss(dist, mined)[0]
        losses = self.per_triplet(dist[mined.anchor, mined.positive], dist[mined.anchor, mined.negative])
        return masked_mean(losses, losses > 0)  # softplus is never 0: the soft-margin mean is over all

    @torch.no_grad()
    def inspect_mined(self, batch: MiningBatch, mined, per_category: int = inspector.ROWS_PER_CATEGORY,
                      generator: torch.Generator | None = None) -> list[dict]:
        """Up to `per_category` triplets of each category from the set this loss averaged over on
        this batch (the miner's triplets; for the standard and squared variants those with a
        non-zero loss, except the easy miner's, whose losses are all zero), each with the loss
        it contributed (see core.metric.inspector)."""
        dist = batch.dist
        if isinstance(mined, TripletSet):
            used = mined if self.variant == "soft-margin" or mined.kind == "easy" else mined.nonzero()
            sample = used.sample(per_category, generator)
        else:
            losses = self.per_triplet(mined.d_ap, mined.d_an)
            keep = torch.ones_like(losses, dtype=torch.bool) if self.variant == "soft-margin" else losses > 0
            codes = category_codes(mined.d_ap, mined.d_an, self.margin)  # in CATEGORIES order, as sets sample
            pick = inspector.stratified(codes, keep, per_category, generator).to(dist.device)
            sample = Triplets(mined.anchor[pick], mined.positive[pick], mined.negative[pick], mined.d_ap[pick],
                              mined.d_an[pick], [])
        return inspector.rows(sample.anchor, sample.positive, sample.negative, sample.d_ap, sample.d_an,
                              categorize(sample.d_ap, sample.d_an, self.margin),
                              self.per_triplet(sample.d_ap, sample.d_an))


def soft_margin_triplet_loss(dist: Tensor, labels: Tensor, margin: float, kind: str) -> tuple[Tensor, int]:
    """Mean of softplus(d_ap - d_an) over every triplet of a category: kind "semi-hard", "hard",
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
            elif self.kind == "semi-hard":
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
