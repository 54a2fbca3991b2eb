"""The pytorch-metric-learning objective both benchmarks compare against, run through our own
TrainingStep: the same model, optimizer, autocast and input as ours, with TripletMarginMiner
(semihard) + TripletMarginLoss in place of our objective (as pml's own examples train)."""
from __future__ import annotations

import torch

from core.training.loop import TrainingStep

MARGIN = 0.2


class PmlSemiHardTriplet(torch.nn.Module):
    """pml's miner + loss behind our loss interface: forward(embeddings, labels) -> loss."""

    def __init__(self, margin: float = MARGIN) -> None:
        super().__init__()
        from pytorch_metric_learning import losses, miners

        self.miner = miners.TripletMarginMiner(margin=margin, type_of_triplets="semihard")
        self.loss_fn = losses.TripletMarginLoss(margin=margin)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(embeddings, labels, self.miner(embeddings, labels))


def pml_step(training: TrainingStep, margin: float = MARGIN) -> TrainingStep:
    """`training`'s model and optimizer (from core.training.loop.build_training) with pml's objective."""
    return TrainingStep(training.model, PmlSemiHardTriplet(margin), training.optimizer, training.device,
                        training.autocast_dtype)


def print_table(rows: list[dict], columns: list[tuple[str, str, int, str]]) -> None:
    """columns: (title, key, width, format); a missing or None value prints as '-'."""
    print(" ".join(f"{title:>{width}}" for title, _, width, _ in columns))
    for row in rows:
        print(" ".join(f"{'-' if row.get(key) is None else format(row[key], fmt):>{width}}"
                       for _, key, width, fmt in columns))
