"""Datasets: the built-in ones, saving an import into the store, and loading pixels for training.

A dataset on disk is one uint8 array `pixels.npy` of shape (N, S, S, C) in its folder; the
database holds one row per image (position, name, label, split, sha256).
"""
from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from sqlalchemy import Engine, insert

from storage import artifacts, queries
from storage.db import transaction
from storage.schema import Dataset, ImageRow

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
    """What training needs. pixels: (N, S, S, C) uint8; labels: (N,) int64 or None; split: (N,) '<U5'."""

    pixels: np.ndarray
    labels: Optional[np.ndarray]
    split: np.ndarray
    classes: list[str]

    @property
    def train_index(self) -> np.ndarray:
        return np.flatnonzero(self.split == "train")

    @property
    def test_index(self) -> np.ndarray:
        return np.flatnonzero(self.split == "test")


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
    order = np.random.default_rng(seed).permutation(n)
    split = np.full(n, "train", dtype="<U5")
    n_test = int(round(n * test_fraction)) if n >= 5 else 0
    split[order[:n_test]] = "test"
    return split


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
    name = name.strip()
    if not name:
        raise ValueError("a dataset needs a name")
    n = len(pixels)
    if n == 0:
        raise ValueError(f"dataset {name!r} has no images")
    label_index, classes = _label_indices(labels, classes, n)
    split = seeded_split(n) if split is None else split
    temp = artifacts.new_temp_folder()
    try:
        artifacts.save_array_atomic(temp / "pixels.npy", np.ascontiguousarray(pixels, dtype=np.uint8))
        with transaction(engine) as session:
            if queries.dataset_by_name(session, name) is not None:
                raise ValueError(f"a dataset named {name!r} already exists; choose another name")
            dataset = Dataset(
                name=name, source=source, n_images=n, image_size=int(pixels.shape[1]),
                channels=int(pixels.shape[3]), classes=classes, folder="",
            )
            session.add(dataset)
            session.flush()
            dataset.folder = artifacts.dataset_folder(dataset.id)
            session.execute(
                insert(ImageRow),
                [
                    {
                        "dataset_id": dataset.id, "position": i, "name": names[i],
                        "label": None if label_index is None else int(label_index[i]),
                        "split": str(split[i]), "sha256": hashes[i],
                    }
                    for i in range(n)
                ],
            )
            final = artifacts.absolute(dataset.folder)
            final.parent.mkdir(parents=True, exist_ok=True)
            artifacts.remove_folder(dataset.folder)  # a leftover of an id reused after a failure
            os.replace(temp, final)
            dataset_id = dataset.id
    except BaseException:
        artifacts.remove_folder(str(temp.relative_to(artifacts.absolute(""))))
        raise
    return dataset_id


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


def resolve_dataset(engine: Engine, name_or_id: str | int) -> Dataset:
    """A stored dataset by id or name; built-ins are imported on first use."""
    with transaction(engine) as session:
        if isinstance(name_or_id, int) or str(name_or_id).isdigit():
            dataset = session.get(Dataset, int(name_or_id))
        else:
            dataset = queries.dataset_by_name(session, str(name_or_id))
        if dataset is not None:
            return dataset
    if str(name_or_id) in builtin_names():
        dataset_id = ensure_builtin(engine, str(name_or_id))
        with transaction(engine) as session:
            return session.get(Dataset, dataset_id)
    raise LookupError(f"no dataset named {name_or_id!r}; `python -m core datasets` lists them")


def load_arrays(engine: Engine, dataset_id: int) -> DatasetArrays:
    with transaction(engine) as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None:
            raise LookupError(f"dataset {dataset_id} does not exist")
        table = queries.dataset_image_table(session, dataset_id)
        folder, classes = dataset.folder, list(dataset.classes)
    pixels = np.load(artifacts.absolute(folder) / "pixels.npy", mmap_mode="r")
    labels = None if not classes else np.array([row[2] for row in table], dtype=np.int64)
    split = np.array([row[3] for row in table])
    return DatasetArrays(pixels=pixels, labels=labels, split=split, classes=classes)
