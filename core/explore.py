"""What the Explore, Triplets and Data pages ask for: thumbnails, neighbours, search by image."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np
from sqlalchemy import Engine

from core.display import enlarge
from core.images import decode_image, fit_square, png_data_url
from core.search import NeighbourIndex
from storage import artifacts
from storage.db import transaction
from storage.schema import Dataset, Run


def run_embeddings(engine: Engine, run_id: int) -> np.ndarray:
    with transaction(engine) as session:
        run = session.get(Run, run_id)
        if run is None or not run.embeddings:
            raise LookupError(f"run {run_id} has no embeddings yet")
        path = run.embeddings
    return np.load(artifacts.absolute(path))


@dataclass
class RunIndex:
    """A run's neighbour index with its dataset's labels: built once, then only read (cache it)."""

    index: NeighbourIndex
    labels: list[Optional[int]]
    classes: list[str]

    def hits(self, distances: np.ndarray, ids: np.ndarray) -> list[dict]:
        return [{"position": int(i), "distance": float(d), "label": _label_name(self.labels[int(i)], self.classes)}
                for d, i in zip(distances, ids)]


def load_run_index(engine: Engine, run_id: int) -> RunIndex:
    from storage.queries import dataset_image_table

    embeddings = run_embeddings(engine, run_id)
    with transaction(engine) as session:
        run = session.get(Run, run_id)
        labels = [row[2] for row in dataset_image_table(session, run.dataset_id)]
        classes = list(run.dataset.classes)
    return RunIndex(NeighbourIndex(embeddings), labels, classes)


def dataset_pixels(engine: Engine, dataset_id: int) -> np.ndarray:
    with transaction(engine) as session:
        folder = session.get(Dataset, dataset_id).folder
    return np.load(artifacts.absolute(folder) / "pixels.npy", mmap_mode="r")


def thumbnails(pixels: np.ndarray, rows: np.ndarray | list[int]) -> list[str]:
    """PNG data URLs of the given rows (what a Vega tooltip shows in a field named `image`)."""
    return [png_data_url(enlarge(np.asarray(pixels[int(i)]))) for i in rows]


def search_by_image(engine: Engine, run_id: int, data: bytes, name: str, k: int = 5,
                    run_index: Optional[RunIndex] = None) -> list[dict]:
    """The k images of the run's dataset nearest to an uploaded image, embedded with the run's encoder.

    Raises ImageRejected for a bad image and LookupError for a run without an encoder.
    """
    from core.training import embed

    with transaction(engine) as session:
        run = session.get(Run, run_id)
        if run is None:
            raise LookupError(f"run {run_id} does not exist")
        if run.status != "completed" or not run.checkpoint or not run.embeddings:
            raise LookupError(f"run {run_id} has no encoder and embeddings to search with (it is {run.status})")
        checkpoint, size, n_images, key = run.checkpoint, run.dataset.image_size, run.dataset.n_images, run.cache_key
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_images:
        raise ValueError(f"k must be from 1 to {n_images} (the run's number of images), got {k}")
    pixels = fit_square(decode_image(data, name), size)  # embed() matches the encoder's channels
    query = embed(_cached_encoder(str(artifacts.absolute(checkpoint)), key), pixels[None], "cpu")
    run_index = run_index or load_run_index(engine, run_id)
    distances, ids = run_index.index.search(query, k)
    return run_index.hits(distances[0], ids[0])


@lru_cache(maxsize=4)
def _cached_encoder(path: str, run_key: str):
    """run_key (Run.cache_key) makes a recreated run with the same id and path miss the cache."""
    from models.checkpoint import load_checkpoint

    model, _ = load_checkpoint(path)
    return model


def _label_name(label: Optional[int], classes: list[str]) -> Optional[str]:
    return None if label is None else classes[label]


INTERACTIVE_POINTS = 4000  # hover thumbnails and clicks stay quick in the browser up to here
DENSITY_BINS = 90


def map_layers(coords: np.ndarray, pixels: np.ndarray, labels: list[Optional[int]], classes: list[str],
               seed: int = 0) -> tuple["pd.DataFrame", Optional[np.ndarray]]:
    """(interactive points, density picture of all points or None).

    Points: a bounded sample (every point when there are few) with x, y, position, label and a
    thumbnail data URL in `image` (the field name Vega's tooltip shows as a picture). A big run
    also gets a cheap view of every point: a (DENSITY_BINS, DENSITY_BINS) uint8 picture, dark
    where points are dense, north up. (A Vega layer under the selectable one breaks Streamlit's
    selections, so the full view is a picture beside the chart.)
    """
    import pandas as pd

    n = len(coords)
    if n > INTERACTIVE_POINTS:
        rows = np.sort(np.random.default_rng(seed).choice(n, INTERACTIVE_POINTS, replace=False))
    else:
        rows = np.arange(n)
    points = pd.DataFrame({
        "x": coords[rows, 0], "y": coords[rows, 1], "position": rows,
        "label": [_label_name(labels[i], classes) or "unlabeled" for i in rows],
        "image": thumbnails(pixels, rows),
    })
    if n <= INTERACTIVE_POINTS:
        return points, None
    counts, _, _ = np.histogram2d(coords[:, 0], coords[:, 1], bins=DENSITY_BINS)
    shade = np.log1p(counts.T[::-1])  # rows are y from the top, as in the scatter
    picture = 255 - np.round(255 * shade / max(shade.max(), 1e-9)).astype(np.uint8)
    return points, picture


def neighbours(run_index: RunIndex, position: int, k: int = 8) -> list[dict]:
    """The k nearest images to stored image `position` of the run (itself left out)."""
    distances, ids = run_index.index.neighbours_of(position, k)
    return run_index.hits(distances, ids)
