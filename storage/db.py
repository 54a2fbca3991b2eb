"""Engine creation: WAL, busy timeout and foreign keys on every SQLite connection; the schema's
migrations, run as each process starts."""
from __future__ import annotations

import fcntl
import os
import weakref
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Literal, Optional

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from storage.artifacts import clean_leftovers, disk_full_reason
from storage.settings import (StorageError, _reason, check_database_url, data_home, database_url, normalise_url,
                              shown_url)

# SQLite: how long a write waits for another process's write lock. One lock serves the whole
# file, so it stays generous: a worker's epoch and an import's rows are real work to wait for.
# Readers never wait (WAL).
BUSY_TIMEOUT_MS = 30_000
# PostgreSQL, per session: how long a statement waits for a row lock before it gives up, for the
# app (pages, the command line: a person waits) and for a worker (a run can wait longer) ...
APP_LOCK_TIMEOUT_S = 5
WORKER_LOCK_TIMEOUT_S = 30
# ... and how long the server lets a session sit inside a transaction without a statement before
# it ends the session, releasing its locks: a worker stopped (SIGSTOP, a swapped-out laptop) in
# an epoch's transaction then blocks nobody for longer than this
IDLE_IN_TRANSACTION_S = 60
Role = Literal["app", "worker"]
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


def make_engine(url: str | None = None, role: Role = "app") -> Engine:
    """Create the engine for this process (never carry one across a fork) and bring the database
    to the newest schema (`migrate`). `role` sets how long its writes wait for a lock (see
    APP_LOCK_TIMEOUT_S): "worker" for a process that runs a run or a map, "app" otherwise.

    StorageError (one sentence naming the URL, password hidden) when the URL is malformed or
    in-memory SQLite, when a SQLite file's folder is missing or not writable, when the first
    connection fails (server down, wrong credentials, driver not installed), or when a migration
    fails.
    """
    url = normalise_url(url) if url else database_url()
    parsed = check_database_url(url)
    shown = shown_url(url, parsed)
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if is_sqlite:
        _check_sqlite_file(parsed.database, shown)
    lock_wait_s = BUSY_TIMEOUT_MS / 1000 if is_sqlite else (
        WORKER_LOCK_TIMEOUT_S if role == "worker" else APP_LOCK_TIMEOUT_S)
    connect_args = {"timeout": BUSY_TIMEOUT_MS / 1000} if is_sqlite else {}
    if parsed.get_backend_name() == "postgresql":
        ours = (f"-c lock_timeout={int(lock_wait_s * 1000)} "
                f"-c idle_in_transaction_session_timeout={int(IDLE_IN_TRANSACTION_S * 1000)}")
        given = parsed.query.get("options")  # the URL's own ?options=... come after ours, and win
        connect_args = {"options": " ".join(filter(None, [ours, given if isinstance(given, str) else None]))}
    try:
        # pre-ping: a server restarted, or a connection dropped by a proxy while idle, is replaced
        engine = create_engine(url, connect_args=connect_args, pool_pre_ping=not is_sqlite)
        if is_sqlite:
            event.listen(engine, "connect", _sqlite_pragmas)
        _LOCK_WAITS[engine] = (lock_wait_s, shown)
        migrate(engine, shown)
        clean_leftovers()  # an interrupted import's or checkpoint's temporary files
    except (DBAPIError, ArgumentError, NoSuchModuleError, ImportError) as exc:  # DBAPIError: OperationalError and kin
        detail = getattr(exc, "orig", None) or exc
        if isinstance(exc, ImportError):
            detail = f"its driver is not installed: {_reason(exc)}"
        elif isinstance(exc, NoSuchModuleError):
            detail = f"SQLAlchemy has no dialect {parsed.drivername!r}"
        elif is_sqlite and parsed.database and not parsed.database.startswith("file:"):
            detail = disk_full_reason(exc, Path(parsed.database).expanduser().resolve().parent) or detail
        raise StorageError(f"cannot open the database {shown}: {_reason(detail) if isinstance(detail, BaseException) else detail}") from None
    return engine


def migrate(engine: Engine, shown: str = "the database") -> Optional[str]:
    """Run the Alembic migrations (storage/migrations) that bring the database to the newest revision;
    returns the revision it was at (None: a new database, or one made before migrations, which
    revision 0001 brings to its schema in place, every row kept).

    A database already there costs one cheap check, so every process can call this as it starts.
    Several processes, on several machines, may start at once: all migrations run in one
    transaction, on SQLite under the data folder's file lock and a write lock taken at its
    start (BEGIN IMMEDIATE), on a server database under an advisory lock held to its commit;
    whoever waited finds the work done. StorageError naming the database and the revision when
    a migration fails (nothing of it stays) or the database is at a revision this version of
    the app does not know (a newer version migrated it)."""
    from alembic.runtime.migration import MigrationContext

    target = head_revision()
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    if current == target:
        return current
    _known(current, shown)
    if engine.dialect.name == "sqlite":
        with _schema_lock(), _sqlite_migration_connection(engine) as connection:
            return _upgrade(connection, target, shown)
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            # another process's migration is real work to wait for, not a stalled writer
            connection.execute(text("SET LOCAL lock_timeout = 0"))
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        return _upgrade(connection, target, shown)


def _upgrade(connection, target: str, shown: str) -> Optional[str]:
    """Inside the caller's transaction and lock: read the revision again (a process that held
    the lock before may have migrated already) and run each migration up to `target`."""
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext

    current = MigrationContext.configure(connection).get_current_revision()
    if current == target:
        return current
    _known(current, shown)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    steps = [script.revision for script in _scripts().iterate_revisions(target, current or "base")]
    for step in reversed(steps):  # one at a time, so a failure names its revision
        try:
            command.upgrade(config, step)
        except Exception as exc:  # whatever broke, the transaction rolls it all back
            detail = getattr(exc, "orig", None) or exc
            raise StorageError(f"cannot upgrade the database {shown} to schema revision {step} "
                               f"(from {current or 'none'}); nothing was changed: {_reason(detail)}") from exc
    return current


def _known(revision: Optional[str], shown: str) -> None:
    """StorageError when the database is at a revision that is not among this app's migrations."""
    from alembic.util import CommandError

    if revision is None:
        return
    try:
        _scripts().get_revision(revision)
    except CommandError:
        raise StorageError(f"the database {shown} is at schema revision {revision!r}, which this version of the "
                           "app does not know: a newer version upgraded it; run that version (or a newer one), "
                           "or point EMBEDDING_LAB_DB at another database") from None


def head_revision() -> str:
    """The newest schema revision among this app's migrations."""
    return _scripts().get_current_head()


@lru_cache(maxsize=1)
def _scripts():
    """The migration scripts (read once per process)."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(config)


@contextmanager
def _sqlite_migration_connection(engine: Engine) -> Iterator[Connection]:
    """A connection of its own in one real transaction, BEGIN IMMEDIATE: the app's connections
    leave transactions to Python's sqlite3, which commits each CREATE and ALTER on its own, and
    a table rebuilt halfway must never be seen. Foreign keys stay off (SQLite's default) so a
    rebuilt table's DROP deletes no rows of the tables that refer to it."""

    def own_transactions(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # the BEGIN below, not sqlite3's, starts transactions
        dbapi_connection.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")

    migrator = create_engine(engine.url, poolclass=NullPool)
    event.listen(migrator, "connect", own_transactions)
    event.listen(migrator, "begin", lambda connection: connection.exec_driver_sql("BEGIN IMMEDIATE"))
    try:
        with migrator.begin() as connection:
            yield connection
    finally:
        migrator.dispose()


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


class DatabaseBusy(StorageError):
    """A write waited for a lock that another process held past the lock timeout (a worker
    stopped inside a transaction, say); nothing of it was written. The message names the write."""


# engine → (seconds its writes wait for a lock, its URL as shown)
_LOCK_WAITS: "weakref.WeakKeyDictionary[Engine, tuple[float, str]]" = weakref.WeakKeyDictionary()


def lock_timed_out(exc: BaseException) -> bool:
    """Whether a database error is a write that gave up waiting for a lock: SQLite's "database is
    locked" (its busy timeout ran out), PostgreSQL's lock_not_available (lock_timeout)."""
    orig = getattr(exc, "orig", exc)
    if getattr(orig, "sqlstate", None) == "55P03":
        return True
    return "database is locked" in str(orig) or "database table is locked" in str(orig)


def shown(engine: Engine) -> str:
    """The engine's database as messages name it (password hidden)."""
    known = _LOCK_WAITS.get(engine)
    return known[1] if known else engine.url.render_as_string(hide_password=True)


@contextmanager
def transaction(engine: Engine, what: str = "write to the database") -> Iterator[Session]:
    """`with transaction(engine) as s:` commits on success, rolls back on error. A write that
    cannot get its lock in time raises DatabaseBusy, a sentence saying it could not `what`
    ("cancel run 3"); reads never wait for a lock (WAL on SQLite; plain SELECTs on PostgreSQL)."""
    try:
        with Session(engine, expire_on_commit=False) as session, session.begin():
            yield session
    except OperationalError as exc:
        if not lock_timed_out(exc):
            raise
        seconds, shown = _LOCK_WAITS.get(engine, (None, "the database"))
        waited = f" for {seconds:g} s" if seconds else ""
        raise DatabaseBusy(f"could not {what}: another process held a lock on the database {shown}{waited} "
                           "(a worker stopped inside a transaction?); nothing was written, try again") from None
