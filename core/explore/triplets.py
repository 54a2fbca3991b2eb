"""A run's inspected triplets as stored (torch-free): what the Triplets page shows and
`python -m core triplets` prints. The rows are made by the run's loss (core.metric.inspector) on each
epoch's last batch, while it trains."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

from sqlalchemy.engine import Engine

from core.metric.categories import CATEGORIES, PairKind
from storage import queries
from storage.db import transaction
from storage.schema import Run

ORDER = [*reversed(CATEGORIES), *(k.value for k in PairKind)]  # hard first
FIELDS = ("epoch", "anchor", "positive", "negative", "d_ap", "d_an", "margin", "category", "loss", "weight",
          "from_memory")


def inspected_rows(engine: Engine, run_id: int, epoch: Optional[int] = None) -> list[dict]:
    """The stored rows of `epoch` (default: the run's last stored one), hard first, each a dict
    of FIELDS (from_memory: True when the negative came from the run's cross-batch memory, an
    earlier batch; None without a memory). LookupError / ValueError with a sentence when the run or the epoch has none."""
    with transaction(engine) as session:
        run = session.get(Run, run_id)
        if run is None:
            raise LookupError(f"there is no run {run_id}")
        if run.kind != "train":
            raise ValueError(f"run {run_id} embeds with a loaded encoder: it trained nothing, so nothing was mined")
        epochs = [row.epoch for row in queries.epoch_rows(session, [run_id])]
        if not epochs:
            raise LookupError(f"run {run_id} has not finished an epoch yet")
        if epoch is None:
            epoch = epochs[-1]
        elif epoch not in epochs:
            raise LookupError(f"run {run_id} has no epoch {epoch}; its stored epochs are {epochs[0]} to {epochs[-1]}")
        margin = run.config.get("margin")
        rows = [{"epoch": epoch, "anchor": t.anchor, "positive": t.positive, "negative": t.negative, "d_ap": t.d_ap,
                 "d_an": t.d_an, "margin": margin, "category": t.category, "loss": t.loss, "weight": t.weight,
                 "from_memory": t.from_memory}
                for t in queries.triplet_rows(session, run_id, epoch)]
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(rows, key=lambda r: rank.get(r["category"], len(rank)))


@dataclass(frozen=True)
class EpochCounts:
    """One stored epoch: the valid triplets of its batches per category (counted, not listed), and
    the histogram of d(A,P) − d(A,N) over random triplets of its last batch ({edges, counts}; None
    in runs that did not store one). memory: with a cross-batch memory, of those counts the triplets
    whose negative came from the memory, {"easy", "semi-hard", "hard"}; None for a run without one."""

    epoch: int
    hard: int
    semi_hard: int
    easy: int
    gap_histogram: Optional[dict]
    memory: Optional[dict] = None

    @property
    def total(self) -> int:
        return self.hard + self.semi_hard + self.easy


@dataclass(frozen=True)
class TripletsRun:
    """What the Triplets page shows of a run: its config, its dataset's class names and its
    stored epochs in order. (The labels of the images it shows: image_labels.)"""

    run_id: int
    config: dict
    dataset_id: int
    classes: list[str]
    epochs: list[EpochCounts]
    dataset_version: int = 1  # the version of the dataset it ran on, whose labels image_labels reads


def triplets_run(engine: Engine, run_id: int) -> TripletsRun:
    """LookupError (storage.queries.get_run's sentence) when there is no such run."""
    with transaction(engine) as session:
        run = queries.get_run(session, run_id)
        epochs = [EpochCounts(e.epoch, e.hard, e.semi_hard, e.easy, e.gap_histogram,
                              None if e.memory_counts is None else dict(e.memory_counts))
                  for e in queries.epoch_rows(session, [run_id])]
        return TripletsRun(run_id, dict(run.config), run.dataset_id, list(run.dataset.classes), epochs,
                           run.dataset_version)


def image_labels(engine: Engine, dataset_id: int, positions: Iterable[int],
                 version: int = 1) -> dict[int, Optional[int]]:
    """{position: label (None: unlabeled)} of these images alone. The page shows a few dozen of a
    dataset's images: reading every label of Fashion-MNIST's 70,000 took 0.7 s of the page's 1.5 s
    on an idle machine, and 5-10 times that beside a training run."""
    with transaction(engine) as session:
        return {image.position: image.label
                for image in queries.image_records(session, dataset_id, list(positions), version)}
