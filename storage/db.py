"""Engine creation: WAL, busy timeout and foreign keys on every SQLite connection."""
from __future__ import annotations

import fcntl
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session

from storage.schema import Base, add_missing_columns
from storage.settings import data_home, database_url

BUSY_TIMEOUT_MS = 30_000


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(url: str | None = None) -> Engine:
    """Create the engine for this process (never carry one across a fork) and the schema.

    The schema is created under a file lock so two processes starting at once do not race.
    """
    url = url or database_url()
    is_sqlite = url.startswith("sqlite")
    connect_args = {"timeout": BUSY_TIMEOUT_MS / 1000} if is_sqlite else {}
    engine = create_engine(url, connect_args=connect_args)
    if is_sqlite:
        event.listen(engine, "connect", _sqlite_pragmas)
    with _schema_lock():
        Base.metadata.create_all(engine)
        add_missing_columns(engine)
    return engine


@contextmanager
def _schema_lock() -> Iterator[None]:
    lock_path = Path(data_home()) / ".schema.lock"
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def transaction(engine: Engine) -> Iterator[Session]:
    """`with transaction(engine) as s:` commits on success, rolls back on error."""
    with Session(engine, expire_on_commit=False) as session, session.begin():
        yield session
