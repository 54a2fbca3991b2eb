"""Softmax losses over B×B cosine logits: InfoNCE / NT-Xent (DESIGN.md, seeds 002, 003) and
supervised contrastive (Khosla et al. 2020). Never a B×B×B tensor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.losses.base import as_pairs, require_batch, require_positive


def _cosine_logits(embeddings: Tensor, temperature: float) -> Tensor:
    """(B, d) -> (B, B) cosine similarities / temperature, -inf on the diagonal (a row is never
    its own candidate)."""
    unit = F.normalize(embeddings, dim=1)
    logits = unit @ unit.T / temperature
    eye = torch.eye(len(embeddings), dtype=torch.bool, device=embeddings.device)
    return logits.masked_fill(eye, float("-inf"))


class InfoNCELoss(nn.Module):
    """NT-Xent (SimCLR): -log softmax of the other view's cosine similarity over the batch.

    embeddings (2N, dim): rows i and i + N are two views of one image; every other row is a
    negative. Labels and indices_tuple are ignored. temperature > 0, typically 0.05 to 0.5.
    Shape: (2N, dim) -> scalar.
    """

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.temperature = require_positive("temperature", temperature)

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor | None = None,
        indices_tuple: tuple[Tensor, ...] | None = None,
    ) -> Tensor:
        require_batch(embeddings, None)
        batch = len(embeddings)
        if batch == 0 or batch % 2:
            raise ValueError(f"InfoNCELoss needs an even batch of two views per image, got {batch} rows")
        logits = _cosine_logits(embeddings, self.temperature)
        other_view = (torch.arange(batch, device=embeddings.device) + batch // 2) % batch
        return F.cross_entropy(logits, other_view)


class SupConLoss(nn.Module):
    """Supervised contrastive loss (Khosla et al. 2020, L_out):

        L_i = -1/|P(i)| Σ_{p ∈ P(i)} log( e^{s_ip/τ} / Σ_{a ≠ i} e^{s_ia/τ} )

    with s the cosine similarity and P(i) the other rows with i's label; the loss is the mean
    of L_i over the anchors that have a positive (0 with a gradient path when none has).
    With indices_tuple, pairs (a1, p, a2, n) or triplets (a, p, n) give the positive and the
    negative pairs, and the denominator runs over those pairs only (as pytorch-metric-learning).
    temperature > 0, typically 0.05 to 0.2. Shape: embeddings (batch, dim), labels (batch,).
    """

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.temperature = require_positive("temperature", temperature)

    def forward(
        self, embeddings: Tensor, labels: Tensor | None, indices_tuple: tuple[Tensor, ...] | None = None
    ) -> Tensor:
        require_batch(embeddings, labels)
        batch = len(embeddings)
        eye = torch.eye(batch, dtype=torch.bool, device=embeddings.device)
        if indices_tuple is not None:
            positive, candidate = _pair_masks(indices_tuple, batch, embeddings.device)
            candidate &= ~eye
            positive &= ~eye
        elif labels is not None:
            positive = (labels[:, None] == labels[None, :]) & ~eye
            candidate = ~eye
        else:
            raise ValueError("SupConLoss needs labels when no indices_tuple is given")
        logits = _cosine_logits(embeddings, self.temperature).masked_fill(~candidate, float("-inf"))
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
