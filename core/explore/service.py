"""What the Explore, Triplets and Data pages ask for: the map's files, neighbours, failing queries,
label errors, search by images."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np
from sqlalchemy import Engine, func, select

from core.data.images import decode_image, fit_square
from core.explore.search import NeighbourIndex
from storage import artifacts, queries
from storage.run_files import RunFiles
from storage.db import transaction
from storage.schema import DatasetVersion, ImageRow, Run


@dataclass(frozen=True)
class ExploreRun:
    """What the Explore page opens a completed run with: its metrics, its dataset's class names and
    each image's label as the run's version of the dataset has it (by position; None when
    unlabeled), the run's embeddings file, and the
    stored files of its after-work (paths relative to the data home; None until that job is done)."""

    run_id: int
    run_key: str  # Run.cache_key: every cache of the page is keyed by it
    dataset_id: int
    dataset_version: int  # the version of the dataset it ran on, whose labels `labels` are (core.data.versions)
    classes: list[str]
    labels: list[Optional[int]]
    metrics: dict
    embeddings: Optional[str]
    umap_path: Optional[str]  # the UMAP map with the default parameters
    statistics_path: Optional[str]
    evolution_path: Optional[str]
    has_probe: bool  # a training run that embedded its probe after every epoch (a map across epochs can exist)


def explore_run(engine: Engine, run_id: int) -> ExploreRun:
    """LookupError (storage.queries.get_run's sentence) when there is no such run."""
    from core.explore.evolution import probe_epochs
    from core.explore.projection import UMAP_DEFAULTS, params_key

    with transaction(engine) as session:
        run = queries.get_run(session, run_id)
        labels = _run_labels(engine, session, run)
        umap = queries.projection(session, run_id, "umap", params_key(UMAP_DEFAULTS))
        read = dict(run_id=run_id, run_key=run.cache_key, dataset_id=run.dataset_id, dataset_version=run.dataset_version,
                    classes=list(run.dataset.classes), labels=labels, metrics=dict(run.metrics or {}),
                    embeddings=run.embeddings, umap_path=umap.path if umap is not None and umap.status == "done" else None)
    return ExploreRun(**read, statistics_path=statistics_path(engine, run_id),
                      evolution_path=evolution_path(engine, run_id), has_probe=bool(probe_epochs(run_id)))


_LABELS: dict[tuple, list] = {}  # run_labels' answers, the last few (a million labels: ~8 MB each)
_LABELS_KEPT = 4


def _run_labels(engine: Engine, session, run: Run) -> list:
    """Every image's label as the run's dataset version holds it (queries.run_image_table), kept
    per process: the Explore page asks on every rerun (a click on the map is one), and reading a
    million image rows took 3.6 s of a 1M run's 4 s click → neighbours. The key names what can
    change the answer: the database, the dataset (ids never reused; its creation time besides),
    the version's own row (edits are stored only with a new version row, so a version's edits
    never change) and the dataset's images (images added later get new positions)."""
    version_row = session.scalar(select(DatasetVersion.id).where(DatasetVersion.dataset_id == run.dataset_id,
                                                                 DatasetVersion.version == run.dataset_version))
    images = session.execute(select(func.count(), func.max(ImageRow.position))
                             .where(ImageRow.dataset_id == run.dataset_id)).one()
    key = (engine.url.render_as_string(hide_password=False), run.dataset.cache_key, run.dataset_version, version_row,
           tuple(images))
    labels = _LABELS.get(key)
    if labels is None:
        labels = [image.label for image in queries.run_image_table(session, run)]
        while len(_LABELS) >= _LABELS_KEPT:
            _LABELS.pop(next(iter(_LABELS)))
        _LABELS[key] = labels
    return list(labels)  # a copy: a caller may change its own


FIND_LIMIT = 20_000  # images a find selects at most (the first, by position)


def find_images(engine: Engine, run_id: int, text: str) -> tuple[list[int], str]:
    """The positions of run `run_id`'s images labelled `text` when it names a class (case-
    insensitive), else of those whose file name holds it; ascending, at most FIND_LIMIT; and a
    sentence saying what matched. A class name finds its class only: "8" once also selected the
    422 images of every class whose file name holds an 8. An empty or blank text finds nothing."""
    wanted = text.strip().lower()
    shown = text.strip()
    if not wanted:
        return [], "Type a class name or part of a file name."
    with transaction(engine) as session:
        run = queries.get_run(session, run_id)
        classes = [str(name).lower() for name in run.dataset.classes]
        rows = queries.run_image_table(session, run)  # the labels of the version it ran on
    if wanted in classes:
        found = [i for i, image in enumerate(rows) if image.label is not None and classes[image.label] == wanted]
        sentence = (f"Found {len(found):,} image{'s' * (len(found) != 1)} labelled {shown!r}." if found else
                    f"No image of this run is labelled {shown!r} (the class has none in its version).")
    else:
        found = [i for i, image in enumerate(rows) if wanted in image.name.lower()]
        sentence = (f"Found {len(found):,} image{'s' * (len(found) != 1)} whose file name contains {shown!r}."
                    if found else f"No class is named {shown!r} and no file name contains it.")
    if len(found) > FIND_LIMIT:
        sentence += f" Selected the first {FIND_LIMIT:,}."
    return found[:FIND_LIMIT], sentence


@dataclass(frozen=True)
class JobState:
    """A run's after-work job as its row stands: status (queued, running, done, failed,
    interrupted, cancelled), the phase it is in, its progress in [0, 1] (None: unknown), what it
    says it does, and why it ended (failed, interrupted)."""

    status: str
    phase: Optional[str]
    progress: Optional[float]
    message: Optional[str]
    reason: Optional[str]


def job_state(engine: Engine, run_id: int, method: str, params: dict) -> Optional[JobState]:
    """The run's `method` job (statistics, umap, evolution) for `params`; None when never queued."""
    from core.explore.projection import params_key

    with transaction(engine) as session:
        row = queries.projection(session, run_id, method, params_key(params))
        return None if row is None else JobState(row.status, row.phase, row.progress, row.message, row.reason)


def map_coordinates(engine: Engine, run_id: int, method: str, path: Optional[str]) -> np.ndarray:
    """(N, 2) float32: the run's stored UMAP map at `path` (method "umap"), else a PCA of its embeddings."""
    from core.explore.projection import project_pca

    if method == "umap":
        return np.load(artifacts.absolute(path))
    return project_pca(run_embeddings(engine, run_id))


def run_embeddings(engine: Engine, run_id: int) -> np.ndarray:
    with transaction(engine) as session:
        run = session.get(Run, run_id)
        if run is None or not run.embeddings:
            raise LookupError(f"run {run_id} has no embeddings yet")
        path = run.embeddings
    try:
        return np.load(artifacts.absolute(path))
    except FileNotFoundError:
        raise LookupError(f"run {run_id}'s embeddings are gone: {artifacts.absolute(path)} is missing (the data "
                          "folder was wiped or moved since the run); train or embed again") from None


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
    """The run's stored approximate index when its statistics job built one (runs past
    core.explore.search.APPROXIMATE_ABOVE images), else an exact index built here (a copy of the vectors)."""
    from storage.queries import run_image_table

    embeddings = run_embeddings(engine, run_id)
    with transaction(engine) as session:
        run = session.get(Run, run_id)
        labels = [image.label for image in run_image_table(session, run)]
        classes = list(run.dataset.classes)
    stored = artifacts.absolute(RunFiles(run_id).index)
    if stored.is_dir():
        index = NeighbourIndex.load(stored, expected_rows=len(embeddings))
    else:
        index = NeighbourIndex(embeddings, approximate=False)
    return RunIndex(index, labels, classes)


def dataset_pixels(engine: Engine, dataset_id: int) -> np.ndarray:
    from core.data.datasets import pixels_path

    with transaction(engine) as session:
        path = pixels_path(queries.get_dataset(session, dataset_id))
    return np.load(path, mmap_mode="r")


def search_by_image(engine: Engine, run_id: int, data: bytes, name: str, k: int = 5,
                    run_index: Optional[RunIndex] = None) -> list[dict]:
    """The k images of the run's dataset nearest to an uploaded image, embedded with the run's encoder.

    Raises ImageRejected for a bad image and LookupError for a run without an encoder.
    """
    each, _ = search_by_images(engine, run_id, [(data, name)], k, run_index)
    return each[0]


@lru_cache(maxsize=4)
def _cached_encoder(path: str, run_key: str):
    """run_key (Run.cache_key) makes a recreated run with the same id and path miss the cache."""
    from models.checkpoint import load_checkpoint

    model, _ = load_checkpoint(path)
    return model


def _label_name(label: Optional[int], classes: list[str]) -> Optional[str]:
    return None if label is None else classes[label]


def neighbours(run_index: RunIndex, position: int, k: int = 8) -> list[dict]:
    """The k nearest images to stored image `position` of the run (itself left out)."""
    distances, ids = run_index.index.neighbours_of(position, k)
    return run_index.hits(distances, ids)


def statistics_path(engine: Engine, run_id: int) -> Optional[str]:
    """The stored statistics file of the run (relative to the data home), None until its job is done."""
    from core.explore.failures import STATISTICS_PARAMS
    from core.explore.projection import params_key
    from storage.queries import projection

    with transaction(engine) as session:
        row = projection(session, run_id, "statistics", params_key(STATISTICS_PARAMS))
        return row.path if row is not None and row.status == "done" else None


def load_run_statistics(path: str):
    from core.explore.failures import load_statistics

    return load_statistics(artifacts.absolute(path))


def map_payload(engine: Engine, run_id: int, method: str, coords: np.ndarray, colour: str,
                stats=None) -> dict:
    """What the map component needs, as small arguments: URLs of the files it fetches (written
    here once: coordinates, labels, the chosen colour column; image sprites when they exist or
    the dataset is small), the class names, and the colour legend with its counts. The mining
    colourings read the run's counts summed over its epochs (core.training.tally_files)."""
    from core.explore import map_files
    from storage.queries import run_image_table

    with transaction(engine) as session:
        run = session.get(Run, run_id)
        run_key, dataset_id, dataset_key = run.cache_key, run.dataset_id, run.dataset.cache_key
        classes = list(run.dataset.classes)
        rows = run_image_table(session, run)  # the labels of the version it ran on
    labels = [image.label for image in rows]
    split = [image.split for image in rows]
    if len(coords) != len(labels):
        raise ValueError(f"run {run_id}'s map has {len(coords)} points but its dataset has {len(labels)} images")
    mining = None
    if colour in map_files.MINING_COLOURINGS:
        from core.training.tally_files import load_mining_counts

        mining = load_mining_counts(run_id)
        if mining is not None and len(mining) != len(labels):
            raise ValueError(f"run {run_id}'s mining counts hold {len(mining)} images but its dataset has {len(labels)}")
    categories, legend = map_files.colour_column(
        colour, labels, classes, split,
        ap=None if stats is None else stats.ap, nn_correct=None if stats is None else stats.nn_correct, mining=mining)
    thumbs = map_files.sprites_if_written(dataset_id, dataset_key, len(labels))
    if thumbs is None and len(labels) <= SMALL_DATASET:
        thumbs = map_files.write_sprites(dataset_id, dataset_key, dataset_pixels(engine, dataset_id))
    return {
        "points_url": map_files.write_points(run_id, run_key, method, coords),
        "labels_url": map_files.write_labels(dataset_id, dataset_key, labels),
        "colour_url": map_files.write_colour(run_id, run_key, colour, categories),
        "n": len(labels), "classes": classes or ["unlabeled"], "legend": legend,
        "colour_title": map_files.COLOURINGS[colour], "thumbs": None if thumbs is None else thumbs.as_dict(),
    }


SMALL_DATASET = 5000  # sprites of a dataset up to this size are written on first view (well under a second)


def evolution_path(engine: Engine, run_id: int) -> Optional[str]:
    """The stored map across epochs of the run (relative to the data home), None until its job is done."""
    from core.explore.evolution import EVOLUTION_PARAMS
    from core.explore.projection import params_key
    from storage.queries import projection

    with transaction(engine) as session:
        row = projection(session, run_id, "evolution", params_key(EVOLUTION_PARAMS))
        return row.path if row is not None and row.status == "done" else None


def evolution_payload(engine: Engine, run_id: int, path: str) -> tuple[dict, np.ndarray]:
    """What the map component needs to play the run's map across epochs (core.explore.evolution), and
    the dataset position of each of its points (the probe: the map's events name points, the
    page names images). The arguments are map_payload's, coloured by label (by split when the
    dataset has none), showing the last epoch, plus `frames`: [{url, epoch, precision_at_1}] in
    epoch order, and `positions_url`."""
    from core.explore import map_files
    from core.explore.evolution import load_evolution
    from storage.queries import run_image_table

    evolution = load_evolution(path)
    with transaction(engine) as session:
        run = session.get(Run, run_id)
        run_key, dataset_id, dataset_key = run.cache_key, run.dataset_id, run.dataset.cache_key
        classes = list(run.dataset.classes)
        rows = run_image_table(session, run)
    if len(evolution.positions) and int(evolution.positions.max()) >= len(rows):
        raise ValueError(f"run {run_id}'s map across epochs names images its dataset of {len(rows)} does not have")
    labels = [rows[int(i)].label for i in evolution.positions]
    split = [rows[int(i)].split for i in evolution.positions]
    colour = "label" if any(label is not None for label in labels) else "split"
    categories, legend = map_files.colour_column(colour, labels, classes, split)
    urls = map_files.write_frames(run_id, run_key, "evolution", evolution.maps)
    thumbs = map_files.sprites_if_written(dataset_id, dataset_key, len(rows))
    if thumbs is None and len(rows) <= SMALL_DATASET:
        thumbs = map_files.write_sprites(dataset_id, dataset_key, dataset_pixels(engine, dataset_id))
    arguments = {
        "points_url": urls[-1],
        "labels_url": map_files.write_labels(dataset_id, dataset_key, labels),
        "colour_url": map_files.write_colour(run_id, run_key, f"{colour}-probe", categories),
        "positions_url": map_files.write_positions(run_id, run_key, "probe", evolution.positions),
        "n": len(labels), "classes": classes or ["unlabeled"], "legend": legend,
        "colour_title": map_files.COLOURINGS[colour], "thumbs": None if thumbs is None else thumbs.as_dict(),
        "frames": [{"url": url, "epoch": int(epoch), "precision_at_1": p1}
                   for url, epoch, p1 in zip(urls, evolution.epochs, evolution.precision_at_1)],
    }
    return arguments, evolution.positions


@dataclass
class EvaluatedIndex:
    """An exact index over the run's evaluated images (its metric queries), so a failing query's
    results are the very ranking its average precision was computed from."""

    index: NeighbourIndex
    positions: np.ndarray  # index row → dataset position

    def ranking(self, position: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances, dataset positions) of the k nearest other evaluated images of `position`."""
        row = int(np.searchsorted(self.positions, position))
        if row >= len(self.positions) or self.positions[row] != position:
            raise ValueError(f"image {position} is not one of the run's evaluated queries")
        k = max(1, min(int(k), self.index.size - 1))
        distances, rows = self.index.neighbours_of(row, k)
        return distances, self.positions[rows]


def evaluated_index(engine: Engine, run_id: int, evaluated: np.ndarray) -> EvaluatedIndex:
    embeddings = run_embeddings(engine, run_id)
    positions = np.flatnonzero(evaluated)
    return EvaluatedIndex(NeighbourIndex(embeddings[positions], approximate=False), positions)


def query_rows(ranker: EvaluatedIndex, stats, positions, k: int, classes: list[str]) -> list[dict]:
    """One row per query position: its label, AP, and its top-k evaluated results, each with its
    label, distance and whether it is relevant (carries the query's label)."""
    rows = []
    for position in positions:
        position = int(position)
        label = int(stats.labels[position])
        distances, ids = ranker.ranking(position, k)
        rows.append({
            "position": position, "label": _label_name(None if label < 0 else label, classes),
            "ap": float(stats.ap[position]),
            "hits": _marked_hits(stats, label, ids, distances, classes),
        })
    return rows


def label_error_rows(stats, errors: list[dict], k: int, classes: list[str]) -> list[dict]:
    """core.explore.failures.label_errors rows with names and the neighbours that outvoted the label."""
    rows = []
    for error in errors:
        position = int(error["position"])
        neighbours = stats.neighbours[position][:k]
        rows.append({
            **error, "label_name": _label_name(int(error["label"]), classes),
            "suspect_name": _label_name(int(error["suspect_label"]), classes),
            "hits": _marked_hits(stats, stats.labels[position], neighbours, stats.distances[position][:k], classes),
        })
    return rows


def _marked_hits(stats, label: int, ids, distances, classes: list[str]) -> list[dict]:
    """Results with their label's name, distance, and whether they carry `label`."""
    return [{"position": int(i), "distance": float(d),
             "label": _label_name(None if stats.labels[i] < 0 else int(stats.labels[i]), classes),
             "correct": bool(stats.labels[i] == label)} for i, d in zip(ids, distances)]


PLACE_K = 10  # the neighbours a query's place on the map is drawn from


def place_on_map(coords: np.ndarray, hits: list[dict], k: int = PLACE_K) -> np.ndarray:
    """Where a searched image lands on a run's map: the mean of the map coordinates of its k
    nearest images (hits: search_by_images' rows, nearest first), weighted by 1 / (distance + 0.05)
    so an image's near copy pulls it onto itself. UMAP's own `transform` needs the fitted model,
    which the stored map does not keep; this lands a query among its neighbours on the map
    (tests/test_explore.py measures it by the map's own nearest neighbours). (2,) float."""
    coords = np.asarray(coords, dtype=np.float64)
    near = hits[:k]
    if not near:
        raise ValueError("a query needs at least one neighbour to be placed on the map")
    positions = np.array([hit["position"] for hit in near], dtype=np.int64)
    weights = 1.0 / (np.array([hit["distance"] for hit in near], dtype=np.float64) + 0.05)
    return (coords[positions] * weights[:, None]).sum(axis=0) / weights.sum()


def query_marks(coords: np.ndarray, names: list[str], hits: list[list[dict]]) -> list[dict]:
    """The map component's marks for searched images: [{x, y, name}] in the map's normalised
    coordinates (core.explore.map_files.normalise_like), one per image."""
    from core.explore.map_files import normalise_like

    placed = np.array([place_on_map(coords, each) for each in hits]).reshape(-1, 2)
    return [{"x": float(x), "y": float(y), "name": str(name)}
            for (x, y), name in zip(normalise_like(coords, placed), names)]


def search_by_images(engine: Engine, run_id: int, files: list[tuple[bytes, str]], k: int = 5,
                     run_index: Optional[RunIndex] = None) -> tuple[list[list[dict]], Optional[list[dict]]]:
    """Several uploaded images at once: (each image's k nearest, the k nearest to all of them
    together: the normalised mean of their embeddings; None for a single image).
    ImageRejected names the first bad file before anything is searched."""
    from core.training.loop import embed

    if not files:
        raise ValueError("give at least one image to search with")
    with transaction(engine) as session:
        run = queries.get_run(session, run_id)
        if run.status != "completed" or not run.checkpoint or not run.embeddings:
            raise LookupError(f"run {run_id} has no encoder and embeddings to search with (it is {run.status})")
        checkpoint, size, n_images, key = run.checkpoint, run.dataset.image_size, run.dataset.n_images, run.cache_key
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_images:
        raise ValueError(f"k must be from 1 to {n_images} (the run's number of images), got {k}")
    pixels = np.stack([fit_square(decode_image(data, name), size) for data, name in files])
    vectors = embed(_cached_encoder(str(artifacts.absolute(checkpoint)), key), pixels, "cpu")
    run_index = run_index or load_run_index(engine, run_id)
    distances, ids = run_index.index.search(vectors, k)
    each = [run_index.hits(d, i) for d, i in zip(distances, ids)]
    together = None
    if len(files) > 1:
        d, i = run_index.index.search_centroid(vectors, k)
        together = run_index.hits(d[0], i[0])
    return each, together
