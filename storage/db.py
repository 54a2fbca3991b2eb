"""Engine creation: WAL, busy timeout and foreign keys on every SQLite connection."""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from sqlalchemy.orm import Session

from storage.artifacts import clean_leftovers
from storage.schema import Base, add_missing_columns
from storage.settings import StorageError, _reason, check_database_url, data_home, database_url, shown_url

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
    StorageError (one sentence naming the URL, password hidden) when the URL is malformed or
    in-memory SQLite, when a SQLite file's folder is missing or not writable, or when the first
    connection fails (server down, wrong credentials, driver not installed).
    """
    url = url or database_url()
    parsed = check_database_url(url)
    shown = shown_url(url, parsed)
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if is_sqlite:
        _check_sqlite_file(parsed.database, shown)
    connect_args = {"timeout": BUSY_TIMEOUT_MS / 1000} if is_sqlite else {}
    try:
        engine = create_engine(url, connect_args=connect_args)
        if is_sqlite:
            event.listen(engine, "connect", _sqlite_pragmas)
        with _schema_lock():
            Base.metadata.create_all(engine)
            add_missing_columns(engine)
            clean_leftovers()  # an interrupted import's or checkpoint's temporary files
    except (DBAPIError, ArgumentError, NoSuchModuleError, ImportError) as exc:  # DBAPIError: OperationalError and kin
        detail = getattr(exc, "orig", None) or exc
        if isinstance(exc, ImportError):
            detail = f"its driver is not installed: {_reason(exc)}"
        elif isinstance(exc, NoSuchModuleError):
            detail = f"SQLAlchemy has no dialect {parsed.drivername!r}"
        raise StorageError(f"cannot open the database {shown}: {_reason(detail) if isinstance(detail, BaseException) else detail}") from None
    return engine


def _check_sqlite_file(database: str | None, shown: str) -> None:
    """A SQLite file needs an existing, writable folder (SQLite writes its -wal and -shm beside it)."""
    if not database or database.startswith("file:"):
        return  # a URI filename: SQLite itself reports what is wrong with it
    path = Path(database).expanduser()
    folder = path.parent.resolve()
    if not folder.is_dir():
        raise StorageError(f"cannot open the database {shown}: the folder {folder} does not exist or is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise StorageError(f"cannot open the database {shown}: the folder {folder} is not writable by this process")
    if path.is_dir():
        raise StorageError(f"cannot open the database {shown}: {path} is a folder, not a database file")
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise StorageError(f"cannot open the database {shown}: the file {path} is not writable by this process")


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
