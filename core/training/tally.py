"""Which images the miner keeps choosing: per-image mining counts summed over an epoch's batches.

`MiningTally.add_batch` takes each training step's core.metric.mining.MiningBatch (the distances
the loss saw, with the negatives the miner sorted) with the dataset positions of its rows and adds
its per-image counts (core.metric.mining.batch_image_counts, read from that same sort) to the
epoch's (n_images, 3) array. core.training.tally_files stores and reads the result (without torch, for the pages).

Confused with which classes: the Triplets page shows, for the most used negatives, the classes
of the anchors of their hard and semi-hard triplets. That is exact and bounded as follows:
- when n_images × n_classes <= DENSE_CELLS (20 MB of int32: MNIST-sized data with up to ~70
  classes) a dense (n_images, n_classes) array is summed batch by batch;
- above that, the batches' (image, anchor class, triplets) triples are kept sparse, merged
  whenever they pile up. They hold only pairs that had a hard or semi-hard triplet, at most
  min(n_classes, batch size) classes per image seen in the epoch; so memory grows with the
  epoch's distinct confusions, never with n_images × n_classes.
At the epoch's end only the TOP_NEGATIVES most used negatives' rows are kept (NegativeClasses).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from core.metric.categories import MINING_COLUMNS
from core.metric.mining import MiningBatch, TripletCounts, batch_image_counts
from core.training.tally_files import TOP_NEGATIVES, NegativeClasses, top_negatives

DENSE_CELLS = 5_000_000
_MERGE_AT = 1 << 20  # sparse triples waiting before a merge (at least; grows with the merged table)


class MiningTally:
    """Per-image mining counts of one epoch. n_images: the dataset's size (batch rows are given
    as dataset positions). image_classes: (n_images,) class of each image, for the classes each
    negative was confused with (None: not counted, e.g. an unlabeled dataset); negative values
    are images without a label and count for no class."""

    def __init__(self, n_images: int, image_classes: Optional[np.ndarray] = None,
                 n_classes: Optional[int] = None) -> None:
        if n_images < 0:
            raise ValueError(f"n_images must be >= 0, got {n_images}")
        self.n_images = int(n_images)
        self.image_classes = None
        self.n_classes = 0
        if image_classes is not None:
            self.image_classes = np.asarray(image_classes, dtype=np.int64)
            if self.image_classes.shape != (self.n_images,):
                raise ValueError(f"image_classes must have shape ({self.n_images},), "
                                 f"got {self.image_classes.shape}")
            largest = int(self.image_classes.max(initial=-1)) + 1
            self.n_classes = max(largest, int(n_classes or 0))
        self.dense = self.n_images * self.n_classes <= DENSE_CELLS
        self.reset()

    def reset(self) -> None:
        """Start a new epoch: every count back to 0."""
        self._counts = np.zeros((self.n_images, len(MINING_COLUMNS)), dtype=np.int64)
        self._by_class = None
        if self.image_classes is not None and self.dense:
            self._by_class = np.zeros((self.n_images, self.n_classes), dtype=np.int32)
        self._keys = np.zeros(0, dtype=np.int64)  # sparse: position * n_classes + class, sorted
        self._values = np.zeros(0, dtype=np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_size = 0

    @property
    def counts(self) -> np.ndarray:
        """(n_images, 3) int64 of the epoch so far; columns core.metric.categories.MINING_COLUMNS."""
        return self._counts

    def add(self, positions: np.ndarray, dist: torch.Tensor, labels: torch.Tensor, margin: float) -> TripletCounts:
        """add_batch of the batch with distances dist (B, B), labels (B,) and margin."""
        return self.add_batch(positions, MiningBatch(dist, labels, margin))

    def add_batch(self, positions: np.ndarray, batch: MiningBatch, ref_positions: Optional[np.ndarray] = None
                  ) -> TripletCounts:
        """Add one batch at its margin; returns its category totals. positions: (B,) dataset
        position of each batch row (repeats allowed: two views of one image both count for it).
        ref_positions: (R,) of each reference of a batch mined against a cross-batch memory,
        where the negatives are references (their counts go to these positions)."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.shape != (len(batch),):
            raise ValueError(f"positions must have shape ({len(batch)},), got {positions.shape}")
        if len(positions) and (positions.min() < 0 or positions.max() >= self.n_images):
            raise ValueError(f"positions must lie in [0, {self.n_images}), got {positions.min()}..{positions.max()}")
        if batch.square != (ref_positions is None):
            raise ValueError("ref_positions are given with a batch mined against references, and only then")
        if ref_positions is not None:
            ref_positions = np.asarray(ref_positions, dtype=np.int64)
            if ref_positions.shape != (batch.dist.shape[1],) or (
                    len(ref_positions) and (ref_positions.min() < 0 or ref_positions.max() >= self.n_images)):
                raise ValueError(f"ref_positions must be ({batch.dist.shape[1]},) positions in [0, {self.n_images})")
        classes = self.image_classes is not None
        result = batch_image_counts(batch, negative_uses=classes)
        # torch's index_add_ on the array's own memory: repeats add up (as np.add.at, at a fifth of its time)
        counts = torch.from_numpy(self._counts)
        counts.index_add_(0, torch.from_numpy(positions), result.per_image.cpu())
        if ref_positions is not None:
            counts.index_add_(0, torch.from_numpy(ref_positions), result.per_reference.cpu())
        if classes:
            self._add_classes(positions, result.negative_uses, ref_positions)
        return result.batch

    def _add_classes(self, positions: np.ndarray, uses: torch.Tensor, ref_positions: Optional[np.ndarray] = None
                     ) -> None:
        """uses[a, n]: hard or semi-hard triplets with anchor row a and negative row n (a
        reference, at ref_positions[n], when those are given)."""
        anchor_class = self.image_classes[positions]
        negative_positions = positions if ref_positions is None else ref_positions
        present, index = np.unique(anchor_class, return_inverse=True)
        by_class = torch.zeros(len(present), len(negative_positions), dtype=torch.long, device=uses.device)
        by_class.index_add_(0, torch.from_numpy(index.reshape(-1)).to(uses.device), uses)
        c, n = (i.cpu().numpy() for i in torch.nonzero(by_class, as_tuple=True))
        if len(c) == 0:
            return
        values = by_class.cpu().numpy()[c, n]
        classes, where = present[c], negative_positions[n]
        known = classes >= 0
        classes, where, values = classes[known], where[known], values[known]
        if self._by_class is not None:
            torch.from_numpy(self._by_class).index_put_(
                (torch.from_numpy(where), torch.from_numpy(classes)), torch.from_numpy(values.astype(np.int32)),
                accumulate=True)
            return
        self._pending.append((where * self.n_classes + classes, values))
        self._pending_size += len(values)
        if self._pending_size >= max(_MERGE_AT, len(self._keys)):
            self._merge()

    def _merge(self) -> None:
        keys = np.concatenate([self._keys] + [k for k, _ in self._pending])
        values = np.concatenate([self._values] + [v for _, v in self._pending])
        self._keys, inverse = np.unique(keys, return_inverse=True)
        self._values = np.zeros(len(self._keys), dtype=np.int64)
        np.add.at(self._values, inverse.reshape(-1), values)
        self._pending, self._pending_size = [], 0

    def negative_classes(self, top: int = TOP_NEGATIVES) -> Optional[NegativeClasses]:
        """The `top` most used negatives of the epoch so far with the anchor classes of their
        hard and semi-hard triplets; None when classes are not counted."""
        if self.image_classes is None:
            return None
        keep = top_negatives(self._counts, top)
        if self._by_class is not None:
            rows, classes = np.nonzero(self._by_class[keep])
            return NegativeClasses.from_pairs(keep[rows], classes.astype(np.int64),
                                              self._by_class[keep][rows, classes].astype(np.int64), keep)
        self._merge()
        positions, classes = np.divmod(self._keys, max(self.n_classes, 1))
        return NegativeClasses.from_pairs(positions, classes, self._values, keep)
