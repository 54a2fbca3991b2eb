"""The stored datasets as the pages list and show them, as plain data read in one transaction."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from sqlalchemy import Engine, select

from storage import queries
from storage.db import transaction
from storage.queries import ImageRecord
from storage.schema import Dataset, DatasetVersion


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
    versions: tuple[int, ...] = (1,)  # its versions, ascending (core.data.versions)

    @property
    def labeled(self) -> bool:
        return len(self.classes) > 0


    @property
    def refs(self) -> list[str]:
        """How a form offers it: its name (the newest version), then NAME@VERSION for each version
        when it has more than one."""
        return [self.name] + ([f"{self.name}@{v}" for v in self.versions] if len(self.versions) > 1 else [])


def _summary(dataset: Dataset, versions: tuple[int, ...] = (1,)) -> DatasetSummary:
    return DatasetSummary(dataset.id, dataset.name, dataset.n_images, dataset.image_size, dataset.channels,
                          tuple(dataset.classes), dataset.cache_key, versions)


def dataset_summaries(engine: Engine) -> list[DatasetSummary]:
    """Every stored dataset, oldest first."""
    with transaction(engine) as session:
        versions: dict[int, set[int]] = {}
        for dataset_id, number in session.execute(select(DatasetVersion.dataset_id, DatasetVersion.version)):
            versions.setdefault(dataset_id, set()).add(number)
        return [_summary(dataset, tuple(sorted({1} | versions.get(dataset.id, set()))))
                for dataset in queries.list_datasets(session)]


def dataset_cache_key(engine: Engine, dataset_id: int) -> str:
    """The dataset's cache key; LookupError when there is none."""
    with transaction(engine) as session:
        return queries.get_dataset(session, dataset_id).cache_key


@dataclass(frozen=True)
class DatasetContents:
    """images: every image, by position, as the version holds it (excluded ones too, marked);
    counts: images per label that the version uses (None: unlabeled)."""

    images: list[ImageRecord]
    counts: dict[Optional[int], int]


def dataset_contents(engine: Engine, dataset_id: int, version: int = 1) -> DatasetContents:
    """The dataset as `version` holds it (1: as imported; core.data.versions); LookupError for a
    version it does not have."""
    with transaction(engine) as session:
        return DatasetContents(queries.dataset_image_table(session, dataset_id, version),
                               queries.class_counts(session, dataset_id, version=version))
