"""From user input (files, a zip, a folder) to a stored dataset, with a report of what was refused."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Iterable, Optional, Sequence

from sqlalchemy import Engine, func, select

from core import access
from core.data import images
from core.data.datasets import save_dataset
from core.data.ingest import (MAX_TOTAL_BYTES, IngestError, IngestResult, Rejection, ingest_files, ingest_folder,
                              zip_labels)
from storage.db import transaction
from storage.schema import Upload, utcnow

MIN_SIZE, MAX_SIZE = 8, 256


@dataclass
class ImportReport:
    dataset_id: int
    name: str
    n_images: int
    classes: list[str]
    rejected: list[Rejection] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "dataset_id": self.dataset_id, "name": self.name, "images": self.n_images,
            "classes": len(self.classes), "rejected": [f"{r.name}: {r.reason}" for r in self.rejected],
            "duplicates": len(self.duplicates),
        }


def check_image_size(image_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not MIN_SIZE <= image_size <= MAX_SIZE:
        raise ValueError(f"image size must be a whole number of pixels from {MIN_SIZE} to {MAX_SIZE}, got {image_size!r}")
    return image_size


def import_uploads(engine: Engine, name: str, files: Iterable[tuple[str, bytes]], image_size: int = 64,
                   folder_files: Sequence[tuple[str, bytes]] = ()) -> ImportReport:
    """Uploaded files (images and zips of class folders) and the files of an uploaded folder
    (named by their path inside it, so subfolders are class labels) → one dataset, all or nothing."""
    access.require("import")  # before a byte is decoded
    check_image_size(image_size)
    files = list(files) + list(folder_files)
    nbytes = sum(len(data) for _, data in files)
    check_upload_allowance(engine, nbytes)
    labels = [None] * (len(files) - len(folder_files)) + zip_labels([path for path, _ in folder_files])
    result = ingest_files(files, image_size=image_size, labels=labels)
    report = _store(engine, name, "upload", result)
    _record_upload(engine, nbytes)
    return report


def check_upload_allowance(engine: Engine, nbytes: int) -> None:
    """The signed-in person's daily upload limit (core.access.PERSON_UPLOAD_ENV, megabytes in the
    last 24 hours): ValueError naming it when these `nbytes` would go past it. None for the
    machine's owner."""
    email = access.who()
    limit = None if email is None else access.person_limit(access.PERSON_UPLOAD_ENV)
    if limit is None:
        return
    since = utcnow() - timedelta(days=1)
    with transaction(engine) as session:
        used = session.scalar(select(func.coalesce(func.sum(Upload.nbytes), 0))
                              .where(Upload.email == email, Upload.at >= since)) or 0
    if used + nbytes > limit * 2**20:
        raise ValueError(f"{email} has uploaded {used / 2**20:.1f} MB in the last 24 hours; these {nbytes / 2**20:.1f} MB "
                         f"would pass the {limit} MB a person may upload a day ({access.PERSON_UPLOAD_ENV}); "
                         "nothing was imported")


def _record_upload(engine: Engine, nbytes: int) -> None:
    email = access.who()
    if email is not None:
        with transaction(engine) as session:
            session.add(Upload(email=email, nbytes=int(nbytes)))


def import_paths(engine: Engine, paths: Sequence[Path], name: Optional[str] = None, image_size: int = 64) -> ImportReport:
    """Folders, zips or image files on disk → one dataset, named `name` or after the first path
    (prefixed "dataset-" when that is only digits, which would read as an id)."""
    access.require("import")
    check_image_size(image_size)
    if not paths:
        raise ValueError("nothing to import: give a folder, a zip or image files")
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
    if not name:
        # a folder or zip named "2024" would give a name that reads as a dataset id
        name = paths[0].stem if not paths[0].stem.isdigit() else f"dataset-{paths[0].stem}"
    if len(paths) == 1 and paths[0].is_dir():
        return _store(engine, name, "folder", ingest_folder(paths[0], image_size=image_size))
    if any(path.is_dir() for path in paths):
        raise ValueError("import one folder at a time, or files and zips without folders")
    return _store(engine, name, "files", ingest_files(((p.name, _read(p)) for p in paths), image_size=image_size))


def _read(path: Path) -> bytes:
    """A named image or zip, refused (naming it) before it is read when it is not a regular file
    (`import /dev/zero` once ran out of memory) or is bigger than a file of its kind may be."""
    if path.suffix.lower() == ".zip":
        return images.read_named_file(path, MAX_TOTAL_BYTES, "zip")
    return images.read_named_file(path, images.MAX_FILE_BYTES, "image")


def _store(engine: Engine, name: str, source: str, result: IngestResult) -> ImportReport:
    check_class_folders(result.names, result.labels)
    dataset_id = save_dataset(engine, name, source, result.pixels, result.labels, result.names, result.hashes)
    classes = sorted({label for label in result.labels if label is not None})
    return ImportReport(dataset_id, name.strip(), len(result.pixels), classes, result.rejected, result.duplicates)


def check_class_folders(names: Sequence[str], labels: Sequence[Optional[str]]) -> None:
    """Every image in a class folder, or none of them: otherwise ValueError naming one image
    outside the class folders and one class folder the others are in (where it was expected)."""
    loose = next((name for name, label in zip(names, labels) if label is None), None)
    placed = next(((name, label) for name, label in zip(names, labels) if label is not None), None)
    if loose is None or placed is None:
        return
    example, label = placed
    folders = example.split("/")[:-1]
    folder = "/".join(folders[:folders.index(label) + 1]) if label in folders else label
    raise ValueError(f"some images have a class folder and some do not: {loose} is in none, while {example} is "
                     f"in the class folder {folder}/; put every image in a class folder")


__all__ = ["ImportReport", "IngestError", "import_paths", "import_uploads", "check_image_size", "check_class_folders"]
