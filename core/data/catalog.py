"""The stored datasets as the pages list and show them, as plain data read in one transaction."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from sqlalchemy import Engine

from storage import queries
from storage.db import transaction
from storage.queries import ImageRecord
from storage.schema import Dataset


@dataclass(frozen=True)
class DatasetSummary:
    """A dataset row: its size, image shape (image_size × image_size pixels, channels 1 or 3)
    and class names ([] when unlabeled)."""

    id: int
    name: str
    n_images: int
    image_size: int
    channels: int
    classes: tuple[str, ...]
    cache_key: str  # names this dataset and no other (Dataset.cache_key)

    @property
    def labeled(self) -> bool:
        return len(self.classes) > 0


def _summary(dataset: Dataset) -> DatasetSummary:
    return DatasetSummary(dataset.id, dataset.name, dataset.n_images, dataset.image_size, dataset.channels,
                          tuple(dataset.classes), dataset.cache_key)


def dataset_summaries(engine: Engine) -> list[DatasetSummary]:
    """Every stored dataset, oldest first."""
    with transaction(engine) as session:
        return [_summary(dataset) for dataset in queries.list_datasets(session)]


def dataset_cache_key(engine: Engine, dataset_id: int) -> str:
    """The dataset's cache key; LookupError when there is none."""
    with transaction(engine) as session:
        return queries.get_dataset(session, dataset_id).cache_key


@dataclass(frozen=True)
class DatasetContents:
    """images: every image, by position; counts: images per label (None: unlabeled)."""

    images: list[ImageRecord]
    counts: dict[Optional[int], int]


def dataset_contents(engine: Engine, dataset_id: int) -> DatasetContents:
    with transaction(engine) as session:
        return DatasetContents(queries.dataset_image_table(session, dataset_id),
                               queries.class_counts(session, dataset_id))
