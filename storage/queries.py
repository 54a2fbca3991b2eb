"""Queries over the run store. Functions take a Session and never commit: the caller owns
the transaction (`with transaction(engine) as s:`)."""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from storage.schema import Dataset, EpochRow, ImageRow, ProjectionRow, Run, TripletRow
from storage.status import ACTIVE, FINISHED, RunStatus  # noqa: F401  (ACTIVE, FINISHED: the pages' names)


def list_datasets(session: Session) -> Sequence[Dataset]:
    return session.scalars(select(Dataset).order_by(Dataset.id)).all()


def get_dataset(session: Session, dataset_id: int) -> Dataset:
    """The dataset with this id; LookupError naming it when there is none."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise LookupError(f"dataset {dataset_id} does not exist")
    return dataset


def dataset_by_name(session: Session, name: str) -> Optional[Dataset]:
    return session.scalar(select(Dataset).where(Dataset.name == name))


class ImageRecord(NamedTuple):
    """One image of a dataset as the image table stores it."""

    position: int  # the image's row in the dataset's pixel array
    name: str  # its file name (a path inside a zip or folder)
    label: Optional[int]  # index into the dataset's classes; None when unlabeled
    split: str  # "train" or "test"


def dataset_image_table(session: Session, dataset_id: int) -> list[ImageRecord]:
    """Every image of a dataset, by position."""
    rows = session.execute(
        select(ImageRow.position, ImageRow.name, ImageRow.label, ImageRow.split)
        .where(ImageRow.dataset_id == dataset_id)
        .order_by(ImageRow.position)
    )
    return [ImageRecord(*row) for row in rows]


def image_records(session: Session, dataset_id: int, positions: Sequence[int]) -> list[ImageRecord]:
    """The images of a dataset at these positions (those that exist), by position: for a page
    that shows a few dozen of its images and needs no other row."""
    wanted = sorted({int(p) for p in positions})
    records: list[ImageRecord] = []
    for start in range(0, len(wanted), 900):  # within any database's limit of bound parameters
        rows = session.execute(
            select(ImageRow.position, ImageRow.name, ImageRow.label, ImageRow.split)
            .where(ImageRow.dataset_id == dataset_id, ImageRow.position.in_(wanted[start:start + 900]))
            .order_by(ImageRow.position)
        )
        records += [ImageRecord(*row) for row in rows]
    return records


def class_counts(session: Session, dataset_id: int, split: Optional[str] = None) -> dict[Optional[int], int]:
    """Images per label (of one split when given)."""
    query = select(ImageRow.label, func.count()).where(ImageRow.dataset_id == dataset_id)
    if split is not None:
        query = query.where(ImageRow.split == split)
    rows = session.execute(query.group_by(ImageRow.label))
    return {label: count for label, count in rows}


def get_run(session: Session, run_id: int) -> Run:
    """The run with this id; LookupError with the sentence every caller (the command line, the
    pages, the worker) shows when there is none."""
    run = session.get(Run, run_id)
    if run is None:
        raise LookupError(f"run {run_id} does not exist; `python -m core runs` lists them")
    return run


def list_runs(session: Session, dataset_id: Optional[int] = None) -> Sequence[Run]:
    query = select(Run).order_by(Run.id.desc())
    if dataset_id is not None:
        query = query.where(Run.dataset_id == dataset_id)
    return session.scalars(query).all()


def completed_runs(session: Session) -> Sequence[Run]:
    return session.scalars(
        select(Run).where(Run.status == RunStatus.COMPLETED).order_by(Run.id.desc())
    ).all()


def epoch_rows(session: Session, run_ids: Sequence[int]) -> Sequence[EpochRow]:
    return session.scalars(
        select(EpochRow).where(EpochRow.run_id.in_(run_ids)).order_by(EpochRow.run_id, EpochRow.epoch)
    ).all()


def triplet_rows(session: Session, run_id: int, epoch: int) -> Sequence[TripletRow]:
    return session.scalars(
        select(TripletRow)
        .where(TripletRow.run_id == run_id, TripletRow.epoch == epoch)
        .order_by(TripletRow.id)
    ).all()


def projection(session: Session, run_id: int, method: str, params_key: str) -> Optional[ProjectionRow]:
    return session.scalar(
        select(ProjectionRow).where(
            ProjectionRow.run_id == run_id,
            ProjectionRow.method == method,
            ProjectionRow.params_key == params_key,
        )
    )


def delete_run_rows(session: Session, run_id: int) -> None:
    for table in (TripletRow, EpochRow, ProjectionRow):
        session.execute(delete(table).where(table.run_id == run_id))
    session.execute(delete(Run).where(Run.id == run_id))
