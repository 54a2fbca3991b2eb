"""Losses of the lab: contrastive (pairwise), triplet, InfoNCE (NT-Xent) and supervised
contrastive.

Each is a small `nn.Module` whose forward takes `(embeddings, labels, indices_tuple=None)` as in
pytorch-metric-learning, so a miner's indices can drive any of them. Bad arguments fail in
`__init__`; a batch with nothing to learn from gives a zero loss with a gradient path, never NaN.
Distances are taken on the embeddings as given: the encoder L2-normalises them (DESIGN.md).
"""

from __future__ import annotations

from torch import nn

# torch-free, so pages can offer the choices
from core.config import DEFAULT_MINER, LOSSES, MINERS_FOR, TRIPLET_VARIANTS
from core.losses.contrastive import ContrastiveLoss
from core.losses.infonce import InfoNCELoss, SupConLoss
from core.losses.triplet import (
    SELECTION_MINERS,
    TripletLoss,
    soft_margin_triplet_loss,
)

__all__ = [
    "DEFAULT_MINER",
    "LOSSES",
    "MINERS_FOR",
    "SELECTION_MINERS",
    "TRIPLET_VARIANTS",
    "ContrastiveLoss",
    "InfoNCELoss",
    "SupConLoss",
    "TripletLoss",
    "make_loss",
    "soft_margin_triplet_loss",
]


def make_loss(
    loss: str,
    miner: str,
    margin: float,
    temperature: float,
    distance: str,
    triplet_variant: str = "standard",
) -> nn.Module:
    """Build the loss a run asks for. margin is used by contrastive and triplet, temperature by
    infonce and supcon, distance by contrastive and triplet (InfoNCE and SupCon are always
    cosine); triplet_variant ("standard", "squared", "soft-margin") by triplet only."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of: {', '.join(LOSSES)}")
    if miner not in MINERS_FOR[loss]:
        raise ValueError(
            f"miner {miner!r} does not apply to the {loss} loss; "
            f"choose one of: {', '.join(MINERS_FOR[loss])}"
        )
    if triplet_variant not in TRIPLET_VARIANTS:
        raise ValueError(
            f"unknown triplet variant {triplet_variant!r}; choose one of: {', '.join(TRIPLET_VARIANTS)}"
        )
    if triplet_variant != "standard" and loss != "triplet":
        raise ValueError(f"the {triplet_variant} variant applies to the triplet loss, not {loss}")
    if loss == "contrastive":
        return ContrastiveLoss(margin=margin, distance=distance, miner=miner)
    if loss == "triplet":
        return TripletLoss(margin=margin, distance=distance, miner=miner, variant=triplet_variant)
    if loss == "supcon":
        return SupConLoss(temperature=temperature)
    return InfoNCELoss(temperature=temperature)
