"""Artifact files on disk, all under the data home; the database stores paths relative to it."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from storage.settings import data_home


def absolute(relative: str) -> Path:
    return data_home() / relative


def dataset_folder(dataset_id: int) -> str:
    return f"datasets/{dataset_id}"


def run_folder(run_id: int) -> str:
    folder = f"runs/{run_id}"
    absolute(folder).mkdir(parents=True, exist_ok=True)
    return folder


def new_temp_folder() -> Path:
    """A folder beside the final ones, so moving it into place is one rename."""
    parent = data_home() / "tmp"
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=parent))


def save_array_atomic(path: Path, array: np.ndarray) -> None:
    """Write to a temporary file, then rename: a crash never leaves half an array."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, array)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def remove_folder(relative: str) -> None:
    shutil.rmtree(absolute(relative), ignore_errors=True)
