"""Queries over the run store. Functions take a Session and never commit: the caller owns
the transaction (`with transaction(engine) as s:`)."""
from __future__ import annotations

from datetime import datetime, timedelta
from typing import Optional, Sequence

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from storage.schema import Dataset, EpochRow, ImageRow, ProjectionRow, Run, TripletRow, utcnow

ACTIVE = ("queued", "running")
FINISHED = ("completed", "failed", "cancelled", "interrupted")


def list_datasets(session: Session) -> Sequence[Dataset]:
    return session.scalars(select(Dataset).order_by(Dataset.id)).all()


def dataset_by_name(session: Session, name: str) -> Optional[Dataset]:
    return session.scalar(select(Dataset).where(Dataset.name == name))


def dataset_image_table(session: Session, dataset_id: int) -> list[tuple[int, str, Optional[int], str]]:
    """(position, name, label, split) for every image of a dataset, by position."""
    rows = session.execute(
        select(ImageRow.position, ImageRow.name, ImageRow.label, ImageRow.split)
        .where(ImageRow.dataset_id == dataset_id)
        .order_by(ImageRow.position)
    )
    return [tuple(row) for row in rows]


def class_counts(session: Session, dataset_id: int) -> dict[Optional[int], int]:
    rows = session.execute(
        select(ImageRow.label, func.count())
        .where(ImageRow.dataset_id == dataset_id)
        .group_by(ImageRow.label)
    )
    return {label: count for label, count in rows}


def list_runs(session: Session, dataset_id: Optional[int] = None) -> Sequence[Run]:
    query = select(Run).order_by(Run.id.desc())
    if dataset_id is not None:
        query = query.where(Run.dataset_id == dataset_id)
    return session.scalars(query).all()


def completed_runs(session: Session) -> Sequence[Run]:
    return session.scalars(
        select(Run).where(Run.status == "completed").order_by(Run.id.desc())
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


def projection_running(session: Session, run_id: int, method: str, params: dict, params_key: str,
                       path: Optional[str] = None) -> ProjectionRow:
    """The projection row for these parameters (made if missing), marked running."""
    row = projection(session, run_id, method, params_key)
    if row is None:
        row = ProjectionRow(run_id=run_id, method=method, params_key=params_key, params=params)
        session.add(row)
    row.status, row.reason = "running", None
    if path is not None:
        row.path = path
    return row


def mark_silent_runs(session: Session, stale_after: timedelta, now: Optional[datetime] = None) -> int:
    """Active runs whose worker stopped beating become 'interrupted'; returns how many."""
    now = now or utcnow()
    cutoff = now - stale_after
    silent = (
        (Run.status.in_(ACTIVE))
        & (func.coalesce(Run.heartbeat_at, Run.created_at) < cutoff)
    )
    result = session.execute(
        update(Run)
        .where(silent)
        .values(
            status="interrupted",
            finished_at=now,
            reason=f"the worker stopped answering (no heartbeat for {int(stale_after.total_seconds())} s)",
        )
    )
    return result.rowcount or 0


def delete_run_rows(session: Session, run_id: int) -> None:
    for table in (TripletRow, EpochRow, ProjectionRow):
        session.execute(delete(table).where(table.run_id == run_id))
    session.execute(delete(Run).where(Run.id == run_id))
