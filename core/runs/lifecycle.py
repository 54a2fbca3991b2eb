"""The lifecycle of a run and of a projection job, in one place.

    queued → running → completed | failed | cancelled | interrupted      (a projection's
    interrupted | cancelled | failed → queued   (resume)                  'completed' is 'done')

A process that takes a queued row (`claim`) gets an ownership token. Every write it makes
afterwards is a compare-and-set on the row's id, status 'running' and that token (`hold`), in
the same transaction as what it writes: a worker that lost its row (it stalled past the
heartbeat window and was declared interrupted, it was cancelled while queued, the run was
deleted, or a resume took it over) updates no row, gets LostRun, and leaves without writing.
Everyone else (cancel, resume, the liveness check) also writes only through a compare-and-set
on the state they saw, so two of them never both win.

No torch and no streamlit here: pages, the command line and the worker all use this module.
"""
from __future__ import annotations

import os
import signal
import socket
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional, Union

from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session

from core.runs import launch
from storage.artifacts import process_alive
from storage.db import transaction
from storage.queries import ACTIVE
from storage.schema import ProjectionRow, Run, utcnow

RESUMABLE = ("interrupted", "cancelled", "failed")
STALE_AFTER = timedelta(seconds=60)
# a projection's process can hold the interpreter for a while in one numba call; a dead one is
# still seen at once through its pid
PROJECTION_STALE_AFTER = timedelta(seconds=180)

Table = Union[type[Run], type[ProjectionRow]]


class LostRun(Exception):
    """This process no longer owns the row: it must stop without writing anything."""


@dataclass(frozen=True)
class Holder:
    """What a process holds after `claim`: the row (table and id) and its ownership token."""

    table: Table
    row_id: int
    owner: str

    @property
    def what(self) -> str:
        return f"run {self.row_id}" if self.table is Run else f"projection {self.row_id}"


def claim(engine: Engine, table: Table, row_id: int, pid: Optional[int] = None) -> Holder:
    """Take a queued row: queued → running, with a new ownership token. LostRun when the row is
    gone or not queued (cancelled before it started, or another process took it first)."""
    owner = uuid.uuid4().hex
    now = utcnow()
    with transaction(engine) as session:
        result = session.execute(
            update(table).where(table.id == row_id, table.status == "queued")
            .values(status="running", owner=owner, pid=pid or os.getpid(), host=socket.gethostname(),
                    heartbeat_at=now, started_at=func.coalesce(table.started_at, now), finished_at=None)
        )
        if result.rowcount != 1:
            row = session.get(table, row_id)
            state = "does not exist" if row is None else f"is {row.status}, not queued"
            raise LostRun(f"{'run' if table is Run else 'projection'} {row_id} {state}")
    return Holder(table, row_id, owner)


def hold(session: Session, holder: Holder, **values) -> None:
    """Inside the caller's transaction, before anything else it writes: check that `holder`
    still owns its running row (and write `values` with a fresh heartbeat). LostRun otherwise,
    which rolls the caller's transaction back."""
    table = holder.table
    result = session.execute(
        update(table).where(table.id == holder.row_id, table.owner == holder.owner, table.status == "running")
        .values(heartbeat_at=utcnow(), **values)
    )
    if result.rowcount != 1:
        raise LostRun(f"{holder.what} is no longer this process's")


def update_held(engine: Engine, holder: Holder, **values) -> None:
    """`hold` in a transaction of its own: progress, phase, heartbeat."""
    with transaction(engine) as session:
        hold(session, holder, **values)


def finish(engine: Engine, holder: Holder, status: str, reason: Optional[str] = None, **values) -> bool:
    """running → status (completed/done, failed, cancelled), if `holder` still owns the row.
    False when it does not: then nothing was written."""
    try:
        with transaction(engine) as session:
            hold(session, holder, status=status, reason=reason, finished_at=utcnow(), phase=None, **values)
        return True
    except LostRun:
        return False


def still_held(engine: Engine, holder: Holder) -> Optional[bool]:
    """None when `holder` no longer owns its row; else whether a cancel was asked for."""
    with transaction(engine) as session:
        row = session.get(holder.table, holder.row_id)
        if row is None or row.owner != holder.owner or row.status != "running":
            return None
        return bool(row.cancel_requested)


def cancel(engine: Engine, table: Table, row_id: int, reason: str = "cancelled by the user") -> Optional[str]:
    """Stop a row: a queued one becomes cancelled at once (its worker, if it is starting, then
    fails to claim it and leaves); a running one gets the cancel flag and its process SIGTERM.
    Returns the row's status afterwards, None when it does not exist."""
    with transaction(engine) as session:
        row = session.get(table, row_id)
        if row is None:
            return None
        if row.status not in ACTIVE:
            return row.status
        pid, host, job_id = row.pid, row.host, row.job_id
        queued = session.execute(
            update(table).where(table.id == row_id, table.status == "queued")
            .values(status="cancelled", cancel_requested=True, finished_at=utcnow(),
                    reason="cancelled before it started")
        ).rowcount
        if not queued:
            session.execute(update(table).where(table.id == row_id, table.status == "running")
                            .values(cancel_requested=True))
    signal_process(pid, host)
    if job_id:
        launch.stop_job(job_id)
    with transaction(engine) as session:
        row = session.get(table, row_id)
        return None if row is None else row.status


def signal_process(pid: Optional[int], host: Optional[str], sig: int = signal.SIGTERM) -> None:
    """SIGTERM a worker on this machine: its whole group when it leads one (a worker started by
    the app), else the process alone (a command-line `train` shares its shell's group)."""
    if not pid or host != socket.gethostname() or pid == os.getpid():
        return  # a run of this very process stops through its cancel flag
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def requeue(session: Session, table: Table, row_id: int) -> bool:
    """interrupted | cancelled | failed → queued, with no owner (resume, or a map computed
    again). A compare-and-set: of two processes resuming at once, one gets True."""
    result = session.execute(
        update(table).where(table.id == row_id, table.status.in_(RESUMABLE))
        .values(status="queued", owner=None, reason=None, finished_at=None, cancel_requested=False, pid=None,
                job_id=None, phase=None, heartbeat_at=utcnow())
    )
    return result.rowcount == 1


def mark_dead(engine: Engine) -> int:
    """Active rows whose process has died become interrupted, with the reason; returns how many.
    Silent past the heartbeat window (a worker on another machine, or a stalled one), or a
    process on this machine that is gone. Each write is conditional on what was read, so a row
    that a worker updated in between is left alone."""
    now = utcnow()
    changed = 0
    here = socket.gethostname()
    for table, stale_after in ((Run, STALE_AFTER), (ProjectionRow, PROJECTION_STALE_AFTER)):
        with transaction(engine) as session:
            cutoff = now - stale_after
            silent = session.execute(
                update(table)
                .where(table.status.in_(ACTIVE), func.coalesce(table.heartbeat_at, table.created_at) < cutoff)
                .values(status="interrupted", finished_at=now,
                        reason=f"the worker stopped answering (no heartbeat for {int(stale_after.total_seconds())} s)")
            )
            changed += silent.rowcount or 0
            rows = session.execute(
                select(table.id, table.pid, table.status).where(
                    table.status.in_(ACTIVE), table.pid.is_not(None), table.host == here)
            ).all()
            for row_id, pid, status in rows:
                if process_alive(pid):
                    continue
                done = session.execute(
                    update(table).where(table.id == row_id, table.pid == pid, table.status == status)
                    .values(status="interrupted", finished_at=now,
                            reason="the worker process ended without finishing"
                            + (" the run" if table is Run else " the map"))
                )
                changed += done.rowcount or 0
    return changed + _mark_ended_jobs(engine, now)


def _mark_ended_jobs(engine: Engine, now) -> int:
    """Active rows whose Ray job has ended (failed, stopped behind the app's back, or exited
    without finishing) become interrupted, with the job and its status in the reason; a row the
    user cancelled, whose job Ray stopped before the worker could say so, becomes cancelled.
    When the cluster cannot be asked, nothing is decided here: the heartbeat rule holds."""
    changed = 0
    for table in (Run, ProjectionRow):
        with transaction(engine) as session:
            rows = session.execute(select(table.id, table.job_id, table.status, table.cancel_requested).where(
                table.status.in_(ACTIVE), table.job_id.is_not(None))).all()
        if not rows:
            continue
        states = launch.job_states([row[1] for row in rows])
        for row_id, job_id, status, cancelled in rows:
            if job_id not in states or states[job_id][0] not in launch.TERMINAL:
                continue
            job_status, message = states[job_id]
            detail = f": {message.splitlines()[0][:200]}" if message else ""
            values = (dict(status="cancelled", reason=f"cancelled by the user; its Ray job {job_id} was stopped")
                      if cancelled else
                      dict(status="interrupted", reason=f"its Ray job {job_id} ended {job_status.lower()}{detail}"))
            with transaction(engine) as session:
                done = session.execute(
                    update(table).where(table.id == row_id, table.job_id == job_id, table.status == status)
                    .values(finished_at=now, **values))
                changed += done.rowcount or 0
    return changed
