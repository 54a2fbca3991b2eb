"""Datasets: the built-in ones, saving an import into the store, and loading pixels for training.

A dataset on disk is one uint8 array `pixels.npy` of shape (N, S, S, C) in its folder; the
database holds one row per image (position, name, label, split, sha256).
"""
from __future__ import annotations

import gzip
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
from sqlalchemy import Engine, insert
from sqlalchemy.exc import IntegrityError

from core import access
from storage import artifacts, queries
from storage.db import transaction
from storage.schema import Dataset, DatasetVersion, ImageRow

FASHION_MNIST_DIR = Path(os.environ.get("EMBEDDING_LAB_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_MNIST_HINT = (
    "Fashion-MNIST comes from the Debian package dataset-fashion-mnist: "
    "`sudo apt-get install dataset-fashion-mnist` (on hosted Streamlit, list it in packages.txt)."
)
TEST_FRACTION = 0.2


@dataclass
class DatasetArrays:
    """What training needs. pixels: (N, S, S, C) uint8; labels: (N,) int64 or None; split: (N,)
    '<U5'; excluded: (N,) bool, the images the dataset's version leaves out of training and of the
    metrics (None: none). Every array keeps one row per image, by position, excluded ones too: a run
    still embeds them, so its map and exports line up with every other run of the dataset."""

    pixels: np.ndarray
    labels: Optional[np.ndarray]
    split: np.ndarray
    classes: list[str]
    excluded: Optional[np.ndarray] = None

    @property
    def included(self) -> np.ndarray:
        """(N,) bool: the images the version uses."""
        return np.ones(len(self.split), dtype=bool) if self.excluded is None else ~np.asarray(self.excluded, dtype=bool)

    @property
    def included_index(self) -> np.ndarray:
        return np.flatnonzero(self.included)

    @property
    def train_index(self) -> np.ndarray:
        return np.flatnonzero((self.split == "train") & self.included)

    @property
    def test_index(self) -> np.ndarray:
        return np.flatnonzero((self.split == "test") & self.included)


def builtin_names() -> dict[str, bool]:
    """Each built-in dataset and whether it can be loaded on this machine."""
    return {"digits": True, "fashion-mnist": fashion_mnist_available()}


def fashion_mnist_available() -> bool:
    return all((FASHION_MNIST_DIR / f).exists() for f in _FASHION_FILES)


_FASHION_FILES = (
    "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_builtin(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(pixels (N,S,S,1) uint8, labels (N,), split (N,), class names) of a built-in dataset."""
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        # values are 0..16; scale to the 0..255 range every dataset uses
        pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
        labels = digits.target.astype(np.int64)
        return pixels, labels, seeded_split(len(labels)), [str(i) for i in range(10)]
    if name == "fashion-mnist":
        if not fashion_mnist_available():
            raise FileNotFoundError(f"Fashion-MNIST is not installed. {FASHION_MNIST_HINT}")
        files = [_read_idx(FASHION_MNIST_DIR / f) for f in _FASHION_FILES]
        pixels = np.concatenate([files[0], files[2]])[..., None]
        labels = np.concatenate([files[1], files[3]]).astype(np.int64)
        split = np.array(["train"] * len(files[1]) + ["test"] * len(files[3]))
        return pixels, labels, split, list(FASHION_MNIST_CLASSES)
    raise ValueError(f"unknown built-in dataset {name!r}; choose one of: {', '.join(builtin_names())}")


def seeded_split(n: int, test_fraction: float = TEST_FRACTION, seed: int = 0) -> np.ndarray:
    """A fixed train/test split: the same images are held out every time."""
    return np.where(seeded_test_mask(n, test_fraction, seed), "test", "train").astype("<U5")


def seeded_test_mask(n: int, test_fraction: float = TEST_FRACTION, seed: int = 0) -> np.ndarray:
    """seeded_split as (n,) bool, True for a test image: 1 byte an image where the split takes 20
    (an import of a million keeps this one)."""
    order = np.random.default_rng(seed).permutation(n)
    test = np.zeros(n, dtype=bool)
    test[order[:int(round(n * test_fraction)) if n >= 5 else 0]] = True
    return test


def save_dataset(
    engine: Engine,
    name: str,
    source: str,
    pixels: np.ndarray,
    labels: Sequence[Optional[str]] | np.ndarray | None,
    names: Sequence[str],
    hashes: Sequence[str],
    classes: Optional[list[str]] = None,
    split: Optional[np.ndarray] = None,
) -> int:
    """Store a dataset all or nothing; returns its id.

    labels: class names per image (or class indices when `classes` is given), or None.
    The array is written to a temporary folder first and renamed into place inside the
    database transaction, so a failure leaves neither a row nor a folder behind.
    """
    name = check_dataset_name(name)
    n = len(pixels)
    if n == 0:
        raise ValueError(f"dataset {name!r} has no images")
    label_index, classes = _label_indices(labels, classes, n)
    temp = artifacts.new_temp_folder()
    try:
        artifacts.save_array_atomic(temp / "pixels.npy", np.ascontiguousarray(pixels, dtype=np.uint8))
    except BaseException:
        artifacts.remove_folder(str(temp.relative_to(artifacts.absolute(""))))
        raise
    return save_stored_pixels(engine, name, source, temp, n, int(pixels.shape[1]), int(pixels.shape[3]), label_index,
                              classes, names, hashes, split)


ROW_CHUNK = 10_000  # image rows inserted per statement: an import of a million never builds them all at once


def save_stored_pixels(engine: Engine, name: str, source: str, temp: Path, n: int, image_size: int, channels: int,
                       label_index: Optional[np.ndarray], classes: list[str], names: Iterable[str],
                       hashes: Sequence[str] | np.ndarray, split: Optional[np.ndarray] = None,
                       before_move: Optional[Callable[[], None]] = None) -> int:
    """Store a dataset whose pixels.npy is already written in `temp` (a folder of
    artifacts.new_temp_folder, holding nothing else); returns its id. The folder is renamed into
    place inside the database transaction, and removed on any failure: all or nothing.

    label_index: (n,) class indices into `classes` (-1 or None for an image without one), or None;
    split: (n,) "train" / "test", or bool (True: test); None: seeded_test_mask(n);
    names: n names, read once in order; hashes: n sha256 hex strings, or an (n, 32) uint8 array of
    digests. Image rows are inserted ROW_CHUNK at a time, so memory does not grow with n.
    before_move: called once the rows are in, before the rename (to remove work files from `temp`)."""
    moved: Optional[Path] = None
    try:
        name = check_dataset_name(name)
        if n == 0:
            raise ValueError(f"dataset {name!r} has no images")
        split = seeded_test_mask(n) if split is None else split
        try:
            with transaction(engine) as session:
                if queries.dataset_by_name(session, name) is not None:
                    raise ValueError(_taken(name))
                dataset = Dataset(
                    name=name, source=source, n_images=n, image_size=image_size,
                    channels=channels, classes=classes, folder="",
                    created_by=None if source.startswith("builtin") else access.who(),
                )
                session.add(dataset)
                session.flush()  # another process's committed row with this name fails here
                dataset.folder = artifacts.dataset_folder(dataset.id)
                session.add(DatasetVersion(dataset_id=dataset.id, version=1, note="imported"))
                session.flush()
                connection = session.connection()
                for rows in _image_rows(dataset.id, n, names, label_index, split, hashes):
                    connection.execute(insert(ImageRow.__table__), rows)
                if before_move is not None:
                    before_move()
                final = artifacts.absolute(dataset.folder)
                final.parent.mkdir(parents=True, exist_ok=True)
                artifacts.remove_folder(dataset.folder)  # a leftover of an id reused after a failure
                os.replace(temp, final)
                moved = final
                dataset_id = dataset.id
        except IntegrityError:
            # two processes passed the check above at once; the database's unique name decided
            if _name_taken(engine, name):
                raise ValueError(_taken(name)) from None
            raise
    except BaseException:
        artifacts.remove_folder(str(temp.relative_to(artifacts.absolute(""))))
        if moved is not None:  # renamed into place, then the commit failed: the row is gone, so is this
            shutil.rmtree(moved, ignore_errors=True)
        raise
    return dataset_id


def _image_rows(dataset_id: int, n: int, names: Iterable[str], label_index: Optional[np.ndarray], split: np.ndarray,
                hashes: Sequence[str] | np.ndarray) -> Iterator[list[dict]]:
    """The image rows, ROW_CHUNK at a time."""
    names = iter(names)
    digests = isinstance(hashes, np.ndarray) and hashes.ndim == 2
    for start in range(0, n, ROW_CHUNK):
        stop = min(n, start + ROW_CHUNK)
        chunk_names = [fitted_image_name(next(names)) for _ in range(start, stop)]
        chunk_labels = ([None] * (stop - start) if label_index is None
                        else [None if label < 0 else label for label in np.asarray(label_index[start:stop]).tolist()])
        chunk_hashes = ([row.tobytes().hex() for row in np.asarray(hashes[start:stop])] if digests
                        else [str(h) for h in hashes[start:stop]])
        chunk_split = ([("test" if s else "train") for s in split[start:stop].tolist()] if split.dtype == bool
                       else [str(s) for s in split[start:stop]])
        yield [{"dataset_id": dataset_id, "position": start + i, "name": chunk_names[i], "label": chunk_labels[i],
                "split": chunk_split[i], "sha256": chunk_hashes[i]} for i in range(stop - start)]


def _taken(name: str) -> str:
    return f"a dataset named {name!r} already exists; choose another name"


def _name_taken(engine: Engine, name: str) -> bool:
    with transaction(engine) as session:
        return queries.dataset_by_name(session, name) is not None


def is_dataset_id(text: str) -> bool:
    """Whether `text` reads as a dataset id: ASCII digits only (not "²" or "٣")."""
    return text.isascii() and text.isdigit()


def check_dataset_name(name: str) -> str:
    """The name, stripped; ValueError when it is empty, only digits (those are read as ids), holds
    an @ (NAME@VERSION names a version, core.data.versions) or is longer than its column
    (PostgreSQL refuses what SQLite would have kept)."""
    name = (name or "").strip()
    if not name:
        raise ValueError("a dataset needs a name")
    if name.isdigit():
        raise ValueError(f"a dataset name cannot be only digits: numbers are dataset ids (got {name!r})")
    if "@" in name:
        raise ValueError(f"a dataset name cannot hold '@': NAME@VERSION names a version of a dataset (got {name!r})")
    longest = Dataset.__table__.c.name.type.length
    if len(name) > longest:
        raise ValueError(f"a dataset name can have at most {longest} characters; this one has {len(name)}")
    return name


def fitted_image_name(name: str) -> str:
    """An image's name as stored: one longer than its column (a deep path inside a zip) keeps
    its end, where the file's own name is, after an ellipsis."""
    longest = ImageRow.__table__.c.name.type.length
    return name if len(name) <= longest else "…" + name[-(longest - 1):]


def check_trainable(class_counts: Mapping[object, int], supervised: bool, dataset_name: str = "",
                    classes: Optional[Sequence[str]] = None) -> None:
    """ValueError, with the reason and what to do, when a dataset cannot train the chosen objective.

    class_counts: images per label (label index or name; None for unlabeled images), e.g.
    queries.class_counts of the images training will use. supervised: whether positives come
    from labels (contrastive, triplet or SupCon with labels) rather than two views of one image.
    Any objective needs two images; a supervised one needs two classes and a class with two images.
    """
    what = f"dataset {dataset_name!r}" if dataset_name else "the dataset"
    total = sum(int(n) for n in class_counts.values())
    if total < 2:
        raise ValueError(f"{what} has {total} image{'' if total == 1 else 's'}; training needs at least two: add images")
    if not supervised:
        return
    labelled = {label: int(n) for label, n in class_counts.items() if label is not None and n > 0}
    ssl_hint = "or choose InfoNCE to learn from two augmented views of each image"

    def shown(label) -> str:
        if classes is not None and isinstance(label, (int, np.integer)) and 0 <= label < len(classes):
            return str(classes[label])
        return str(label)

    if not labelled:
        raise ValueError(f"{what} has no labels; a supervised objective needs at least two classes: "
                         f"import images in one folder per class, {ssl_hint}")
    if len(labelled) == 1:
        (only,) = labelled
        raise ValueError(f"{what} has one class ({shown(only)}); a supervised objective needs at least two: "
                         f"add images of another class, {ssl_hint}")
    if max(labelled.values()) < 2:
        raise ValueError(f"{what} has {len(labelled)} classes of one image each; a supervised objective needs a class "
                         f"with at least two images to form a positive pair: add images to a class, {ssl_hint}")


def _label_indices(labels, classes, n):
    if labels is None or all(label is None for label in labels):
        return None, []
    if classes is not None:
        return np.asarray(labels, dtype=np.int64), list(classes)
    if any(label is None for label in labels):
        raise ValueError("some images have a class folder and some do not; put every image in a class folder")
    classes = sorted(set(labels))
    lookup = {c: i for i, c in enumerate(classes)}
    return np.array([lookup[label] for label in labels], dtype=np.int64), classes


def ensure_builtin(engine: Engine, name: str) -> int:
    """The id of a built-in dataset, importing it on first use."""
    with transaction(engine) as session:
        existing = queries.dataset_by_name(session, name)
        if existing is not None:
            return existing.id
    pixels, labels, split, classes = load_builtin(name)
    hashes = [format(zlib.crc32(p.tobytes()), "08x") + f"-{i}" for i, p in enumerate(pixels)]
    names = [f"{name}/{i:05d}" for i in range(len(pixels))]
    try:
        return save_dataset(engine, name, f"builtin:{name}", pixels, labels, names, hashes, classes, split)
    except ValueError:
        # another process imported it at the same moment
        with transaction(engine) as session:
            existing = queries.dataset_by_name(session, name)
            if existing is None:
                raise
            return existing.id


def resolve_dataset(engine: Engine, name_or_id: str | int, import_builtin: bool = True) -> Dataset:
    """A stored dataset by id or name; built-ins are imported on first use (unless import_builtin
    is False: then a built-in not imported yet is a LookupError like any missing dataset).

    An all-digit string is an id. LookupError when nothing matches; ValueError when an id names
    one dataset and an older dataset is also named with those digits (names that are only digits
    are refused now, but a database may hold one from before).
    """
    key = name_or_id.strip() if isinstance(name_or_id, str) else name_or_id
    with transaction(engine) as session:
        if isinstance(key, int) and not isinstance(key, bool):
            dataset = session.get(Dataset, key)
            if dataset is None:
                raise LookupError(f"no dataset with id {key}; `python -m core datasets` lists them")
            return dataset
        key = str(key)
        if is_dataset_id(key):
            by_id = session.get(Dataset, int(key))
            by_name = queries.dataset_by_name(session, key)
            if by_id is not None and by_name is not None and by_id.id != by_name.id:
                raise ValueError(
                    f"{key!r} is ambiguous: it is the id of dataset {by_id.name!r} and the name of dataset "
                    f"{by_name.id}; give {by_name.id} for the one named {key!r}, or rename it")
            dataset = by_id or by_name
            if dataset is None:
                raise LookupError(f"no dataset with id {key}; `python -m core datasets` lists them")
            return dataset
        dataset = queries.dataset_by_name(session, key)
        if dataset is not None:
            return dataset
    if key in builtin_names() and import_builtin:
        dataset_id = ensure_builtin(engine, key)
        with transaction(engine) as session:
            return session.get(Dataset, dataset_id)
    raise LookupError(f"no dataset named {key!r}; `python -m core datasets` lists them")


def pixels_path(dataset: Dataset) -> Path:
    """The dataset's pixel array file. A built-in dataset whose file is gone (a data folder wiped
    on restart while the database lives on) is written again from its source; for an imported
    one, LookupError naming the missing file."""
    path = artifacts.absolute(dataset.folder) / "pixels.npy"
    if path.exists():
        return path
    if dataset.source.startswith("builtin:"):
        pixels = load_builtin(dataset.source.split(":", 1)[1])[0]
        if len(pixels) != dataset.n_images:
            raise LookupError(f"the built-in dataset {dataset.name!r} has {len(pixels)} images on this machine, "
                              f"not the {dataset.n_images} it was stored with; its file {path} cannot be restored")
        path.parent.mkdir(parents=True, exist_ok=True)
        artifacts.save_array_atomic(path, np.ascontiguousarray(pixels, dtype=np.uint8))
        return path
    raise LookupError(f"the images of dataset {dataset.name!r} are gone: {path} is missing (the data folder "
                      "was wiped or moved since they were imported); import them again")


def load_arrays(engine: Engine, dataset_id: int, version: int = 1) -> DatasetArrays:
    """The dataset's pixels with the labels, splits and excluded images of `version` (1: as imported;
    core.data.versions). LookupError for a dataset or version that does not exist."""
    with transaction(engine) as session:
        dataset = queries.get_dataset(session, dataset_id)
        table = queries.dataset_image_table(session, dataset_id, version)
        classes = list(dataset.classes)
        path = pixels_path(dataset)
    pixels = np.load(path, mmap_mode="r")
    labels = None if not classes else np.array([image.label for image in table], dtype=np.int64)
    split = np.array([image.split for image in table])
    excluded = np.array([image.excluded for image in table], dtype=bool)
    return DatasetArrays(pixels=pixels, labels=labels, split=split, classes=classes,
                         excluded=excluded if excluded.any() else None)
