"""A training run's per-image mining counts on disk, and what the pages read of them (no torch).

Each epoch core.training.tally.MiningTally counts, for every dataset image, its uses as a hard negative,
as a semi-hard negative and as an anchor whose margin was violated, over every valid triplet of
every batch (core.metric.mining.batch_image_counts). The worker stores them under the run's folder:

- `runs/<id>/mining/epoch-<N>.npy`: (n_images, 3) uint32, columns MINING_COLUMNS;
- `runs/<id>/mining/epoch-<N>-negatives.npz`: for the epoch's TOP_NEGATIVES most used negatives
  (hard uses first, then semi-hard), how many of their hard or semi-hard triplets had an anchor
  of each class (the classes they were confused with), as NegativeClasses.

Deleting a run removes its folder, these files with it; resuming a run removes the files of the
epochs it trains again (remove_epochs_after).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from core.metric.categories import MINING_COLUMNS
from storage import artifacts
from storage.run_files import RunFiles

TOP_NEGATIVES = 200
_EPOCH_FILE = re.compile(r"^epoch-(\d+)\.npy$")


@dataclass
class NegativeClasses:
    """The anchor classes of the most used negatives' hard and semi-hard triplets, as a sparse
    table: image positions[i]'s classes are classes[offsets[i]:offsets[i + 1]] with counts
    counts[...] (largest first). Rows are in order of use (hard, then semi-hard)."""

    positions: np.ndarray  # (K,) int64 dataset positions
    offsets: np.ndarray  # (K + 1,) int64
    classes: np.ndarray  # (M,) int64 anchor classes
    counts: np.ndarray  # (M,) int64 triplets

    def of(self, position: int) -> list[tuple[int, int]]:
        """[(anchor class, triplets)] of one image, most first; [] when it is not in the table."""
        rows = np.flatnonzero(self.positions == position)
        if len(rows) == 0:
            return []
        start, end = self.offsets[rows[0]], self.offsets[rows[0] + 1]
        return [(int(c), int(n)) for c, n in zip(self.classes[start:end], self.counts[start:end])]

    @classmethod
    def from_pairs(cls, positions: np.ndarray, classes: np.ndarray, counts: np.ndarray,
                   keep: np.ndarray) -> "NegativeClasses":
        """The table of the images `keep` (in that order) from (position, class, count) triples
        with one triple per (position, class)."""
        keep = np.asarray(keep, dtype=np.int64)
        rank = np.full(int(max(keep.max(initial=-1), positions.max(initial=-1))) + 1, -1, dtype=np.int64)
        rank[keep] = np.arange(len(keep))
        row = rank[positions] if len(positions) else np.zeros(0, dtype=np.int64)
        chosen = (row >= 0) & (counts > 0)
        row, classes, counts = row[chosen], classes[chosen], counts[chosen]
        order = np.lexsort((classes, -counts, row))  # by row, then most triplets first
        offsets = np.zeros(len(keep) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(np.bincount(row, minlength=len(keep)))
        return cls(keep, offsets, classes[order].astype(np.int64), counts[order].astype(np.int64))


def top_negatives(counts: np.ndarray, top: int = TOP_NEGATIVES) -> np.ndarray:
    """Positions of the `top` images most used as hard negatives, then as semi-hard ones (ties:
    lower position first); only images used as a negative at all."""
    used = np.flatnonzero(counts[:, 0] + counts[:, 1] > 0)
    order = np.lexsort((used, -counts[used, 1], -counts[used, 0]))
    return used[order[:top]]


# ---------------------------------------------------------------- files


def mining_folder(run_id: int) -> str:
    return RunFiles(run_id).mining_folder


def counts_file(run_id: int, epoch: int) -> str:
    return f"{mining_folder(run_id)}/epoch-{int(epoch)}.npy"


def negatives_file(run_id: int, epoch: int) -> str:
    return f"{mining_folder(run_id)}/epoch-{int(epoch)}-negatives.npz"


def stage_epoch(staging: Path, run_id: int, epoch: int, counts: np.ndarray,
                negatives: Optional[NegativeClasses]) -> list[tuple[Path, str]]:
    """Write an epoch's files into `staging`; [(staged file, where it goes relative to the data
    home)] for move_into_place. counts: (n_images, 3) non-negative integers."""
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.shape[1] != len(MINING_COLUMNS):
        raise ValueError(f"mining counts must have shape (n_images, {len(MINING_COLUMNS)}), got {counts.shape}")
    if counts.size and (counts.min() < 0 or counts.max() > np.iinfo(np.uint32).max):
        raise ValueError("mining counts must lie in the range of uint32")
    staging.mkdir(parents=True, exist_ok=True)
    staged = staging / f"mining-epoch-{int(epoch)}.npy"
    artifacts.save_array_atomic(staged, counts.astype(np.uint32))
    moves = [(staged, counts_file(run_id, epoch))]
    if negatives is not None:
        table = staging / f"mining-epoch-{int(epoch)}-negatives.npz"
        with open(table, "wb") as handle:
            np.savez(handle, positions=negatives.positions, offsets=negatives.offsets,
                     classes=negatives.classes, counts=negatives.counts)
        moves.append((table, negatives_file(run_id, epoch)))
    return moves


def move_into_place(moves: list[tuple[Path, str]]) -> None:
    for source, target in moves:
        destination = artifacts.absolute(target)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, destination)


def mining_epochs(run_id: int) -> list[int]:
    """The epochs whose counts the run has stored, in order; [] for a run without any (an embed
    run, or one trained before the counts were kept)."""
    folder = artifacts.absolute(mining_folder(run_id))
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for m in map(_EPOCH_FILE.match, os.listdir(folder)) if m)


def load_mining_counts(run_id: int, epoch: Optional[int] = None) -> Optional[np.ndarray]:
    """(n_images, 3) int64 counts of one epoch, or summed over every stored epoch when epoch is
    None; None when there are none. ValueError with a sentence for a damaged file."""
    epochs = mining_epochs(run_id) if epoch is None else [int(epoch)]
    total = None
    for each in epochs:
        path = artifacts.absolute(counts_file(run_id, each))
        try:
            counts = np.load(path).astype(np.int64)
        except FileNotFoundError:
            if epoch is not None:
                return None
            continue  # removed since it was listed (the run is being deleted or resumed)
        except (OSError, ValueError) as exc:
            raise ValueError(f"run {run_id}'s mining counts of epoch {each} cannot be read ({exc})") from None
        if counts.ndim != 2 or counts.shape[1] != len(MINING_COLUMNS) or (total is not None and counts.shape != total.shape):
            raise ValueError(f"run {run_id}'s mining counts of epoch {each} have shape {counts.shape}, "
                             "unlike the run's other epochs")
        total = counts if total is None else total + counts
    return total


def load_negative_classes(run_id: int, epoch: int) -> Optional[NegativeClasses]:
    """The epoch's most used negatives with their anchor classes; None when not stored (an
    unlabeled dataset has no classes to count)."""
    path = artifacts.absolute(negatives_file(run_id, epoch))
    try:
        with np.load(path) as stored:
            return NegativeClasses(*(np.asarray(stored[k], dtype=np.int64)
                                     for k in ("positions", "offsets", "classes", "counts")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"run {run_id}'s most used negatives of epoch {epoch} cannot be read ({exc})") from None


def remove_epochs_after(run_id: int, epoch: int) -> None:
    """Delete the files of the epochs after `epoch` (resuming trains those again)."""
    for each in mining_epochs(run_id):
        if each > epoch:
            for relative in (counts_file(run_id, each), negatives_file(run_id, each)):
                artifacts.absolute(relative).unlink(missing_ok=True)


def most_mined(run_id: int, epoch: int, top: int = 24) -> list[dict]:
    """The epoch's images most used as hard negatives (then semi-hard), at most `top`, each as
    {position, hard_negative, semi_hard_negative, violated_anchor, confused_with: [(class,
    triplets)]}; confused_with is [] when the epoch's table does not hold the image."""
    counts = load_mining_counts(run_id, epoch)
    if counts is None:
        return []
    table = load_negative_classes(run_id, epoch)
    rows = []
    for position in top_negatives(counts, top):
        row = {"position": int(position), **{name: int(v) for name, v in zip(MINING_COLUMNS, counts[position])}}
        row["confused_with"] = table.of(int(position)) if table is not None else []
        rows.append(row)
    return rows
