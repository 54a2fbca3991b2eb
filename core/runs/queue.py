"""One queue for the machine's jobs: at most max_jobs() processes work at once (training and
embedding runs, and the map jobs of a run), the others wait, queued, and start by themselves in
order when a slot frees, whether the app is open or not.

There is no scheduler to keep alive: each job's process is started at once, as before, and waits
for its turn itself, light (no torch imported yet), beating its queued rows so they read alive.
Its turn comes when fewer than max_jobs() processes hold a running row and fewer than the free
slots wait before it (in the order the rows were queued); `lifecycle.claim` decides that and takes
the row in one transaction, under a lock (SQLite's write lock, taken by the transaction's first
write; an advisory lock on PostgreSQL), so two processes never take the last slot together. A
worker that dies frees its slot when its row reads dead (core.runs.lifecycle.liveness), and a
queued run cancelled before its turn stops its waiting process, so it never starts.

With a Ray cluster set (core.runs.launch), jobs go to the cluster as before: it queues them.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Optional, Union

from sqlalchemy import Engine, select, text, update
from sqlalchemy.orm import Session

from core.threads import affinity_cores
from storage.schema import ProjectionRow, Run, utcnow
from storage.status import ACTIVE, RunStatus

MAX_JOBS_ENV = "EMBEDDING_LAB_MAX_JOBS"
POLL_SECONDS = 1.0
BEAT_SECONDS = 10.0  # a waiting process's heartbeat on its queued rows (STALE_AFTER is 60 s)
_LOCK_KEY = 0x656C6162  # PostgreSQL advisory lock of the queue ("elab")

Table = Union[type[Run], type[ProjectionRow]]


def max_jobs() -> int:
    """Processes that may work at once: EMBEDDING_LAB_MAX_JOBS (the app copies its secrets into
    the environment), else one per core this process may use. ValueError with a sentence for a
    value that is not a whole number >= 1."""
    raw = (os.environ.get(MAX_JOBS_ENV) or "").strip()
    if not raw:
        return affinity_cores()
    if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
        raise ValueError(f"{MAX_JOBS_ENV} must be a whole number >= 1 (jobs at once), got {raw!r}")
    return int(raw)


def queue_applies() -> bool:
    """Whether jobs wait here: not when they go to a Ray cluster, which queues them itself."""
    from core.runs.launch import ray_address

    return ray_address() is None


@dataclass(frozen=True)
class Place:
    """Where a queued job stands: `ahead` processes wait before it; `busy` of `slots` work now."""

    ahead: int
    busy: int
    slots: int

    @property
    def turn(self) -> bool:
        return self.busy < self.slots and self.ahead < self.slots - self.busy

    def sentence(self) -> str:
        if self.turn:
            return f"starting: a slot is free ({self.busy} of {self.slots} busy)"
        waiting = "next in line" if self.ahead == 0 else f"{self.ahead} job{'s' * (self.ahead != 1)} ahead of it"
        return f"waiting for a free slot: {waiting}, {self.busy} of {self.slots} slots busy"


def _key(host: Optional[str], pid: Optional[int], table: Table, row_id: int) -> tuple:
    """A job is a process: its rows share one place (a map job's statistics, map and evolution).
    A row with no process yet (its launch has not written the pid) waits for none: it has no
    place until its process shows up."""
    return ("process", host, pid) if pid is not None else ("row", table.__tablename__, row_id)


def places(session: Session) -> dict[tuple, Place]:
    """{(table name, row id): Place} of every queued row that reads alive, from one read of the
    active rows (their status derived on load: a dead worker's row is no longer active)."""
    slots = max_jobs()
    rows = [row for table in (Run, ProjectionRow)
            for row in session.scalars(select(table).where(table.status.in_(list(ACTIVE))))
            if row.status in ACTIVE]
    running = {_key(row.host, row.pid, type(row), row.id) for row in rows if row.status == RunStatus.RUNNING}
    waiting: dict[tuple, datetime] = {}
    for row in rows:
        key = _key(row.host, row.pid, type(row), row.id)
        if row.status == RunStatus.QUEUED and row.pid is not None and key not in running:
            waiting[key] = min(waiting.get(key, row.created_at), row.created_at)
    order = sorted(waiting, key=lambda key: (waiting[key], str(key)))
    return {(type(row).__tablename__, row.id): Place(order.index(key), len(running), slots)
            for row in rows if row.status == RunStatus.QUEUED
            and (key := _key(row.host, row.pid, type(row), row.id)) in waiting}


def place_of(session: Session, table: Table, row_id: int) -> Optional[Place]:
    """The queued row's place; None when it is not queued (or reads dead)."""
    return places(session).get((table.__tablename__, row_id))


def admit(session: Session, table: Table, row_id: int) -> bool:
    """Inside `lifecycle.claim`'s transaction: lock the queue, then whether it is this row's turn.
    The row's process is this one (it claims its own row), so its pid is written first: the
    write takes SQLite's lock, and the row counts as this process's job from now on."""
    if not queue_applies():
        return True
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
    session.execute(update(table).where(table.id == row_id, table.status == RunStatus.QUEUED)
                    .values(pid=os.getpid(), host=socket.gethostname(), heartbeat_at=utcnow()))
    place = place_of(session, table, row_id)
    return place is None or place.turn  # not queued: claim says why


def wait_for_turn(engine: Engine, table: Table, row_id: int, timeout: Optional[float] = None) -> Optional[Place]:
    """Wait, light, until it is likely the row's turn (the claim then checks it under the lock);
    beats this process's queued rows meanwhile. Returns the last place seen (None: not queued
    any more, or no queue). timeout: seconds at most (None: as long as it takes)."""
    from storage.db import transaction

    if not queue_applies():
        return None
    started = last_beat = time.monotonic()
    while True:
        with transaction(engine) as session:
            place = place_of(session, table, row_id)
            if place is None or place.turn:
                return place
            if time.monotonic() - last_beat >= BEAT_SECONDS:
                beat_waiting(session)
                last_beat = time.monotonic()
        if timeout is not None and time.monotonic() - started > timeout:
            return place
        time.sleep(POLL_SECONDS)


def beat_waiting(session: Session) -> None:
    """A fresh heartbeat on this process's queued rows, so they read alive while it waits."""
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for table in (Run, ProjectionRow):
        session.execute(update(table).where(table.status == RunStatus.QUEUED, table.pid == me["pid"],
                                            table.host == me["host"]).values(heartbeat_at=utcnow()))


def claim_in_turn(engine: Engine, table: Table, row_id: int):
    """Wait for the row's turn, then claim it (core.runs.lifecycle.claim with the queue's check
    under its lock); returns the Holder. LostRun as claim raises it (cancelled while waiting)."""
    from core.runs import lifecycle

    while True:
        wait_for_turn(engine, table, row_id)
        try:
            return lifecycle.claim(engine, table, row_id, in_turn=True)
        except lifecycle.NotYourTurn:  # another process took the slot between the look and the claim
            time.sleep(POLL_SECONDS)
