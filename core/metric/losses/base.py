"""Argument checks and reductions shared by the losses (their settings: core.metric.builtins)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from core.metric.inspector import ROWS_PER_CATEGORY


def require_positive(name: str, value: float) -> float:
    """value as a float, or a ValueError sentence when it is not a finite number > 0."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number > 0, got {value!r}") from None
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be > 0, got {value}")
    return number


def require_choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def require_batch(embeddings: Tensor, labels: Tensor | None) -> None:
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must have shape (batch, dim), got {tuple(embeddings.shape)}")
    if labels is not None and labels.shape != (len(embeddings),):
        raise ValueError(f"labels must have shape ({len(embeddings)},), got {tuple(labels.shape)}")


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of values[mask]; 0 (still differentiable) when the mask is empty."""
    return torch.where(mask, values, 0).sum() / mask.sum().clamp_min(1)


def as_pairs(indices_tuple: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(a1, p, a2, n) pairs, as pytorch-metric-learning's pair miners return them, from pairs or
    from (a, p, n) triplets split into the pairs (a, p) and (a, n)."""
    if len(indices_tuple) == 3:
        a, p, n = indices_tuple
        return a, p, a, n
    if len(indices_tuple) != 4:
        raise ValueError("indices_tuple must be (a1, p, a2, n) pairs or (a, p, n) triplets")
    return tuple(indices_tuple)


def check_miner(objective: str, miner, margin: float):
    """A miner object for `objective`: a registered miner's name (which must apply to it) is built
    for `margin`; a miner object is taken as it is."""
    if isinstance(miner, str):
        from core.metric import registry
        from core.metric.miners import build_miner

        allowed = registry.objective(objective).miners
        if miner not in allowed:
            raise ValueError(f"miner must be one of {', '.join(allowed)}; got {miner!r}")
        return build_miner(miner, margin)
    if not callable(miner):
        raise ValueError(f"miner must be a miner's name or a callable (dist, labels) -> mined, got {miner!r}")
    return miner


class InspectsWithItsMiner:
    """`inspect(embeddings, labels)` for direct use (outside a training step): the batch mined by
    the loss's own miner, then the loss's `inspect_mined`. Needs `distances`, `margin`, `miner`."""

    @torch.no_grad()
    def inspect(self, embeddings: Tensor, labels: Tensor, per_category: int = ROWS_PER_CATEGORY,
                generator: torch.Generator | None = None) -> list[dict]:
        from core.metric.miners import mine
        from core.metric.mining import MiningBatch

        batch = MiningBatch(self.distances(embeddings), labels, self.margin)
        return self.inspect_mined(batch, mine(self.miner, batch), per_category, generator)
