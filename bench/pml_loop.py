"""The pytorch-metric-learning training step both benchmarks compare against: the same model,
optimizer, autocast and input as ours, with TripletMarginMiner(semihard) + TripletMarginLoss
in place of our objective (as pytorch-metric-learning's own examples train)."""
from __future__ import annotations

import torch

MARGIN = 0.2


class PmlStep:
    """Called like core.training.TrainingStep: (x, labels, lr) -> loss, on `training`'s model
    and optimizer (a TrainingStep from core.training.build_training)."""

    def __init__(self, training, margin: float = MARGIN) -> None:
        from pytorch_metric_learning import losses, miners

        self.training = training
        self.miner = miners.TripletMarginMiner(margin=margin, type_of_triplets="semihard")
        self.loss_fn = losses.TripletMarginLoss(margin=margin)

    def __call__(self, x: torch.Tensor, labels: torch.Tensor, lr: float) -> torch.Tensor:
        t = self.training
        if t.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for group in t.optimizer.param_groups:
            group["lr"] = lr
        with t.autocast():
            embeddings = t.forward(x)
        embeddings = embeddings.float()
        triplets = self.miner(embeddings, labels)
        loss = self.loss_fn(embeddings, labels, triplets)
        t.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t.optimizer.step()
        return loss.detach()
