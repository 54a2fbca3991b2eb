"""Queries over the run store. Functions take a Session and never commit: the caller owns
the transaction (`with transaction(engine) as s:`)."""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from storage.schema import Dataset, DatasetVersion, EpochRow, ImageEdit, ImageRow, ProjectionRow, Run, TripletRow
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
    """One image of a dataset as a version of it holds it (version 1: as the image table stores it)."""

    position: int  # the image's row in the dataset's pixel array
    name: str  # its file name (a path inside a zip or folder)
    label: Optional[int]  # index into the dataset's classes; None when unlabeled
    split: str  # "train" or "test"
    excluded: bool = False  # left out of training and of the metrics by the version
    tags: tuple[str, ...] = ()  # the version's tags of the image, oldest first


def version_rows(session: Session, dataset_id: int) -> Sequence[DatasetVersion]:
    """The dataset's stored versions, by number (version 1's row may be missing in a dataset
    written straight into the tables; version 1 exists all the same: it is the imported images)."""
    return session.scalars(select(DatasetVersion).where(DatasetVersion.dataset_id == dataset_id)
                           .order_by(DatasetVersion.version)).all()


def version_lineage(session: Session, dataset_id: int, version: int) -> list[DatasetVersion]:
    """The versions whose edits make `version`, oldest first (version 1, the imported images,
    has none; [] for it). LookupError when the dataset has no such version."""
    if version == 1:
        return []
    rows = {row.version: row for row in version_rows(session, dataset_id)}
    lineage = []
    current: Optional[int] = version
    while current is not None and current != 1:
        row = rows.get(current)
        if row is None or len(lineage) > len(rows):
            raise LookupError(f"dataset {dataset_id} has no version {version}")
        lineage.append(row)
        current = row.parent
    return lineage[::-1]


def version_edits(session: Session, dataset_id: int, version: int) -> list[ImageEdit]:
    """Every edit that makes `version` from the imported images, in the order they apply."""
    lineage = version_lineage(session, dataset_id, version)
    if not lineage:
        return []
    order = {row.id: i for i, row in enumerate(lineage)}
    edits = session.scalars(select(ImageEdit).where(ImageEdit.version_id.in_(order))).all()
    return sorted(edits, key=lambda edit: (order[edit.version_id], edit.id))


def dataset_image_table(session: Session, dataset_id: int, version: int = 1) -> list[ImageRecord]:
    """Every image of a dataset, by position, as `version` holds it: the imported rows with the
    version's edits (and its parents') applied. LookupError for a version the dataset lacks."""
    edits = version_edits(session, dataset_id, version)
    rows = session.execute(
        select(ImageRow.position, ImageRow.name, ImageRow.label, ImageRow.split)
        .where(ImageRow.dataset_id == dataset_id)
        .order_by(ImageRow.position)
    )
    table = [ImageRecord(*row) for row in rows]
    if not edits:
        return table
    at = {record.position: i for i, record in enumerate(table)}
    for edit in edits:
        i = at.get(edit.position)
        if i is None:
            continue  # written by hand for an image that is not there: nothing to apply it to
        if edit.kind == "relabel":
            table[i] = table[i]._replace(label=edit.label)
        elif edit.kind == "exclude":
            table[i] = table[i]._replace(excluded=True)
        elif edit.kind == "tag" and edit.tag not in table[i].tags:
            table[i] = table[i]._replace(tags=table[i].tags + (edit.tag,))
    return table


def dataset_image_hashes(session: Session, dataset_id: int) -> list[str]:
    """Every image's content hash (sha256), by position: what two datasets' images are matched by."""
    return list(session.scalars(
        select(ImageRow.sha256).where(ImageRow.dataset_id == dataset_id).order_by(ImageRow.position)
    ))


def class_counts(session: Session, dataset_id: int, split: Optional[str] = None,
                 version: int = 1) -> dict[Optional[int], int]:
    """Images per label (of one split when given) that `version` uses (its excluded ones left out)."""
    if version != 1:
        counts: dict[Optional[int], int] = {}
        for image in dataset_image_table(session, dataset_id, version):
            if not image.excluded and (split is None or image.split == split):
                counts[image.label] = counts.get(image.label, 0) + 1
        return counts
    query = select(ImageRow.label, func.count()).where(ImageRow.dataset_id == dataset_id)
    if split is not None:
        query = query.where(ImageRow.split == split)
    rows = session.execute(query.group_by(ImageRow.label))
    return {label: count for label, count in rows}


def image_records(session: Session, dataset_id: int, positions: Sequence[int], version: int = 1) -> list[ImageRecord]:
    """The images of a dataset at these positions (those that exist), by position, with the labels
    of `version`: for a page that shows a few dozen of its images and needs no other row."""
    wanted = sorted({int(p) for p in positions})
    if version != 1:  # the version's edits apply over the whole lineage: read its table
        table = dataset_image_table(session, dataset_id, version)
        return [table[p] for p in wanted if 0 <= p < len(table)]
    records: list[ImageRecord] = []
    for start in range(0, len(wanted), 900):  # within any database's limit of bound parameters
        rows = session.execute(
            select(ImageRow.position, ImageRow.name, ImageRow.label, ImageRow.split)
            .where(ImageRow.dataset_id == dataset_id, ImageRow.position.in_(wanted[start:start + 900]))
            .order_by(ImageRow.position)
        )
        records += [ImageRecord(*row) for row in rows]
    return records


def run_image_table(session: Session, run: Run) -> list[ImageRecord]:
    """The run's dataset as the version it ran on holds it: what every reader of a run's labels,
    splits and excluded images uses, so edits made after the run never change what it shows."""
    return dataset_image_table(session, run.dataset_id, run.dataset_version)


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
