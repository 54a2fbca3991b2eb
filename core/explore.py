"""What the Explore, Triplets and Data pages ask for: thumbnails, neighbours, search by image."""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import numpy as np
from sqlalchemy import Engine

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


def neighbour_index(engine: Engine, run_id: int) -> NeighbourIndex:
    return NeighbourIndex(run_embeddings(engine, run_id))


def dataset_pixels(engine: Engine, dataset_id: int) -> np.ndarray:
    with transaction(engine) as session:
        folder = session.get(Dataset, dataset_id).folder
    return np.load(artifacts.absolute(folder) / "pixels.npy", mmap_mode="r")


def thumbnails(pixels: np.ndarray, rows: np.ndarray | list[int]) -> list[str]:
    """PNG data URLs of the given rows (what a Vega tooltip shows in a field named `image`)."""
    return [png_data_url(np.asarray(pixels[int(i)])) for i in rows]


def search_by_image(engine: Engine, run_id: int, data: bytes, name: str, k: int = 5) -> list[dict]:
    """The k images of the run's dataset nearest to an uploaded image, embedded with the run's encoder.

    Raises ImageRejected for a bad image and LookupError for a run without an encoder.
    """
    import torch

    from core.training import embed

    with transaction(engine) as session:
        run = session.get(Run, run_id)
        if run is None or not run.checkpoint or not run.embeddings:
            raise LookupError(f"run {run_id} has no encoder and embeddings to search with")
        dataset = run.dataset
        checkpoint, size, channels, classes = run.checkpoint, dataset.image_size, dataset.channels, list(dataset.classes)
        dataset_id = dataset.id
    pixels = fit_square(decode_image(data, name), size)
    if pixels.shape[2] != channels:
        pixels = pixels.mean(axis=2, keepdims=True).astype(np.uint8) if channels == 1 else np.repeat(pixels, 3, axis=2)
    model = _cached_encoder(str(artifacts.absolute(checkpoint)))
    with torch.no_grad():
        query = embed(model, pixels[None], "cpu")
    distances, ids = neighbour_index(engine, run_id).search(query, k)
    labels = _labels(engine, dataset_id)
    return [
        {"position": int(i), "distance": float(d), "label": _label_name(labels[int(i)], classes)}
        for d, i in zip(distances[0], ids[0])
    ]


@lru_cache(maxsize=4)
def _cached_encoder(path: str):
    from models.checkpoint import load_checkpoint

    model, _ = load_checkpoint(path)
    return model


def _labels(engine: Engine, dataset_id: int) -> list[Optional[int]]:
    from storage.queries import dataset_image_table

    with transaction(engine) as session:
        return [row[2] for row in dataset_image_table(session, dataset_id)]


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


def neighbours(engine: Engine, run_id: int, position: int, k: int = 8) -> list[dict]:
    """The k nearest images to stored image `position` of the run (itself left out)."""
    with transaction(engine) as session:
        run = session.get(Run, run_id)
        classes, dataset_id = list(run.dataset.classes), run.dataset_id
    distances, ids = neighbour_index(engine, run_id).neighbours_of(position, k)
    labels = _labels(engine, dataset_id)
    return [{"position": int(i), "distance": float(d), "label": _label_name(labels[int(i)], classes)}
            for d, i in zip(distances, ids)]
