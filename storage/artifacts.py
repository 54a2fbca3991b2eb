"""Artifact files on disk, all under the data home; the database stores paths relative to it.

Temporary folders (tmp/<pid>-XXXX) and files (NAME.<pid>.tmp) carry the writing process's id, so
clean_leftovers can remove those of a process that died mid-write and never those of a live one.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from storage.run_files import STAGING_FOLDER
from storage.settings import data_home


def absolute(relative: str) -> Path:
    return data_home() / relative


def dataset_folder(dataset_id: int) -> str:
    return f"datasets/{dataset_id}"


def new_temp_folder() -> Path:
    """A folder beside the final ones, so moving it into place is one rename."""
    parent = data_home() / "tmp"
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=parent))


def temp_file_for(path: Path) -> Path:
    """NAME.<pid>.tmp beside `path`: the name clean_leftovers recognises."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def save_array_atomic(path: Path, array: np.ndarray) -> None:
    """Write to a temporary file, then rename: a crash never leaves half an array."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_file_for(path)
    try:
        with open(tmp, "wb") as handle:
            np.save(handle, array)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


_TEMP_FOLDER = re.compile(r"^(\d+)-")
_TEMP_FILE = re.compile(r"\.(\d+)\.tmp$")


def clean_leftovers() -> int:
    """Remove the temporary folders (tmp/<pid>-XXXX) and files (NAME.<pid>.tmp) under the data
    home whose writer is no longer running on this machine; returns how many were removed.

    Call it when a process starts (app, worker, command line). A name without a pid, or with the
    pid of a live process (any user's), is left alone.
    """
    home = data_home()
    removed = 0
    temp_root = home / "tmp"
    if temp_root.is_dir():
        for entry in temp_root.iterdir():
            match = _TEMP_FOLDER.match(entry.name)
            if match and entry.is_dir() and not entry.is_symlink() and not process_alive(int(match.group(1))):
                shutil.rmtree(entry, ignore_errors=True)
                removed += not entry.exists()
    for root, folders, files in os.walk(home):
        if Path(root) == temp_root:
            folders[:] = []  # whole temp folders were judged above, by their own pid
        for name in list(folders):
            match = STAGING_FOLDER.match(name)
            if match:  # a worker's files staged before it made them current (storage.run_files)
                folders.remove(name)
                if not process_alive(int(match.group(1))):
                    shutil.rmtree(Path(root) / name, ignore_errors=True)
                    removed += 1
        for name in files:
            match = _TEMP_FILE.search(name)
            if match and not process_alive(int(match.group(1))):
                try:
                    (Path(root) / name).unlink()
                    removed += 1
                except FileNotFoundError:
                    pass  # another process cleaning at the same moment
    return removed


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NEARLY_FULL_BYTES = 1 << 20


def disk_full_reason(exc: BaseException, folder: Path) -> Optional[str]:
    """The sentence a run's reason (or the command line) gives when `exc`, or an exception it was
    raised from, is a write that failed for want of space: ENOSPC or EDQUOT, SQLite's "database
    or disk is full", or its "disk I/O error" while `folder`'s disk has less than 1 MiB free.
    None for any other failure. It names `folder` (where the caller was writing), or the folder
    of the file the error names when that lies elsewhere."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            where = folder
            if exc.filename and Path(folder) not in Path(str(exc.filename)).parents:
                where = Path(str(exc.filename)).parent
            return f"the disk is full: there is no space left to write in {where}"
        text = str(exc)
        if "database or disk is full" in text or ("disk I/O error" in text and _free_bytes(folder) < _NEARLY_FULL_BYTES):
            return f"the disk is full: there is no space left to write in {folder}"
        exc = exc.__cause__ or exc.__context__
    return None


def _free_bytes(folder: Path) -> int:
    """Free bytes on the disk of `folder` (its nearest existing parent)."""
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 1 << 62  # cannot tell: do not blame the disk


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine and is not a zombie (a child of this
    process that ended is reaped on the way). Temp-file cleaning and the run liveness check
    (core.runs.lifecycle) both ask this."""
    if pid <= 0:
        return True  # 0 and negatives name process groups, not a writer: never treat as dead
    if pid == os.getpid():
        return True
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    except OverflowError:
        return False  # larger than any pid can be
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(") ", 1)[1][0] not in "ZX"
    except (FileNotFoundError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def remove_folder(relative: str) -> None:
    shutil.rmtree(absolute(relative), ignore_errors=True)
