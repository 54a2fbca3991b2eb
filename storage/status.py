"""The statuses a run or a map job (a projection row) can be in, as stored in their `status` column.

    queued → running → completed | failed | cancelled | interrupted
    interrupted | cancelled | failed → queued   (resume, or a map computed again)

A projection row stores "done" where a run stores "completed"; every other value is shared. The
values are the strings databases of earlier versions hold, so they read unchanged. Only
core.runs.lifecycle writes a status (its transitions are compare-and-sets); this module only
names them, here in storage so that storage's own queries (storage.queries) use the same names.
"""
from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    DONE = "done"  # a projection row's completed
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"


ACTIVE = (RunStatus.QUEUED, RunStatus.RUNNING)
FINISHED = (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.INTERRUPTED)
RESUMABLE = (RunStatus.INTERRUPTED, RunStatus.CANCELLED, RunStatus.FAILED)
