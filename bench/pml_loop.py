"""The pytorch-metric-learning objectives both benchmarks compare against, run through our own
TrainingStep: the same model, optimizer, autocast and input as ours, with pml's counterpart of the
run's objective in place of ours (as pml's own examples train): SupConLoss(τ) for supcon (the
default since 2026-12-06), TripletMarginMiner + TripletMarginLoss(m) for triplet."""
from __future__ import annotations

import torch

from core.training.loop import TrainingStep

MARGIN = 0.2
PML_TRIPLET_TYPES = {"semi-hard": "semihard", "hard": "hard", "all": "all", "easy": "easy"}


class PmlTriplet(torch.nn.Module):
    """pml's miner + loss behind our loss interface: forward(embeddings, labels) -> loss."""

    def __init__(self, margin: float = MARGIN, kind: str = "semi-hard") -> None:
        super().__init__()
        from pytorch_metric_learning import losses, miners

        self.miner = miners.TripletMarginMiner(margin=margin, type_of_triplets=PML_TRIPLET_TYPES[kind])
        self.loss_fn = losses.TripletMarginLoss(margin=margin)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(embeddings, labels, self.miner(embeddings, labels))


class PmlSupCon(torch.nn.Module):
    """pml's SupConLoss (every other image of the batch a candidate) behind our loss interface."""

    def __init__(self, temperature: float) -> None:
        super().__init__()
        from pytorch_metric_learning import losses

        self.loss_fn = losses.SupConLoss(temperature=temperature)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(embeddings, labels)


def pml_objective(cfg) -> torch.nn.Module:
    """pml's counterpart of a RunConfig's objective and miner."""
    if cfg.loss == "supcon" and cfg.miner == "in-batch":
        return PmlSupCon(cfg.temperature)
    if cfg.loss == "triplet" and cfg.miner in PML_TRIPLET_TYPES and cfg.triplet_variant == "standard" \
            and cfg.distance == "euclidean":
        return PmlTriplet(cfg.margin, cfg.miner)
    raise SystemExit(f"the pml loop has no counterpart of the {cfg.loss} loss with the {cfg.miner} miner; "
                     f"use --loss supcon or --loss triplet")


def pml_step(training: TrainingStep, cfg) -> TrainingStep:
    """`training`'s model and optimizer (from core.training.loop.build_training) with pml's objective."""
    return TrainingStep(training.model, pml_objective(cfg), training.optimizer, training.device,
                        training.autocast_dtype)


def print_table(rows: list[dict], columns: list[tuple[str, str, int, str]]) -> None:
    """columns: (title, key, width, format); a missing or None value prints as '-'."""
    print(" ".join(f"{title:>{width}}" for title, _, width, _ in columns))
    for row in rows:
        print(" ".join(f"{'-' if row.get(key) is None else format(row[key], fmt):>{width}}"
                       for _, key, width, fmt in columns))
