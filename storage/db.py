"""Engine creation: WAL, busy timeout and foreign keys on every SQLite connection."""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from sqlalchemy.orm import Session

from storage.artifacts import clean_leftovers
from storage.schema import add_missing_columns
from storage.settings import (StorageError, _reason, check_database_url, data_home, database_url, normalise_url,
                              shown_url)

BUSY_TIMEOUT_MS = 30_000
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# any fixed number: the PostgreSQL advisory lock every process of this app takes to migrate
MIGRATION_LOCK = 7_420_381_102


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
    url = normalise_url(url) if url else database_url()
    parsed = check_database_url(url)
    shown = shown_url(url, parsed)
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if is_sqlite:
        _check_sqlite_file(parsed.database, shown)
    connect_args = {"timeout": BUSY_TIMEOUT_MS / 1000} if is_sqlite else {}
    try:
        if parsed.get_driver_name() == "psycopg":
            _adapt_numpy()
        engine = create_engine(url, connect_args=connect_args, pool_pre_ping=not is_sqlite)
        if is_sqlite:
            event.listen(engine, "connect", _sqlite_pragmas)
        with _schema_lock():
            migrate(engine, shown)
        clean_leftovers()  # an interrupted import's or checkpoint's temporary files
    except (DBAPIError, ArgumentError, NoSuchModuleError, ImportError) as exc:  # DBAPIError: OperationalError and kin
        detail = getattr(exc, "orig", None) or exc
        if isinstance(exc, ImportError):
            detail = f"its driver is not installed: {_reason(exc)}"
        elif isinstance(exc, NoSuchModuleError):
            detail = f"SQLAlchemy has no dialect {parsed.drivername!r}"
        raise StorageError(f"cannot open the database {shown}: {_reason(detail) if isinstance(detail, BaseException) else detail}") from None
    return engine


def migrate(engine: Engine, shown: str = "the database") -> Optional[str]:
    """Bring the database to the newest schema with Alembic (storage/migrations); returns the
    revision it was at (None: new, or made before migrations). A database at the newest revision
    costs one query. One made before migrations (its tables, no alembic_version) gets the columns
    it lacks and is stamped at the newest revision: its rows are never dropped. Several processes,
    on several machines, may start at once: SQLite migrates under a file lock (make_engine), a
    server database under an advisory lock held for the migration. StorageError naming the
    database and the revision when a migration fails."""
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy import inspect, text

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(config).get_current_head()
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    if current == head:
        return current
    with engine.begin() as connection:
        locked = connection.dialect.name == "postgresql"
        if locked:
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        current = MigrationContext.configure(connection).get_current_revision()  # another may have done it
        if current == head:
            return current
        config.attributes["connection"] = connection
        target = "its tables"
        try:
            if current is None and inspect(connection).has_table("runs"):  # made before migrations
                add_missing_columns(connection)
                command.stamp(config, head)
            else:
                target = f"revision {head}"
                command.upgrade(config, head)
        except (DBAPIError, ArgumentError) as exc:
            detail = getattr(exc, "orig", None) or exc
            raise StorageError(f"cannot bring the database {shown} from revision {current or 'none'} to "
                               f"{target}: {_reason(detail)}") from None
    return current


_numpy_adapted = False


def _adapt_numpy() -> None:
    """psycopg 3 sends Python numbers only; numpy's integers, floats and booleans (what arrays
    hand out) are sent as what they are, as SQLite's driver does."""
    global _numpy_adapted
    if _numpy_adapted:
        return
    import numpy as np
    import psycopg
    from psycopg.types.bool import BoolDumper
    from psycopg.types.numeric import FloatDumper, Int8Dumper

    for kind in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32):
        psycopg.adapters.register_dumper(kind, _numpy_dumper(Int8Dumper, int))
    for kind in (np.float16, np.float32, np.float64):
        psycopg.adapters.register_dumper(kind, _numpy_dumper(FloatDumper, float))
    psycopg.adapters.register_dumper(np.bool_, _numpy_dumper(BoolDumper, bool))
    _numpy_adapted = True


def _numpy_dumper(base, cast):
    class Dumper(base):
        def dump(self, obj):
            return super().dump(cast(obj))

    return Dumper


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
