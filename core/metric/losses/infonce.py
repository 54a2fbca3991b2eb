"""Softmax losses over B×B cosine logits: InfoNCE / NT-Xent (DESIGN.md, seeds 002, 003) and
supervised contrastive (Khosla et al. 2020). Never a B×B×B tensor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.metric import inspector
from core.metric.builtins import SUPCON_TEMPERATURE
from core.metric.losses.base import as_pairs, check_miner, require_batch, require_positive
from core.metric.distances import pairwise_distances
from core.metric.miners import InBatch
from core.metric.mining import MiningBatch, categorize
from core.metric.registry import CATEGORY_MARGIN

NEGATIVES_SHOWN = 3  # the inspector's hardest in-batch negatives per anchor


def build_infonce(settings: dict, miner) -> "InfoNCELoss":
    """The registry's factory (core.metric.builtins names it)."""
    return InfoNCELoss(temperature=settings["temperature"], miner=miner)


def build_supcon(settings: dict, miner) -> "SupConLoss":
    return SupConLoss(temperature=settings["temperature"], miner=miner)


def _cosine_logits(dist: Tensor, temperature: float) -> Tensor:
    """(B, B) cosine distances 1 − cos -> cosine similarities / temperature, -inf on the diagonal
    (a row is never its own candidate)."""
    logits = (1 - dist) / temperature
    eye = torch.eye(len(dist), dtype=torch.bool, device=dist.device)
    return logits.masked_fill(eye, float("-inf"))


class _SoftmaxLoss(nn.Module):
    """What InfoNCE and SupCon share: cosine distances, an in-batch miner, the inspector."""

    def __init__(self, temperature: float, miner) -> None:
        super().__init__()
        self.temperature = require_positive("temperature", temperature)
        self.miner = check_miner(self.objective, miner, CATEGORY_MARGIN)

    def distances(self, embeddings: Tensor) -> Tensor:
        """Cosine distances 1 − cos, the similarity this loss's softmax uses."""
        return pairwise_distances(embeddings, "cosine")

    def positives(self, labels: Tensor) -> Tensor:
        """(B, B) bool: the positives of each row."""
        raise NotImplementedError

    def forward(
        self, embeddings: Tensor, labels: Tensor | None = None, indices_tuple: tuple[Tensor, ...] | None = None
    ) -> Tensor:
        require_batch(embeddings, labels)
        if indices_tuple is not None:
            return self._loss_on_indices(self.distances(embeddings), indices_tuple)
        if labels is None:
            raise ValueError(f"{type(self).__name__} needs labels when no indices_tuple is given")
        return self.loss_on(self.distances(embeddings), labels, InBatch(len(embeddings)))

    def _loss_on_indices(self, dist: Tensor, indices_tuple: tuple[Tensor, ...]) -> Tensor:
        raise ValueError(f"{type(self).__name__} takes no indices_tuple")

    @torch.no_grad()
    def inspect(self, embeddings: Tensor, labels: Tensor, per_category: int = inspector.ROWS_PER_CATEGORY,
                generator: torch.Generator | None = None) -> list[dict]:
        """inspect_mined on this batch (for direct use)."""
        batch = MiningBatch(self.distances(embeddings), labels, getattr(self.miner, "margin", CATEGORY_MARGIN))
        return self.inspect_mined(batch, InBatch(len(batch)), per_category, generator)

    @torch.no_grad()
    def inspect_mined(self, batch: MiningBatch, mined: InBatch, per_category: int = inspector.ROWS_PER_CATEGORY,
                      generator: torch.Generator | None = None) -> list[dict]:
        """For up to `per_category` random anchors: their hardest positive and their
        NEGATIVES_SHOWN hardest in-batch negatives (the highest softmax weight), each row with
        the negative's softmax weight and the anchor's loss term L_i (the loss is their mean).
        Categories are drawn with the batch's margin."""
        dist, labels = batch.dist, batch.labels
        size = len(batch)
        log_prob = _cosine_logits(dist, self.temperature).log_softmax(dim=1)
        positive = self.positives(labels)
        negative = ~positive & ~torch.eye(size, dtype=torch.bool, device=dist.device)
        usable = torch.nonzero(positive.any(dim=1) & negative.any(dim=1)).squeeze(1)
        order = torch.randperm(len(usable), generator=inspector._cpu(generator))[:per_category]
        anchors = usable[order.to(usable.device)]
        if len(anchors) == 0:
            return []
        anchor_loss = -torch.where(positive, log_prob, 0).sum(dim=1) / positive.sum(dim=1).clamp_min(1)
        hardest_positive = log_prob.masked_fill(~positive, float("inf")).argmin(dim=1)
        shown = min(NEGATIVES_SHOWN, int(negative[anchors].sum(dim=1).min()))
        weight, hardest = log_prob[anchors].masked_fill(~negative[anchors], float("-inf")).topk(shown, dim=1)
        a = anchors.repeat_interleave(shown)
        p, n = hardest_positive[a], hardest.flatten()
        d_ap, d_an = dist[a, p], dist[a, n]
        return inspector.rows(a, p, n, d_ap, d_an, categorize(d_ap, d_an, batch.margin), anchor_loss[a],
                              weight.flatten().exp())


class InfoNCELoss(_SoftmaxLoss):
    """NT-Xent (SimCLR): -log softmax of the other view's cosine similarity over the batch.

    embeddings (2N, dim): rows i and i + N are two views of one image; every other row is a
    negative. Labels and indices_tuple are ignored. temperature > 0, typically 0.05 to 0.5.
    Shape: (2N, dim) -> scalar.
    """

    objective = "infonce"

    def __init__(self, temperature: float = 0.1, miner="in-batch"):
        super().__init__(temperature, miner)

    def positives(self, labels: Tensor) -> Tensor:
        """Row i's positive is the other view of its image: i ± N in a batch of 2N."""
        batch = len(labels)
        other = (torch.arange(batch, device=labels.device) + batch // 2) % batch
        positive = torch.zeros(batch, batch, dtype=torch.bool, device=labels.device)
        positive[torch.arange(batch, device=labels.device), other] = True
        return positive

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor | None = None,
        indices_tuple: tuple[Tensor, ...] | None = None,
    ) -> Tensor:
        require_batch(embeddings, None)
        return self.loss_on(self.distances(embeddings), None, InBatch(len(embeddings)))

    def loss_on(self, dist: Tensor, labels: Tensor | None, mined: InBatch) -> Tensor:
        """The loss from the (B, B) cosine distances (differentiable); labels are not read."""
        batch = len(dist)
        if batch == 0 or batch % 2:
            raise ValueError(f"InfoNCELoss needs an even batch of two views per image, got {batch} rows")
        logits = _cosine_logits(dist, self.temperature)
        other_view = (torch.arange(batch, device=dist.device) + batch // 2) % batch
        return F.cross_entropy(logits, other_view)


class SupConLoss(_SoftmaxLoss):
    """Supervised contrastive loss (Khosla et al. 2020, L_out):

        L_i = -1/|P(i)| Σ_{p ∈ P(i)} log( e^{s_ip/τ} / Σ_{a ≠ i} e^{s_ia/τ} )

    with s the cosine similarity and P(i) the other rows with i's label; the loss is the mean
    of L_i over the anchors that have a positive (0 with a gradient path when none has).
    With indices_tuple, pairs (a1, p, a2, n) or triplets (a, p, n) give the positive and the
    negative pairs, and the denominator runs over those pairs only (as pytorch-metric-learning).
    temperature > 0, typically 0.05 to 0.2; 0.07 by default (Khosla et al.'s, and the registry's).
    Shape: embeddings (batch, dim), labels (batch,).
    """

    objective = "supcon"

    def __init__(self, temperature: float = SUPCON_TEMPERATURE, miner="in-batch"):
        super().__init__(temperature, miner)

    def positives(self, labels: Tensor) -> Tensor:
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        return (labels[:, None] == labels[None, :]) & ~eye

    def loss_on(self, dist: Tensor, labels: Tensor, mined: InBatch) -> Tensor:
        """The loss from the (B, B) cosine distances (differentiable), every other row a candidate."""
        eye = torch.eye(len(dist), dtype=torch.bool, device=dist.device)
        return self._loss(dist, (labels[:, None] == labels[None, :]) & ~eye, ~eye)

    def _loss_on_indices(self, dist: Tensor, indices_tuple: tuple[Tensor, ...]) -> Tensor:
        eye = torch.eye(len(dist), dtype=torch.bool, device=dist.device)
        positive, candidate = _pair_masks(indices_tuple, len(dist), dist.device)
        return self._loss(dist, positive & ~eye, candidate & ~eye)

    def _loss(self, dist: Tensor, positive: Tensor, candidate: Tensor) -> Tensor:
        """positive, candidate: (B, B) bool, no diagonal."""
        logits = _cosine_logits(dist, self.temperature).masked_fill(~candidate, float("-inf"))
        # An anchor with no candidate has an all -inf row; 0 there keeps log_softmax finite.
        logits = logits.masked_fill(~candidate.any(dim=1, keepdim=True), 0)
        log_prob = logits.log_softmax(dim=1)
        per_anchor_count = positive.sum(dim=1)
        per_anchor = -torch.where(positive, log_prob, 0).sum(dim=1) / per_anchor_count.clamp_min(1)
        has_positive = per_anchor_count > 0
        return torch.where(has_positive, per_anchor, 0).sum() / has_positive.sum().clamp_min(1)


def _pair_masks(indices_tuple: tuple[Tensor, ...], batch: int, device) -> tuple[Tensor, Tensor]:
    """(positive, positive | negative) boolean (B, B) masks from pair or triplet indices."""
    a1, p, a2, n = as_pairs(indices_tuple)
    positive = torch.zeros(batch, batch, dtype=torch.bool, device=device)
    negative = torch.zeros_like(positive)
    positive[a1, p] = True
    negative[a2, n] = True
    return positive, positive | negative
