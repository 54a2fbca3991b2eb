"""Comparing two runs over the images they share: where their neighbourhoods agree, which queries
got better or worse, and whether a metric's change is more than noise.

Two runs share images when they embedded the same dataset (matched by position) or two datasets
whose images have the same content (matched by sha256: two versions of a dataset, or the same
images imported twice). Everything below is over those S shared images:

- **neighbourhood agreement** of an image: the Jaccard overlap |N_A ∩ N_B| / |N_A ∪ N_B| of its k
  nearest other shared images in A (N_A) and in B (N_B), k = 10 by default (k shrinks to S − 1).
  The runs' stored statistics hold each image's nearest neighbours over its whole run
  (core.explore.failures, K = 10); read in order and kept where shared, they are the k nearest
  shared ones whenever at least k of them are shared, so only the other images (and every image
  when k > K) are searched again, among the shared images only.
- **queries**: the images both runs evaluated as a retrieval query (their stored statistics give
  each a finite average precision: labelled, in the evaluated set, with another evaluated member
  of its class). Each query's figures are its own run's: its average precision as MAP@R defines
  it (core.explore.metrics) and whether its nearest other evaluated image carries its label
  (Precision@1's term), both against its run's own evaluated set and labels. So A's Precision@1
  and MAP@R over the queries equal core.explore.metrics.retrieval_metrics of A's evaluated set
  when every query is shared.
- **differences** B − A, overall and per class, each with a bootstrap 95% interval: the queries
  are resampled with replacement within each class (paired: a resampled query brings its A and B
  values along, so what the runs share cancels), RESAMPLES times with a seeded generator, and
  the 2.5th and 97.5th percentiles of the resampled mean difference are the interval. Classes
  keep their query counts in every resample, as the test split fixes them.
- **confusion difference**: per query class (row), the shares of queries whose nearest evaluated
  image carries each class (column), in B minus in A; its diagonal is the per-class Precision@1
  difference.

Classes are matched by name (two datasets may order them differently); a query's class, for the
per-class table, is its label in A. Neighbour lists of an approximate index (runs past
core.explore.search.APPROXIMATE_ABOVE images) make the agreement approximate too.

`compare_runs(engine, a, b)` reads two stored runs and returns a `Comparison`: numpy arrays over
the shared images and the queries (for maps and charts), small row lists (for tables), and
`to_dict()` for `python -m core compare --json`. No streamlit here: a page calls compare_runs in a
job or a cached function and draws what it returns.

Measured on the shared 2-core machine under a load average of 4–9 (bench/compare.py: Fashion-MNIST's
70,000 images, two runs of 64 dimensions, 10,000 test queries, 1,000 resamples): 0.5–1.3 s a call,
the goal being 10 s; matched by sha256 instead of position 0.9 s. Too long for a page's script
thread on a loaded host: a page caches it per pair of runs (Run.cache_key).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from sqlalchemy import Engine

from core.explore.failures import RunStatistics, _nearest_others
from core.explore.search import NeighbourIndex, as_normalised_float32
from core.training.config import flat_settings, setting_text, setting_title

DEFAULT_K = 10
# bootstrap resamples: across 5 seeds on the bench's 10,000 queries the overall interval's ends
# moved by at most 0.001, a class's (1,000 queries) by 0.0015 (MAP@R) and 0.004 (Precision@1)
RESAMPLES = 1000
SEED = 0
TOP = 5  # results shown beside each query that got better or worse
ROWS = 20  # rows of each table: images that moved most, queries that got worse, better
CONFIDENCE = 0.95
METRICS = ("precision_at_1", "map_at_r")
METRIC_NAMES = {"precision_at_1": "Precision@1", "map_at_r": "MAP@R"}
_DRAWS_PER_BLOCK = 1 << 21  # bootstrap draws per block (8 MB of int32, 16 MB of counts)
_JACCARD_ROWS = 8192  # images per block of the k × k overlap


@dataclass(frozen=True)
class ComparedRun:
    """What the comparison reads of one run: its embeddings (N, d), its stored statistics (over
    the same N images), its dataset's class names, and its settings as flat setting → value."""

    run_id: int
    embeddings: np.ndarray
    stats: RunStatistics
    classes: list[str]
    settings: dict = field(default_factory=dict)

    @property
    def n_images(self) -> int:
        return len(self.stats.labels)


@dataclass
class Comparison:
    """Run B against run A over their S shared images and Q shared queries.

    Shared image i is image positions_a[i] of A's dataset and positions_b[i] of B's. Query j is
    shared image queries[j]. Row lists are small and JSON-ready (None for a missing value)."""

    run_a: int
    run_b: int
    k: int  # neighbours per image behind the agreement (DEFAULT_K, or S − 1 on tiny sets)
    aligned_by: str  # "position" (one dataset) or "sha256" (two datasets with images in common)
    classes: list[str]  # A's class names, then B's that A lacks; labels index these
    positions_a: np.ndarray  # (S,) int64
    positions_b: np.ndarray  # (S,) int64
    labels: np.ndarray  # (S,) int64: the image's label in A (-1 unlabelled)
    agreement: np.ndarray  # (S,) float32 in [0, 1]
    neighbours_a: np.ndarray  # (S, k) int64: shared indices of the k nearest in A
    neighbours_b: np.ndarray  # (S, k) int64: same in B
    n_images_a: int
    n_images_b: int
    queries: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # (Q,) shared indices
    ap_a: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (Q,) float64
    ap_b: np.ndarray = field(default_factory=lambda: np.zeros(0))
    correct_a: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # (Q,) nearest carries the label
    correct_b: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    overall: list = field(default_factory=list)  # rows: metric, a, b, difference, low, high
    per_class: list = field(default_factory=list)  # rows: class, name, n_queries, <metric>_{a,b,difference,low,high}
    confusion_a: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # (C, C) rows sum to 1 (or 0)
    confusion_b: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    moved: list = field(default_factory=list)  # the images with the lowest agreement
    worse: list = field(default_factory=list)  # the queries whose AP fell most, with both runs' results
    better: list = field(default_factory=list)  # the queries whose AP rose most
    settings: list = field(default_factory=list)  # rows: setting, a, b, differs
    resamples: int = RESAMPLES
    seed: int = SEED

    @property
    def ap_change(self) -> np.ndarray:
        """(Q,) B's average precision minus A's, per query."""
        return self.ap_b - self.ap_a

    @property
    def flip(self) -> np.ndarray:
        """(Q,) int8: +1 the nearest neighbour's label went wrong → right, −1 right → wrong, 0 neither."""
        return self.correct_b.astype(np.int8) - self.correct_a.astype(np.int8)

    @property
    def mean_agreement(self) -> float:
        return float(self.agreement.astype(np.float64).mean())

    @property
    def has_metrics(self) -> bool:
        return bool(self.overall)

    @property
    def confusion_difference(self) -> np.ndarray:
        """(C, C) B's row-normalised nearest-neighbour confusion minus A's."""
        return self.confusion_b - self.confusion_a

    def counts(self) -> dict[str, int]:
        change, flip = self.ap_change, self.flip
        return {"shared_images": int(len(self.positions_a)), "queries": int(len(self.queries)),
                "better": int((change > 0).sum()), "worse": int((change < 0).sum()),
                "unchanged": int((change == 0).sum()),
                "wrong_to_right": int((flip > 0).sum()), "right_to_wrong": int((flip < 0).sum())}

    def image_values(self, name: str, side: str) -> np.ndarray:
        """A colour column for one run's map: (N,) float32 over that run's dataset positions
        (side "a" or "b"), NaN where the image is not shared (or, for the per-query values, not
        a shared query). name: "agreement", "ap_change" or "flip"."""
        if side not in ("a", "b"):
            raise ValueError(f"side must be 'a' or 'b', got {side!r}")
        positions = self.positions_a if side == "a" else self.positions_b
        out = np.full(self.n_images_a if side == "a" else self.n_images_b, np.nan, dtype=np.float32)
        if name == "agreement":
            out[positions] = self.agreement
        elif name in ("ap_change", "flip"):
            out[positions[self.queries]] = getattr(self, name)
        else:
            raise ValueError(f"no per-image value {name!r}; choose agreement, ap_change or flip")
        return out

    def to_dict(self) -> dict:
        """The figures and tables as plain JSON values (no NaN): what `--json` prints."""
        return _finite({
            "run_a": self.run_a, "run_b": self.run_b, "k": self.k, "aligned_by": self.aligned_by,
            **self.counts(), "mean_agreement": self.mean_agreement,
            "median_agreement": float(np.median(self.agreement)),
            "resamples": self.resamples, "seed": self.seed, "confidence": CONFIDENCE,
            "overall": self.overall, "per_class": self.per_class, "classes": self.classes,
            "confusion_difference": self.confusion_difference.tolist(),
            "moved": self.moved, "worse": self.worse, "better": self.better, "settings": self.settings,
        })


# ----------------------------------------------------------------------------- reading runs


def compare_runs(engine: Engine, run_a: int, run_b: int, k: int = DEFAULT_K, metrics: bool = True,
                 resamples: int = RESAMPLES, seed: int = SEED, rows: int = ROWS, top: int = TOP) -> Comparison:
    """Compare stored run B with run A (both completed, with their statistics computed).

    metrics False: neighbourhood agreement only (what unlabelled runs can have). ValueError with
    a sentence for an unknown run, the same run twice, a run not completed or without embeddings
    or statistics, runs that share no image, and unlabelled runs when metrics are asked."""
    run_a, run_b = _run_id(run_a), _run_id(run_b)
    if run_a == run_b:
        raise ValueError(f"run {run_a} is compared with itself; give two different runs")
    a, dataset_a = _read_run(engine, run_a)
    b, dataset_b = _read_run(engine, run_b)
    if dataset_a["id"] == dataset_b["id"]:
        positions_a = positions_b = np.arange(a.n_images, dtype=np.int64)
        aligned_by = "position"
    else:
        positions_a, positions_b = _shared_by_hash(engine, dataset_a, dataset_b)
        aligned_by = "sha256"
        if not len(positions_a):
            raise ValueError(f"runs {run_a} and {run_b} share no images: datasets {dataset_a['name']!r} and "
                             f"{dataset_b['name']!r} have no image with the same content")
    return compare(a, b, positions_a, positions_b, k=k, metrics=metrics, resamples=resamples, seed=seed,
                   rows=rows, top=top, aligned_by=aligned_by)


def _run_id(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        try:
            return int(str(value).strip())
        except ValueError:
            raise ValueError(f"a run is named by its id, a whole number; got {value!r}") from None
    return int(value)


def parse_run_pair(runs: list[str]) -> tuple[int, int]:
    """The command line's `--runs A B` as two run ids; ValueError with a sentence otherwise."""
    if len(runs) != 2:
        raise ValueError(f"--runs takes two run ids, A then B; got {len(runs)}: {' '.join(runs)}")
    return _run_id(runs[0]), _run_id(runs[1])


def parse_k(text: str) -> int:
    """The command line's `--k`: a whole number of neighbours from 1."""
    try:
        k = int(str(text).strip())
    except ValueError:
        k = 0
    if k < 1:
        raise ValueError(f"--k must be a whole number of neighbours from 1, got {text!r}")
    return k


def _read_run(engine: Engine, run_id: int) -> tuple[ComparedRun, dict]:
    """The run's embeddings, statistics, classes and settings, and its dataset (id, name, n_images)."""
    from core.explore.failures import STATISTICS_PARAMS
    from core.explore.service import job_state, load_run_statistics, run_embeddings, statistics_path
    from storage import queries
    from storage.db import transaction
    from storage.status import RunStatus

    with transaction(engine) as session:
        try:
            run = queries.get_run(session, run_id)
        except LookupError as exc:
            raise ValueError(str(exc)) from None
        if run.status != RunStatus.COMPLETED:
            raise ValueError(f"run {run_id} is {run.status}, not completed: only a completed run's embeddings "
                             "can be compared")
        if not run.embeddings:
            raise ValueError(f"run {run_id} has no embeddings to compare")
        dataset = {"id": run.dataset_id, "name": run.dataset.name, "n_images": run.dataset.n_images}
        classes = list(run.dataset.classes)
        settings = {"dataset": run.dataset.name, "dataset version": run.dataset_version, "kind": run.kind,
                    **flat_settings({k: v for k, v in (run.config or {}).items() if k != "dataset"})}
    try:
        embeddings = run_embeddings(engine, run_id)
    except LookupError as exc:
        raise ValueError(str(exc)) from None
    path = statistics_path(engine, run_id)
    if path is None:
        state = job_state(engine, run_id, "statistics", STATISTICS_PARAMS)
        why = "were never computed" if state is None else f"are not ready (their job is {state.status})"
        raise ValueError(f"run {run_id}'s statistics {why}; `python -m core project --run {run_id}` computes them")
    try:
        stats = load_run_statistics(path)
    except LookupError as exc:
        raise ValueError(f"run {run_id}'s statistics are gone: {exc}") from None
    if not len(embeddings) == len(stats.labels) == dataset["n_images"]:
        raise ValueError(f"run {run_id} does not add up: {len(embeddings)} embeddings, statistics of "
                         f"{len(stats.labels)} images, a dataset of {dataset['n_images']}; compute it again")
    return ComparedRun(run_id, embeddings, stats, classes, settings), dataset


def _shared_by_hash(engine: Engine, dataset_a: dict, dataset_b: dict) -> tuple[np.ndarray, np.ndarray]:
    """(positions in A, positions in B) of the images whose sha256 both datasets hold, by A's position."""
    from storage import queries
    from storage.db import transaction

    with transaction(engine) as session:
        hashes_a = np.array(queries.dataset_image_hashes(session, dataset_a["id"]))
        hashes_b = np.array(queries.dataset_image_hashes(session, dataset_b["id"]))
    _, in_a, in_b = np.intersect1d(hashes_a, hashes_b, assume_unique=True, return_indices=True)
    order = np.argsort(in_a, kind="stable")
    return in_a[order].astype(np.int64), in_b[order].astype(np.int64)


# ----------------------------------------------------------------------------- the comparison


def compare(a: ComparedRun, b: ComparedRun, positions_a: np.ndarray, positions_b: np.ndarray, *,
            k: int = DEFAULT_K, metrics: bool = True, resamples: int = RESAMPLES, seed: int = SEED,
            rows: int = ROWS, top: int = TOP, aligned_by: str = "position") -> Comparison:
    """Compare B with A over shared images: image positions_a[i] of A is image positions_b[i] of B
    (each (S,), no repeats). See the module's docstring for what each figure means."""
    positions_a = np.asarray(positions_a, dtype=np.int64)
    positions_b = np.asarray(positions_b, dtype=np.int64)
    _check_positions(positions_a, positions_b, a, b)
    n_shared = len(positions_a)
    if n_shared < 2:
        raise ValueError(f"runs {a.run_id} and {b.run_id} share {n_shared} image{'s' * (n_shared != 1)}; "
                         "comparing neighbourhoods needs at least two")
    for name, value, low in (("k", k, 1), ("resamples", resamples, 1), ("rows", rows, 0), ("top", top, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be a whole number from {low}, got {value!r}")
    if metrics:
        for run in (a, b):
            if not (run.stats.labels >= 0).any():
                raise ValueError(f"run {run.run_id}'s dataset is unlabelled: Precision@1 and MAP@R need labels; "
                                 "compare neighbourhood agreement alone (--agreement-only)")
    k = min(int(k), n_shared - 1)

    neighbours_a = _shared_neighbours(a, positions_a, k)
    neighbours_b = _shared_neighbours(b, positions_b, k)
    classes, to_unified_b = _unified_classes(a.classes, b.classes)
    labels_a = a.stats.labels[positions_a]
    comparison = Comparison(
        run_a=a.run_id, run_b=b.run_id, k=k, aligned_by=aligned_by, classes=classes,
        positions_a=positions_a, positions_b=positions_b, labels=labels_a,
        agreement=jaccard(neighbours_a, neighbours_b), neighbours_a=neighbours_a, neighbours_b=neighbours_b,
        n_images_a=a.n_images, n_images_b=b.n_images, resamples=int(resamples), seed=int(seed),
        settings=settings_rows(a.settings, b.settings))
    comparison.moved = _moved_rows(comparison, classes, int(rows))
    if metrics:
        _add_metrics(comparison, a, b, to_unified_b, int(resamples), int(seed), int(rows), int(top))
    return comparison


def _check_positions(positions_a: np.ndarray, positions_b: np.ndarray, a: ComparedRun, b: ComparedRun) -> None:
    if positions_a.ndim != 1 or positions_a.shape != positions_b.shape:
        raise ValueError(f"shared positions must be two lists of one length; got shapes {positions_a.shape} "
                         f"and {positions_b.shape}")
    for positions, run in ((positions_a, a), (positions_b, b)):
        if len(positions) and (positions.min() < 0 or positions.max() >= run.n_images):
            raise ValueError(f"shared positions of run {run.run_id} must be from 0 to {run.n_images - 1}")
        if len(positions) and np.bincount(positions).max() > 1:
            raise ValueError(f"shared positions of run {run.run_id} name an image twice")


def _shared_neighbours(run: ComparedRun, positions: np.ndarray, k: int) -> np.ndarray:
    """(S, k) int64: each shared image's k nearest other shared images in `run`, as shared
    indices, nearest first. From the stored neighbours where they hold k shared ones, else searched."""
    n_shared = len(positions)
    stored = run.stats.neighbours[positions]  # (S, K) positions in the run, nearest first
    if n_shared == run.n_images and np.array_equal(positions, np.arange(n_shared)):
        candidates = stored  # every image is shared, at its own position
    else:
        to_shared = np.full(run.n_images, -1, dtype=np.int64)
        to_shared[positions] = np.arange(n_shared)
        candidates = to_shared[stored]
    valid = candidates >= 0
    enough = valid.sum(axis=1) >= k
    out = np.empty((n_shared, k), dtype=np.int64)
    if enough.any():
        # the first k valid entries of each row, in order: a stable sort puts valid ones first
        order = np.argsort(~valid[enough], axis=1, kind="stable")[:, :k]
        out[enough] = np.take_along_axis(candidates[enough], order, axis=1)
    missing = np.flatnonzero(~enough)
    if len(missing):
        unit = as_normalised_float32(run.embeddings[positions])
        index = NeighbourIndex(unit)
        _, ids = _nearest_others(index, unit[missing], missing, k, lambda _: None)
        out[missing] = ids
    return out


def jaccard(neighbours_a: np.ndarray, neighbours_b: np.ndarray) -> np.ndarray:
    """(S,) float32: |A_i ∩ B_i| / |A_i ∪ B_i| of each row's two sets of k distinct ids."""
    n, k = neighbours_a.shape
    common = np.empty(n, dtype=np.int64)
    for start in range(0, n, _JACCARD_ROWS):
        block = slice(start, start + _JACCARD_ROWS)
        common[block] = (neighbours_a[block, :, None] == neighbours_b[block, None, :]).sum(axis=(1, 2))
    return (common / np.maximum(2 * k - common, 1)).astype(np.float32)


def _unified_classes(classes_a: list[str], classes_b: list[str]) -> tuple[list[str], np.ndarray]:
    """A's class names then B's that A lacks, and B's class index → index in that list."""
    classes = list(classes_a) + [name for name in classes_b if name not in classes_a]
    return classes, np.array([classes.index(name) for name in classes_b], dtype=np.int64)


def _in_unified(labels: np.ndarray, to_unified: np.ndarray) -> np.ndarray:
    out = np.full(labels.shape, -1, dtype=np.int64)
    labelled = labels >= 0
    out[labelled] = to_unified[labels[labelled]]
    return out


class _Evaluated:
    """A run's evaluated images (its metric queries and their candidates), with an exact index
    over them built on first need."""

    def __init__(self, run: ComparedRun) -> None:
        self.run = run
        self.rows = np.flatnonzero(run.stats.evaluated)
        self._index: Optional[NeighbourIndex] = None
        self._unit: Optional[np.ndarray] = None

    def nearest(self, queries: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances, positions), each (Q, count'), count' = min(count, evaluated − 1): the
        nearest other evaluated images of evaluated images `queries` (run positions)."""
        count = min(count, len(self.rows) - 1)
        if self._index is None:
            self._unit = as_normalised_float32(self.run.embeddings[self.rows])
            self._index = NeighbourIndex(self._unit, approximate=False)
        row = np.searchsorted(self.rows, queries)
        distances, ids = _nearest_others(self._index, self._unit[row], row, count, lambda _: None)
        return distances, self.rows[ids]

    def first(self, queries: np.ndarray) -> np.ndarray:
        """(Q,) the nearest other evaluated image of each query: the first evaluated one among the
        stored whole-run neighbours (nearest first, so it is the nearest), searched when none is."""
        stored = self.run.stats.neighbours[queries]
        evaluated = self.run.stats.evaluated[stored]
        found = evaluated.any(axis=1)
        nearest = stored[np.arange(len(queries)), evaluated.argmax(axis=1)]
        if not found.all():
            nearest[~found] = self.nearest(queries[~found], 1)[1][:, 0]
        return nearest


def _add_metrics(c: Comparison, a: ComparedRun, b: ComparedRun, to_unified_b: np.ndarray, resamples: int,
                 seed: int, rows: int, top: int) -> None:
    ap_a_all, ap_b_all = a.stats.ap[c.positions_a], b.stats.ap[c.positions_b]
    queries = np.flatnonzero(np.isfinite(ap_a_all) & np.isfinite(ap_b_all))
    if not len(queries):
        raise ValueError(f"runs {a.run_id} and {b.run_id} have no query in common: no shared image is an "
                         "evaluated, labelled query (with another image of its class) in both")
    query_a, query_b = c.positions_a[queries], c.positions_b[queries]
    evaluated_a, evaluated_b = _Evaluated(a), _Evaluated(b)
    nearest_a, nearest_b = evaluated_a.first(query_a), evaluated_b.first(query_b)
    label_a = a.stats.labels[query_a]
    label_b = _in_unified(b.stats.labels[query_b], to_unified_b)
    found_a = a.stats.labels[nearest_a]
    found_b = _in_unified(b.stats.labels[nearest_b], to_unified_b)
    c.queries = queries
    c.ap_a, c.ap_b = ap_a_all[queries].astype(np.float64), ap_b_all[queries].astype(np.float64)
    c.correct_a, c.correct_b = found_a == label_a, found_b == label_b

    values_a = np.stack([c.correct_a.astype(np.float64), c.ap_a], axis=1)
    values_b = np.stack([c.correct_b.astype(np.float64), c.ap_b], axis=1)
    n_classes = len(c.classes)
    overall, per_class = paired_bootstrap(values_a, values_b, label_a, n_classes, resamples, seed)
    mean_a, mean_b = values_a.mean(axis=0), values_b.mean(axis=0)
    c.overall = [{"metric": name, "a": float(mean_a[m]), "b": float(mean_b[m]),
                  "difference": float(mean_b[m] - mean_a[m]), "low": float(overall[m, 0]),
                  "high": float(overall[m, 1])} for m, name in enumerate(METRICS)]
    c.per_class = []
    for cls in range(n_classes):
        members = label_a == cls
        if not members.any():
            continue
        row = {"class": cls, "name": c.classes[cls], "n_queries": int(members.sum())}
        for m, name in enumerate(METRICS):
            va, vb = float(values_a[members, m].mean()), float(values_b[members, m].mean())
            row.update({f"{name}_a": va, f"{name}_b": vb, f"{name}_difference": vb - va,
                        f"{name}_low": float(per_class[cls, m, 0]), f"{name}_high": float(per_class[cls, m, 1])})
        c.per_class.append(row)
    c.confusion_a = _confusion(label_a, found_a, n_classes)
    c.confusion_b = _confusion(label_b, found_b, n_classes)

    change = c.ap_change
    worse = np.flatnonzero(change < 0)
    worse = worse[np.lexsort((queries[worse], change[worse]))][:rows]
    better = np.flatnonzero(change > 0)
    better = better[np.lexsort((queries[better], -change[better]))][:rows]
    c.worse = _query_rows(c, worse, a, b, evaluated_a, evaluated_b, to_unified_b, top)
    c.better = _query_rows(c, better, a, b, evaluated_a, evaluated_b, to_unified_b, top)


def paired_bootstrap(values_a: np.ndarray, values_b: np.ndarray, groups: np.ndarray, n_groups: int,
                     resamples: int = RESAMPLES, seed: int = SEED,
                     confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap intervals of mean(values_b − values_a), overall and per group.

    values_a, values_b: (Q, M), row q the same query in both runs, M metrics. groups: (Q,) ints
    from 0 to n_groups − 1 (the query's class). Queries are resampled with replacement within
    each group, `resamples` times (a seeded generator), the pairs kept together. Returns
    (overall (M, 2), per_group (n_groups, M, 2)): the low and high ends; NaN for a group with no
    query. Cost: resamples × Q draws (in blocks of _DRAWS_PER_BLOCK) and a (resamples, Q) × (Q, M)
    product of draw counts and differences."""
    difference = np.asarray(values_b, dtype=np.float64) - np.asarray(values_a, dtype=np.float64)
    groups = np.asarray(groups, dtype=np.int64)
    if difference.ndim != 2 or groups.shape != (len(difference),):
        raise ValueError(f"values must be (queries, metrics) with one group per query; got {difference.shape} "
                         f"and {groups.shape}")
    if len(groups) and (groups.min() < 0 or groups.max() >= n_groups):
        raise ValueError(f"groups must be from 0 to {n_groups - 1}")
    n, m = difference.shape
    rng = np.random.default_rng(seed)
    totals = np.zeros((resamples, m))
    per_group = np.full((n_groups, m, 2), np.nan)
    tail = (1 - confidence) / 2 * 100
    for group in range(n_groups):
        members = difference[groups == group]
        size = len(members)
        if not size:
            continue
        sums = np.empty((resamples, m))
        block = max(1, _DRAWS_PER_BLOCK // size)
        for start in range(0, resamples, block):
            count = min(block, resamples - start)
            # how often each member is drawn in each resample, then one matrix product: a third
            # of the time of gathering and summing (count, size, m) values
            picks = rng.integers(0, size, (count, size), dtype=np.int32)  # 4× faster to draw than int64
            picks += np.arange(count, dtype=np.int32)[:, None] * np.int32(size)
            times = np.bincount(picks.ravel(), minlength=count * size).reshape(count, size)
            sums[start:start + count] = times.astype(np.float64) @ members
        totals += sums
        per_group[group] = np.percentile(sums / size, [tail, 100 - tail], axis=0).T
    overall = np.percentile(totals / max(n, 1), [tail, 100 - tail], axis=0).T if n else np.full((m, 2), np.nan)
    return overall, per_group


def _confusion(query_labels: np.ndarray, found_labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) per query class, the shares of its queries whose nearest result carries each class
    (an unlabelled result counts in no column)."""
    counted = found_labels >= 0
    pairs = query_labels[counted] * n_classes + found_labels[counted]
    counts = np.bincount(pairs, minlength=n_classes * n_classes).reshape(n_classes, n_classes).astype(np.float64)
    queries = np.bincount(query_labels, minlength=n_classes).astype(np.float64)[:, None]
    return np.divide(counts, queries, out=np.zeros_like(counts), where=queries > 0)


def _name(label: int, classes: list[str]) -> Optional[str]:
    return None if label < 0 else classes[int(label)]


def _moved_rows(c: Comparison, classes: list[str], rows: int) -> list[dict]:
    """The images whose neighbourhoods changed most: lowest agreement first, ties by A's position;
    each with its k nearest in A and in B (each run's dataset positions)."""
    order = np.lexsort((c.positions_a, c.agreement))[:rows]
    return [{"position_a": int(c.positions_a[i]), "position_b": int(c.positions_b[i]),
             "label": _name(int(c.labels[i]), classes), "agreement": float(c.agreement[i]),
             "neighbours_a": c.positions_a[c.neighbours_a[i]].tolist(),
             "neighbours_b": c.positions_b[c.neighbours_b[i]].tolist()} for i in order]


def _query_rows(c: Comparison, picked: np.ndarray, a: ComparedRun, b: ComparedRun, evaluated_a: _Evaluated,
                evaluated_b: _Evaluated, to_unified_b: np.ndarray, top: int) -> list[dict]:
    """Rows of the queries `picked` (indices into c.queries), with each run's top results."""
    if not len(picked):
        return []
    shared = c.queries[picked]
    query_a, query_b = c.positions_a[shared], c.positions_b[shared]
    results_a = evaluated_a.nearest(query_a, top)
    results_b = evaluated_b.nearest(query_b, top)
    out = []
    for j, i in enumerate(picked):
        label_a = int(a.stats.labels[query_a[j]])
        label_b = int(_in_unified(b.stats.labels[query_b[j:j + 1]], to_unified_b)[0])
        out.append({
            "position_a": int(query_a[j]), "position_b": int(query_b[j]), "label": _name(label_a, c.classes),
            "label_b": _name(label_b, c.classes), "ap_a": float(c.ap_a[i]), "ap_b": float(c.ap_b[i]),
            "ap_change": float(c.ap_b[i] - c.ap_a[i]),
            "correct_a": bool(c.correct_a[i]), "correct_b": bool(c.correct_b[i]),
            "results_a": _results(results_a[0][j], results_a[1][j], a.stats.labels, np.arange(len(a.classes)),
                                  label_a, c.classes),
            "results_b": _results(results_b[0][j], results_b[1][j], b.stats.labels, to_unified_b, label_b, c.classes),
        })
    return out


def _results(distances: np.ndarray, positions: np.ndarray, labels: np.ndarray, to_unified: np.ndarray,
             query_label: int, classes: list[str]) -> list[dict]:
    found = _in_unified(labels[positions], to_unified)
    return [{"position": int(p), "label": _name(int(f), classes), "distance": float(d),
             "correct": bool(f == query_label)} for p, f, d in zip(positions, found, distances)]


def settings_rows(settings_a: dict, settings_b: dict) -> list[dict]:
    """Both runs' settings, one row per setting either has (sorted by name), the differences marked;
    "title" is the setting's name as the Train form shows it (core.training.config.setting_title)."""
    rows = []
    for name in sorted(set(settings_a) | set(settings_b)):
        va, vb = settings_a.get(name), settings_b.get(name)
        rows.append({"setting": name, "title": setting_title(name), "a": va, "b": vb, "differs": va != vb})
    return rows


def _finite(value):
    """NaN and infinity (which JSON lacks) as None, inside lists and dicts; numpy scalars as Python's."""
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ----------------------------------------------------------------------------- the command line


def comparison_text(c: Comparison) -> str:
    """The headline figures as a readable table: what `python -m core compare` prints."""
    counts = c.counts()
    how = "the same dataset" if c.aligned_by == "position" else "images matched by content (sha256)"
    lines = [f"run {c.run_b} (B) against run {c.run_a} (A): {counts['shared_images']:,} shared images ({how})",
             f"neighbourhood agreement (Jaccard of the {c.k} nearest): mean {c.mean_agreement:.3f}, "
             f"median {float(np.median(c.agreement)):.3f}"]
    if not c.has_metrics:
        lines.append("no retrieval metrics compared (agreement only)")
    else:
        lines += [f"queries: {counts['queries']:,}; average precision better for {counts['better']:,}, worse for "
                  f"{counts['worse']:,}, unchanged for {counts['unchanged']:,}; nearest neighbour wrong → right "
                  f"{counts['wrong_to_right']:,}, right → wrong {counts['right_to_wrong']:,}", ""]
        pct = f"{CONFIDENCE:.0%}"
        table = [["metric", "A", "B", "B − A", f"{pct} interval"]]
        for row in c.overall:
            table.append([METRIC_NAMES[row["metric"]], f"{row['a']:.4f}", f"{row['b']:.4f}",
                          f"{row['difference']:+.4f}", f"[{row['low']:+.4f}, {row['high']:+.4f}]"])
        lines += _table(table) + [""]
        table = [["class", "queries", "P@1 A", "P@1 B", "ΔP@1", f"ΔP@1 {pct}", "MAP@R A", "MAP@R B", "ΔMAP@R",
                  f"ΔMAP@R {pct}"]]
        for row in c.per_class:
            table.append([str(row["name"]), f"{row['n_queries']:,}"] + [
                cell for name in METRICS for cell in (
                    f"{row[name + '_a']:.3f}", f"{row[name + '_b']:.3f}", f"{row[name + '_difference']:+.3f}",
                    f"[{row[name + '_low']:+.3f}, {row[name + '_high']:+.3f}]")])
        lines += _table(table)
    differing = [row for row in c.settings if row["differs"]]
    lines.append("")
    if differing:
        lines.append(f"settings that differ ({len(c.settings) - len(differing)} others the same):")
        lines += _table([["setting", "A", "B"]] + [[row["title"], setting_text(row["a"]), setting_text(row["b"])]
                                                   for row in differing])
    else:
        lines.append("the two runs' settings are the same")
    return "\n".join(lines)


def _table(cells: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell; the first column left-aligned, the rest right."""
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            .rstrip() for row in cells]
