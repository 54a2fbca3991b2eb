"""The lifecycle of a run and of a projection job, in one place: the only module that writes a
status (storage.status names them).

    queued → running → completed | failed | cancelled | interrupted      (a projection's
    interrupted | cancelled | failed → queued   (resume)                  'completed' is 'done')

Each transition is a function of its own, a compare-and-set on the state it expects:
`create` (a new queued row), `claim` (queued → running, with an ownership token), `complete`,
`fail`, `end_cancelled`, `interrupt_held` (running → an end, by the owner), `fail_to_start`
(queued → failed, its process could not be started), `cancel` (the user: queued → cancelled, or
running → the cancel flag), `take_over` (a dead active row → interrupted, recorded) and `requeue`
(interrupted | cancelled | failed → queued).

A process that takes a queued row (`claim`) gets an ownership token. Every write it makes
afterwards is a compare-and-set on the row's id, status 'running' and that token (`hold`), in
the same transaction as what it writes: a worker that lost its row (it stalled past the
heartbeat window and a resume took it over, it was cancelled while queued, the run was deleted)
updates no row, gets LostRun, and leaves without writing. Everyone else (cancel, resume) also
writes only through a compare-and-set on the state they saw, so two of them never both win.

Liveness is derived on read, never written by a reader: a queued or running row whose heartbeat
is older than the window, whose process on this machine is gone, or whose Ray job has ended,
*reads* as interrupted (or cancelled) with the reason, whoever loads it (the ORM's load event,
`observe`), while the database still holds what the worker last wrote. So showing a page or
listing runs writes nothing and never waits on a worker's lock. The takeover of such a row is
written where work is claimed: `requeue` (a resume, a map computed again) first records it as
interrupted with its reason (`take_over`), in the same transaction. A stalled worker that wakes
before anyone took its row over simply goes on, and its row reads running again.

No torch and no streamlit here: pages, the command line and the worker all use this module.
"""
from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Optional, Union

from sqlalchemy import Engine, event, func, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from core.runs import launch
from storage.artifacts import process_alive
from storage.db import transaction
from storage.schema import ProjectionRow, Run, utcnow
from storage.status import ACTIVE, FINISHED, RESUMABLE, RunStatus  # noqa: F401  (FINISHED: for callers)

STALE_AFTER = timedelta(seconds=60)
# a projection's process can hold the interpreter for a while in one numba call; a dead one is
# still seen at once through its pid
PROJECTION_STALE_AFTER = timedelta(seconds=180)
# how long a Ray job's state, once asked, answers the reads that follow (pages poll every second)
JOB_STATE_SECONDS = 2.0

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


def completed_status(table: Table) -> RunStatus:
    """What `table` stores for a row whose work ended well: completed (a run), done (a map)."""
    return RunStatus.COMPLETED if table is Run else RunStatus.DONE


def create(session: Session, row: Union[Run, ProjectionRow]) -> Union[Run, ProjectionRow]:
    """A new row, queued, in the caller's transaction (flushed: its id is set); returns it."""
    row.status = RunStatus.QUEUED
    session.add(row)
    session.flush()
    return row


class NotYourTurn(Exception):
    """The machine's job slots are taken, or other jobs wait before this one (core.runs.queue)."""


def claim(engine: Engine, table: Table, row_id: int, pid: Optional[int] = None, in_turn: bool = False) -> Holder:
    """Take a queued row: queued → running, with a new ownership token. LostRun when the row is
    gone or not queued (cancelled before it started, or another process took it first).
    in_turn: only when the machine's queue says it is the row's turn (core.runs.queue.admit, in
    this same transaction); NotYourTurn otherwise, and nothing is written."""
    owner = uuid.uuid4().hex
    now = utcnow()
    with transaction(engine) as session:
        if in_turn:
            from core.runs.queue import admit

            if not admit(session, table, row_id):
                raise NotYourTurn(f"{'run' if table is Run else 'projection'} {row_id} waits for a free slot")
        result = session.execute(
            update(table).where(table.id == row_id, table.status == RunStatus.QUEUED)
            .values(status=RunStatus.RUNNING, owner=owner, pid=pid or os.getpid(), host=socket.gethostname(),
                    heartbeat_at=now, started_at=func.coalesce(table.started_at, now), finished_at=None)
        )
        if result.rowcount != 1:
            stored = session.execute(select(table.status).where(table.id == row_id)).scalar()
            state = "does not exist" if stored is None else f"is {stored}, not queued"
            raise LostRun(f"{'run' if table is Run else 'projection'} {row_id} {state}")
    return Holder(table, row_id, owner)


def hold(session: Session, holder: Holder, **values) -> None:
    """Inside the caller's transaction, before anything else it writes: check that `holder`
    still owns its running row (and write `values`, never a status, with a fresh heartbeat).
    LostRun otherwise, which rolls the caller's transaction back."""
    if "status" in values:
        raise TypeError("hold writes progress, not a status: use complete, fail, end_cancelled or interrupt_held")
    _hold(session, holder, **values)


def _hold(session: Session, holder: Holder, **values) -> None:
    table = holder.table
    result = session.execute(
        update(table).where(table.id == holder.row_id, table.owner == holder.owner, table.status == RunStatus.RUNNING)
        .values(heartbeat_at=utcnow(), **values)
    )
    if result.rowcount != 1:
        raise LostRun(f"{holder.what} is no longer this process's")


def update_held(engine: Engine, holder: Holder, **values) -> None:
    """`hold` in a transaction of its own: progress, phase, heartbeat."""
    with transaction(engine) as session:
        hold(session, holder, **values)


def complete(session: Session, holder: Holder, **values) -> None:
    """running → completed (a run) or done (a map), with `values` (its results), inside the
    caller's transaction, so what it moves into place in that transaction is the owner's.
    LostRun when `holder` no longer owns the row."""
    _hold(session, holder, status=completed_status(holder.table), reason=None, finished_at=utcnow(), phase=None,
          **values)


def _end(engine: Engine, holder: Holder, status: RunStatus, reason: str) -> bool:
    try:
        with transaction(engine) as session:
            _hold(session, holder, status=status, reason=reason, finished_at=utcnow(), phase=None)
        return True
    except LostRun:
        return False


def fail(engine: Engine, holder: Holder, reason: str) -> bool:
    """running → failed with the reason, if `holder` still owns the row; False (nothing
    written) when it does not."""
    return _end(engine, holder, RunStatus.FAILED, reason)


def end_cancelled(engine: Engine, holder: Holder, reason: str = "cancelled by the user") -> bool:
    """running → cancelled: the owner stops at a cancel it was asked for. False as `fail`."""
    return _end(engine, holder, RunStatus.CANCELLED, reason)


def interrupt_held(engine: Engine, holder: Holder, reason: str) -> bool:
    """running → interrupted: the owner cannot go on for a cause outside the run (the database
    could not be reached); resumable like any interrupted run. False as `fail`."""
    return _end(engine, holder, RunStatus.INTERRUPTED, reason)


def still_held(engine: Engine, holder: Holder) -> Optional[bool]:
    """None when `holder` no longer owns its row; else whether a cancel was asked for. Reads the
    stored row, not its derived liveness: an owner alive enough to ask is not dead."""
    table = holder.table
    with transaction(engine) as session:
        row = session.execute(select(table.owner, table.status, table.cancel_requested)
                              .where(table.id == holder.row_id)).first()
    if row is None or row.owner != holder.owner or row.status != RunStatus.RUNNING:
        return None
    return bool(row.cancel_requested)


def fail_to_start(session: Session, table: Table, reason: str, *where) -> int:
    """queued → failed for the rows `where` selects (beside id/status conditions the caller
    gives), whose process could not be started (the cluster refused the job); how many."""
    result = session.execute(update(table).where(table.status == RunStatus.QUEUED, *where)
                             .values(status=RunStatus.FAILED, reason=reason, finished_at=utcnow()))
    return result.rowcount or 0


def cancel(engine: Engine, table: Table, row_id: int, reason: str = "cancelled by the user") -> Optional[str]:
    """Stop a row: a queued one becomes cancelled at once (its worker, if it is starting, then
    fails to claim it and leaves); a running one gets the cancel flag and its process SIGTERM.
    Returns the row's status afterwards (as read: a dead one reads interrupted), None when it
    does not exist. DatabaseBusy (a sentence) when another process holds the row's lock too long."""
    label = f"run {row_id}" if table is Run else f"projection {row_id}"
    with transaction(engine, what=f"cancel {label}") as session:
        # the stored state, not the derived one: a queued row whose process just died (a cancel
        # of its sibling row stopped it) is still cancelled, as the user asked
        row = session.execute(select(table.status, table.pid, table.host, table.job_id)
                              .where(table.id == row_id)).first()
        if row is None:
            return None
        if row.status not in ACTIVE:
            return row.status
        pid, host, job_id = row.pid, row.host, row.job_id
        queued = session.execute(
            update(table).where(table.id == row_id, table.status == RunStatus.QUEUED)
            .values(status=RunStatus.CANCELLED, cancel_requested=True, finished_at=utcnow(),
                    reason="cancelled before it started")
        ).rowcount
        if not queued:
            session.execute(update(table).where(table.id == row_id, table.status == RunStatus.RUNNING)
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


def take_over(session: Session, table: Table, row_id: int) -> Optional[str]:
    """Record a dead active row (see `liveness`) as interrupted (or cancelled, a cancelled Ray
    job) with its reason, in the caller's transaction; returns the status written, None when the
    row is not dead. A compare-and-set on what was read (status, owner, pid and heartbeat), so a
    worker that beat in between keeps its row."""
    stored = session.execute(select(*_liveness_columns(table)).where(table.id == row_id)).first()
    if stored is None:
        return None
    verdict = liveness(table, *stored[1:])
    if verdict is None:
        return None
    status, reason = verdict
    result = session.execute(
        update(table).where(
            table.id == row_id, table.status == stored.status, table.owner.is_not_distinct_from(stored.owner),
            table.pid.is_not_distinct_from(stored.pid), table.heartbeat_at.is_not_distinct_from(stored.heartbeat_at))
        .values(status=status, reason=reason, finished_at=utcnow())
    )
    return status if result.rowcount == 1 else None


def requeue(session: Session, table: Table, row_id: int) -> bool:
    """interrupted | cancelled | failed → queued, with no owner (resume, or a map computed
    again); a row whose worker is dead is taken over first (`take_over`). A compare-and-set: of
    two processes resuming at once, one gets True."""
    take_over(session, table, row_id)
    result = session.execute(
        update(table).where(table.id == row_id, table.status.in_(RESUMABLE))
        .values(status=RunStatus.QUEUED, owner=None, reason=None, finished_at=None, cancel_requested=False,
                pid=None, job_id=None, phase=None, heartbeat_at=utcnow())
    )
    return result.rowcount == 1


# -- liveness, derived on read -------------------------------------------------------------------

def _liveness_columns(table: Table) -> tuple:
    return (table.owner, table.status, table.heartbeat_at, table.created_at, table.pid, table.host, table.job_id,
            table.cancel_requested)


def liveness(table: Table, status: Optional[str], heartbeat_at: Optional[datetime], created_at: Optional[datetime],
             pid: Optional[int], host: Optional[str], job_id: Optional[str], cancel_requested: Optional[bool],
             now: Optional[datetime] = None) -> Optional[tuple[RunStatus, str]]:
    """(status, reason) a queued or running row reads as when its worker is dead; None when it
    is alive or not active. Dead: no heartbeat for the window (a worker on another machine, or a
    stalled one), a process on this machine that is gone, or a Ray job that has ended (a cancel
    the user asked for then reads cancelled). Asks processes and the cluster, writes nothing."""
    if status not in ACTIVE:
        return None
    verdict = _dead(table, heartbeat_at, created_at, pid, host, job_id, cancelled=bool(cancel_requested), now=now)
    if verdict is not None and cancel_requested and verdict[0] is RunStatus.INTERRUPTED:
        # the user asked it to stop and it stopped: a cancel, whether or not it lived to say so
        # (a Ray job's stop kills a worker that has not reached its next cancel check)
        return RunStatus.CANCELLED, f"cancelled by the user; {verdict[1]}"
    return verdict


def _dead(table: Table, heartbeat_at: Optional[datetime], created_at: Optional[datetime], pid: Optional[int],
          host: Optional[str], job_id: Optional[str], cancelled: bool,
          now: Optional[datetime]) -> Optional[tuple[RunStatus, str]]:
    """(status, reason) of an active row whose worker is dead (see `liveness`); None when alive."""
    now = now or utcnow()
    stale_after = STALE_AFTER if table is Run else PROJECTION_STALE_AFTER
    last_sign = heartbeat_at or created_at
    if last_sign is not None and last_sign < now - stale_after:
        return RunStatus.INTERRUPTED, (f"the worker stopped answering (no heartbeat for "
                                       f"{int(stale_after.total_seconds())} s)")
    if pid is not None and host == socket.gethostname() and not process_alive(pid):
        return RunStatus.INTERRUPTED, ("the worker process ended without finishing"
                                       + (" the run" if table is Run else " the map"))
    if job_id:
        state = _job_state(job_id)
        if state is not None and state[0] in launch.TERMINAL:
            job_status, message = state
            if cancelled:
                return RunStatus.CANCELLED, f"cancelled by the user; its Ray job {job_id} was stopped"
            lines = message.strip().splitlines() or [""]
            # the first line; a failed job's then its log's last lines (bounded: launch.failure_message)
            tail = lines[1:] if job_status == "FAILED" else []
            detail = (f": {lines[0][:600]}" if lines[0] else "") + "".join(f"\n{line}" for line in tail)
            return RunStatus.INTERRUPTED, f"its Ray job {job_id} ended {job_status.lower()}{detail}"
    return None


_job_states: dict[str, tuple[float, Optional[tuple[str, str]]]] = {}


def _job_state(job_id: str) -> Optional[tuple[str, str]]:
    """(status, message) of a Ray job, asked at most every JOB_STATE_SECONDS, and never again once
    it has ended (a failed job's log is fetched once); None when the cluster cannot tell (then the
    heartbeat decides)."""
    now = time.monotonic()
    asked = _job_states.get(job_id)
    ended = asked is not None and asked[1] is not None and asked[1][0] in launch.TERMINAL
    if not ended and (asked is None or now - asked[0] > JOB_STATE_SECONDS):
        asked = (now, launch.job_states([job_id]).get(job_id))
        _job_states[job_id] = asked
    return asked[1]


def observe(row: Union[Run, ProjectionRow, None]) -> Union[Run, ProjectionRow, None]:
    """Make a loaded row read as its liveness says (status, reason, and its end at its last
    heartbeat) without marking anything to be written: the session never flushes these values.
    Every Run and ProjectionRow loaded through the ORM passes here (the load event below)."""
    if row is None:
        return row
    state = row.__dict__
    if state.get("status") not in ACTIVE or "heartbeat_at" not in state:
        return row
    verdict = liveness(type(row), state.get("status"), state.get("heartbeat_at"), state.get("created_at"),
                       state.get("pid"), state.get("host"), state.get("job_id"), state.get("cancel_requested"))
    if verdict is not None:
        status, reason = verdict
        set_committed_value(row, "status", status.value)  # a plain string, as the database gives
        set_committed_value(row, "reason", reason)
        set_committed_value(row, "finished_at", state.get("heartbeat_at") or state.get("created_at"))
    return row


@event.listens_for(Run, "load")
@event.listens_for(ProjectionRow, "load")
def _derive_on_load(row, _context) -> None:
    observe(row)


@event.listens_for(Run, "refresh")
@event.listens_for(ProjectionRow, "refresh")
def _derive_on_refresh(row, _context, _attributes) -> None:
    observe(row)
