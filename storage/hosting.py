"""What survives a restart: whether the data folder is wiped with the machine, and which stored
runs have lost their files.

Hosted Streamlit keeps the app's files in a checkout that is replaced on every reboot and
redeploy, and containers write to a layer that goes with them. The database may live elsewhere
(EMBEDDING_LAB_DB, e.g. PostgreSQL), so runs outlive the machine while their checkpoints,
embeddings and maps do not. The Runs page says so up front, and every page that opens a file
says which one is gone, rather than failing later.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from storage.settings import data_home

EPHEMERAL_ENV = "EMBEDDING_LAB_EPHEMERAL"
# where Streamlit Community Cloud checks out an app: replaced on every reboot and redeploy
HOSTED_CHECKOUT = Path("/mount/src")
# file systems that do not outlive the machine or the container they belong to
EPHEMERAL_FILE_SYSTEMS = ("tmpfs", "ramfs", "overlay")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class Mount:
    point: Path
    fstype: str


def ephemeral_reason(path: Optional[Path] = None, mounts: Optional[list[Mount]] = None) -> Optional[str]:
    """Why files under `path` (default: the data folder) are lost when the app restarts, as a
    clause ("it lies on a tmpfs file system (/tmp)"); None when they are kept.

    EMBEDDING_LAB_EPHEMERAL=1 or 0 decides outright (a host this cannot recognise, or a volume
    mounted where this would guess wrong). Otherwise: inside Streamlit Community Cloud's checkout,
    or on a tmpfs, ramfs or overlay (a container's own layer) file system. ValueError when the
    variable holds something other than a yes or a no."""
    setting = (os.environ.get(EPHEMERAL_ENV) or "").strip().lower()
    if setting in _TRUE:
        return f"{EPHEMERAL_ENV} says so"
    if setting in _FALSE:
        return None
    if setting:
        raise ValueError(f"{EPHEMERAL_ENV} must be 1 or 0 (or true/false); got {os.environ[EPHEMERAL_ENV]!r}")
    path = Path(path or data_home()).resolve()
    if path == HOSTED_CHECKOUT or HOSTED_CHECKOUT in path.parents:
        return f"it lies in the app's checkout on hosted Streamlit ({HOSTED_CHECKOUT}), which is replaced on every reboot"
    mount = mount_of(path, mounts if mounts is not None else read_mounts())
    if mount is not None and mount.fstype in EPHEMERAL_FILE_SYSTEMS:
        what = "a container's own layer" if mount.fstype == "overlay" else "memory"
        return f"it lies on a {mount.fstype} file system ({mount.point}: {what}), which does not outlive the machine"
    return None


def read_mounts(table: Path = Path("/proc/self/mounts")) -> list[Mount]:
    """The mount table of this process ([] where there is none to read, as on macOS)."""
    try:
        lines = table.read_text().splitlines()
    except OSError:
        return []
    mounts = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 3:  # device, mount point (spaces as \040), type, ...
            mounts.append(Mount(Path(fields[1].replace("\\040", " ")), fields[2]))
    return mounts


def mount_of(path: Path, mounts: list[Mount]) -> Optional[Mount]:
    """The mount that holds `path`: the deepest mount point above it (the last one mounted there)."""
    best = None
    for mount in mounts:
        if mount.point == path or mount.point in path.parents:
            if best is None or len(mount.point.parts) >= len(best.point.parts):
                best = mount
    return best


def lost_files(paths: Iterable[Optional[str]]) -> list[str]:
    """Those of the stored relative paths (a run's checkpoint, embeddings; a dataset's folder)
    that are no longer in the data folder."""
    home = data_home()
    return [path for path in paths if path and not (home / path).exists()]


def database_in_data_home(url: str) -> bool:
    """Whether the database is a SQLite file inside the data folder (then it goes with it)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return False
    home = data_home()
    database = Path(parsed.database).expanduser().resolve()
    return home == database.parent or home in database.parents
