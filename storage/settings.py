"""Where data lives and which database is used: one environment variable each.

A setting that cannot work raises StorageError with one sentence that names the value and the
reason, so the app, the worker and the command line can show it instead of a traceback.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

HOME_ENV = "EMBEDDING_LAB_HOME"
DB_ENV = "EMBEDDING_LAB_DB"
DB_FILE_ENV = "EMBEDDING_LAB_DB_FILE"  # a file holding the URL, read when DB_ENV is not set


class StorageError(Exception):
    """The data folder or the database cannot be used; the message says which and why."""


def data_home() -> Path:
    """The data folder (datasets, checkpoints, embeddings); created on first use.

    StorageError when the path exists but is not a folder, cannot be created, or is not writable.
    """
    raw = os.environ.get(HOME_ENV) or ".embedding-lab"
    home = Path(raw).expanduser().resolve()
    if home.exists() and not home.is_dir():
        raise StorageError(f"the data folder {home} ({HOME_ENV}) exists but is not a folder; point {HOME_ENV} at a folder")
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"the data folder {home} ({HOME_ENV}) cannot be created: {_reason(exc)}") from None
    if not os.access(home, os.W_OK | os.X_OK):
        raise StorageError(f"the data folder {home} ({HOME_ENV}) is not writable by this process")
    return home


def _read_url_file(path: Path) -> str:
    """The database URL kept in a file (EMBEDDING_LAB_DB_FILE): how a Ray job is told a URL with a
    password, which its runtime environment would show to anyone who can list the cluster's jobs."""
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise StorageError(f"the database URL file {path} ({DB_FILE_ENV}) cannot be read: {_reason(exc)}") from None


def write_url_file(url: str) -> Path:
    """Keep `url` in a file only this user can read, in the data folder (which a Ray cluster's
    nodes share with the app): <data folder>/.secrets/database-url, mode 0600. Returns its path."""
    folder = data_home() / ".secrets"
    folder.mkdir(mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)
    path = folder / "database-url"
    tmp = folder / f".database-url.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(url)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def database_url() -> str:
    """Any SQLAlchemy URL; by default SQLite inside the data folder.

    StorageError when EMBEDDING_LAB_DB is not a URL SQLAlchemy can parse, or names an in-memory
    SQLite database (each worker process would see its own empty one).
    """
    url = os.environ.get(DB_ENV)
    if not url and os.environ.get(DB_FILE_ENV):
        url = _read_url_file(Path(os.environ[DB_FILE_ENV]))
    if not url:
        return f"sqlite:///{data_home() / 'lab.db'}"
    url = normalise_url(url.strip())
    check_database_url(url, source=DB_ENV)
    return url


def normalise_url(url: str) -> str:
    """postgres://… and postgresql://… (what hosting providers hand out) use psycopg 3, the driver
    this app installs; a URL that names its driver is left as it is."""
    for prefix in ("postgres://", "postgresql://"):
        if url[:len(prefix)].lower() == prefix:
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def check_database_url(url: str, source: str = "the database URL"):
    """The parsed URL (sqlalchemy.engine.URL); StorageError when it is malformed or in-memory SQLite."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError, TypeError) as exc:
        raise StorageError(
            f"{source} {_hide_password(str(url))!r} is not a database URL SQLAlchemy understands ({_reason(exc)}); "
            "write it as dialect+driver://user:password@host/database or sqlite:////absolute/path/lab.db") from None
    if is_in_memory_sqlite(parsed):
        raise StorageError(
            f"{source} {shown_url(url, parsed)} is an in-memory SQLite database, so runs would be "
            "stored nowhere: the worker processes cannot see an in-memory database; use a file path")
    return parsed


def is_in_memory_sqlite(parsed) -> bool:
    """sqlite://, sqlite:///:memory:, file::memory: URIs and ?mode=memory all live in one process only."""
    if parsed.get_backend_name() != "sqlite":
        return False
    database = (parsed.database or "").strip()
    return (database in ("", ":memory:") or database.startswith("file::memory:")
            or parsed.query.get("mode") == "memory" or "mode=memory" in database)


def shown_url(url: str, parsed=None) -> str:
    """The URL as the user wrote it, or SQLAlchemy's rendering with the password hidden when it
    has one (user:***@host, or ?password=*** as libpq also takes it)."""
    parsed = parsed if parsed is not None else check_database_url(url)
    if parsed.password is None and "password" not in parsed.query:
        return url
    return re.sub(r"([?&]password=)[^&]*", r"\1***", parsed.render_as_string(hide_password=True))


def _hide_password(url: str) -> str:
    """user:secret@host → user:***@host (and ?password=secret) in a URL that SQLAlchemy could not parse."""
    return re.sub(r"([?&]password=)[^&]*", r"\1***", re.sub(r"(://[^/:@]*:)[^@/]*@", r"\1***@", url))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
