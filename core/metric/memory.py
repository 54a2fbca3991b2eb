"""Cross-batch memory (Wang et al., "Cross-Batch Memory for Embedding Learning", CVPR 2020): a
queue of the last M embeddings and labels, detached, that a training step's triplet or pair
miner mines against besides its own batch.

Filled as pytorch-metric-learning's CrossBatchMemory fills it: each step first writes the batch
into the ring (slots queue_idx, queue_idx + 1, ... modulo M), then the references are the slots
written so far (all M once the ring has wrapped), in slot order. The batch's rows are the
queries; each query's own copy (the slot it was just written to) is in the references and is
never its positive. The loss is computed over the queries' rows only, against the detached
references: gradients flow through the queries (core.metric.mining.MiningBatch's references).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor


class References(NamedTuple):
    """What a step mines against: the memory after its batch was written."""

    embeddings: Tensor  # (R, d) detached
    labels: Tensor  # (R,) long
    own: Tensor  # (B,) long: the reference column of each batch row's own copy
    fresh: Tensor  # (R,) bool: the reference was written by this batch (False: it came from memory)


class CrossBatchMemory:
    """A ring buffer of the last `size` (embedding, label) pairs, on `device`. `positions` keeps,
    beside each slot, a caller's tag of its row (the training loop's dataset positions; -1 unset)."""

    def __init__(self, size: int, dim: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if size < 1:
            raise ValueError(f"the memory size must be >= 1, got {size}")
        self.size, self.dim = int(size), int(dim)
        self.embeddings = torch.zeros(self.size, self.dim, dtype=dtype, device=device)
        self.labels = torch.zeros(self.size, dtype=torch.long, device=device)
        self.positions = np.full(self.size, -1, dtype=np.int64)
        self.queue_idx = 0
        self.filled = False

    def __len__(self) -> int:
        """How many slots hold an entry."""
        return self.size if self.filled else self.queue_idx

    @torch.no_grad()
    def enqueue(self, embeddings: Tensor, labels: Tensor) -> References:
        """Write a batch (detached) into the ring and return the references to mine it against.
        embeddings: (B, d), labels: (B,), B <= size."""
        count = len(embeddings)
        if count > self.size:
            raise ValueError(f"a batch of {count} rows does not fit a cross-batch memory of {self.size}; "
                             f"make the memory at least the batch size")
        slots = torch.arange(self.queue_idx, self.queue_idx + count, device=self.labels.device) % self.size
        self.embeddings[slots] = embeddings.detach().to(self.embeddings.dtype)
        self.labels[slots] = labels.to(self.labels.device)
        previous = self.queue_idx
        self.queue_idx = (self.queue_idx + count) % self.size
        if not self.filled and count and self.queue_idx <= previous:
            self.filled = True
        used = len(self)
        fresh = torch.zeros(used, dtype=torch.bool, device=self.labels.device)
        fresh[slots] = True
        return References(self.embeddings[:used], self.labels[:used], slots, fresh)

    def state(self) -> dict[str, Tensor]:
        """The ring as tensors, for a training state (core.training.loop.TrainingState)."""
        return {"memory.embeddings": self.embeddings, "memory.labels": self.labels,
                "memory.positions": torch.from_numpy(self.positions),
                "memory.cursor": torch.tensor([self.queue_idx, int(self.filled)])}

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], device: torch.device | str = "cpu") -> "CrossBatchMemory":
        """The ring `state()` saved, on `device`."""
        embeddings = tensors["memory.embeddings"]
        memory = cls(len(embeddings), embeddings.shape[1], device, embeddings.dtype)
        memory.embeddings.copy_(embeddings)
        memory.labels.copy_(tensors["memory.labels"])
        memory.positions[:] = tensors["memory.positions"].numpy()
        memory.queue_idx, memory.filled = int(tensors["memory.cursor"][0]), bool(tensors["memory.cursor"][1])
        return memory
