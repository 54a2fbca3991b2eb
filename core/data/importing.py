"""From user input (files, a zip, a folder) to a stored dataset, with a report of what was refused."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from sqlalchemy import Engine, func, select

from core import access
from core.data import images
from core.data.datasets import check_dataset_name, save_stored_pixels
from core.data.ingest import (MAX_TOTAL_BYTES, IngestError, Rejection, StreamedIngest, stream_files, stream_folder,
                              zip_labels)
from storage import artifacts
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
    n_rejected: Optional[int] = None  # whole counts: the lists keep the first ingest.LISTED names
    n_duplicates: Optional[int] = None

    def summary(self) -> dict:
        out = {
            "dataset_id": self.dataset_id, "name": self.name, "images": self.n_images,
            "classes": len(self.classes), "rejected": [f"{r.name}: {r.reason}" for r in self.rejected],
            "duplicates": self.n_duplicates if self.n_duplicates is not None else len(self.duplicates),
        }
        if self.n_rejected is not None and self.n_rejected > len(self.rejected):
            out["rejected_count"] = self.n_rejected
        return out


def check_image_size(image_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not MIN_SIZE <= image_size <= MAX_SIZE:
        raise ValueError(f"image size must be a whole number of pixels from {MIN_SIZE} to {MAX_SIZE}, got {image_size!r}")
    return image_size


def import_uploads(engine: Engine, name: str, files: Iterable[tuple[str, object]], image_size: int = 64,
                   folder_files: Sequence[tuple[str, object]] = ()) -> ImportReport:
    """Uploaded files (images and zips of class folders) and the files of an uploaded folder
    (named by their path inside it, so subfolders are class labels) → one dataset, all or nothing.

    Each file is bytes or an open binary file (Streamlit's UploadedFile): a zip is read member by
    member from it, an image when its turn comes, and the pixels stream to the dataset's file."""
    access.require("import")  # before a byte is decoded
    check_image_size(image_size)
    files = list(files) + list(folder_files)
    nbytes = sum(_size(data) for _, data in files)
    check_upload_allowance(engine, nbytes)
    labels = [None] * (len(files) - len(folder_files)) + zip_labels([path for path, _ in folder_files])
    report = _import(engine, name, "upload", lambda folder: stream_files(files, folder, image_size, labels=labels))
    _record_upload(engine, nbytes)
    return report


def _size(data) -> int:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return len(data)
    size = getattr(data, "size", None)
    if isinstance(size, int):
        return size
    at = data.tell()
    data.seek(0, 2)
    end = data.tell()
    data.seek(at)
    return end


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
        return _import(engine, name, "folder", lambda folder: stream_folder(paths[0], folder, image_size=image_size))
    if any(path.is_dir() for path in paths):
        raise ValueError("import one folder at a time, or files and zips without folders")
    for path in paths:  # every named file is checked before any is decoded
        _check(path)
    return _import(engine, name, "files",
                   lambda folder: stream_files(((p.name, _open(p)) for p in paths), folder, image_size=image_size))


def _check(path: Path) -> None:
    """A named image or zip, refused (naming it) before it is read when it is not a regular file
    (`import /dev/zero` once ran out of memory) or is bigger than a file of its kind may be."""
    if path.suffix.lower() == ".zip":
        images.check_named_file(path, MAX_TOTAL_BYTES, "zip")
    else:
        images.check_named_file(path, images.MAX_FILE_BYTES, "image")


def _open(path: Path):
    """A zip by its path (read member by member, never whole); an image's bytes, capped."""
    if path.suffix.lower() == ".zip":
        return path
    return images.read_named_file(path, images.MAX_FILE_BYTES, "image")


def _import(engine: Engine, name: str, source: str, stream: Callable[[Path], StreamedIngest]) -> ImportReport:
    """Stream an import into a temporary folder beside the datasets, check it, then store it: the
    folder becomes the dataset's, or is removed (nothing stored) on any failure."""
    name = check_dataset_name(name)  # before a byte is decoded
    temp = artifacts.new_temp_folder()
    try:
        result = stream(temp)
        check_class_folders_streamed(result)
        labels = result.labels if result.classes else None
        dataset_id = save_stored_pixels(engine, name, source, temp, result.n, result.image_size, result.channels,
                                        labels, result.classes, result.iter_names(), result.hashes,
                                        before_move=result.drop_work_files)
    except BaseException:
        artifacts.remove_folder(str(temp.relative_to(artifacts.absolute(""))))
        raise
    return ImportReport(dataset_id, name, result.n, list(result.classes), result.rejected, result.duplicates,
                        result.n_rejected, result.n_duplicates)


def check_class_folders_streamed(result: StreamedIngest) -> None:
    """check_class_folders for an import streamed to disk: only the two images it names are read."""
    loose, placed = result.loose_and_placed()
    if loose is not None and placed is not None:
        check_class_folders([loose, placed[0]], [None, placed[1]])


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
