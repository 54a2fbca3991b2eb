"""Losses of the lab: contrastive (pairwise), triplet, InfoNCE (NT-Xent) and supervised
contrastive.

Each is a small `nn.Module`. A training step computes the (B, B) distances once with the loss's
`distances`, mines them (core.metric.miners) and calls `loss_on(dist, labels, mined)`; the
inspector reads `inspect_mined(batch, mined)`. For direct use, forward takes
`(embeddings, labels, indices_tuple=None)` as in pytorch-metric-learning (mining with the miner it
was built with), so a miner's indices can drive any of them. Bad arguments fail in
`__init__`; a batch with nothing to learn from gives a zero loss with a gradient path, never NaN.
Distances are taken on the embeddings as given: the encoder L2-normalises them (DESIGN.md).
"""

from __future__ import annotations

from torch import nn

from core.metric.losses.contrastive import ContrastiveLoss
from core.metric.losses.infonce import InfoNCELoss, SupConLoss
from core.metric.losses.triplet import TRIPLET_VARIANTS, TripletLoss, soft_margin_triplet_loss
from core.metric.miners import build_miner
from core.metric import registry

__all__ = [
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
    miner: str | None = None,
    margin: float | None = None,
    temperature: float | None = None,
    distance: str | None = None,
    triplet_variant: str | None = None,
    **options,
) -> nn.Module:
    """Build the loss of a registered objective with its miner, from core.metric.registry: settings left
    None take the objective's defaults; one the objective does not have must be None (or its
    usual default), and a miner must apply to it (ValueError sentences otherwise). `margin` also
    draws the categories of the miner and of the inspector. Extra settings of an objective, and
    the miner's own settings, go in `options`."""
    values = {"margin": margin, "temperature": temperature, "distance": distance, "triplet_variant": triplet_variant}
    miner, resolved, options = registry.resolve_objective(loss, miner, values, options)
    spec = registry.objective(loss)
    settings = {s.name: resolved[s.name] if s.name in resolved else options[s.name] for s in spec.settings}
    miner_settings = {s.name: options.get(s.name, s.default) for s in registry.miner(miner).settings}
    return registry.resolve(spec.factory)(settings, build_miner(miner, resolved["margin"], **miner_settings))
