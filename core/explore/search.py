"""Nearest-neighbour search with faiss: inner product on L2-normalised float32 vectors.

Up to APPROXIMATE_ABOVE stored rows the search is exact (a flat index). Above it, an IVF-Flat index
(inner product) answers: the vectors are split into about 4·sqrt(N) lists by k-means, and a query
looks only in the `nprobe` lists whose centres are nearest. nprobe is chosen when the index is
built, as the smallest that finds at least TARGET_RECALL of the exact 10 nearest neighbours of
CALIBRATION_QUERIES stored rows; that measured recall is kept and shown to users.

IVF rather than HNSW: on the 2-core dev machine, 1M × 64 builds in 31 s as IVF (64 s on a busy
machine; bench/explore.py) against an estimated 100 s as HNSW (23.7 s for 250k, M=32), HNSW needs 256 MB more for its links, and IVF's
one knob (nprobe) can be set after training and checked against exact answers in seconds.

Rows that hold NaN or infinity have no place on the unit sphere: they stay NaN through
normalisation, are never stored in the index (so faiss never answers -1 or a NaN distance for
them), and a query made of them is refused.
"""
from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import faiss
import numpy as np

from core.threads import thread_share

APPROXIMATE_ABOVE = 200_000  # more stored rows than this: an IVF index unless told otherwise
TARGET_RECALL = 0.97  # recall@10 the build-time choice of nprobe must reach
CALIBRATION_QUERIES = 1_000  # stored rows whose exact neighbours decide nprobe
MIN_ROWS_PER_LIST = 39  # faiss's k-means wants at least this many training points per list
TRAIN_ROWS_PER_LIST = 40  # training sample: this many rows per list at most (bounded k-means time)
KMEANS_ITERATIONS = 10  # not faiss's 25: training is most of the build (8–16 s at 10), and nprobe is checked after
INDEX_FILE = "neighbours.faiss"
META_FILE = "neighbours.json"
_FORMAT = 1
# Fewer queries than this are answered on one OpenMP thread (of the calling thread only: the
# setting is per thread). On the shared 2-core machine a single query against 70k rows took
# 16–20 ms on two threads at a load average of 3.7 (the second thread waits to be scheduled)
# against 0.7 ms on one. 20 queries took 4.5 ms on two threads and 8.8 on one at a load of 3, but
# 16 ms on two at a load of 2: up to a batch of uploaded images, one thread is the safe choice.
SERIAL_BELOW = 32
_BLOCK = 65_536  # rows normalised at a time, so a million rows need no float64 copy of them all


def nonfinite_rows(embeddings: np.ndarray) -> int:
    """How many rows of `embeddings` (N, d) contain NaN or ±inf (a 1-d array counts as one row)."""
    array = np.asarray(embeddings)
    if array.ndim == 1:
        array = array[None, :]
    return int((~np.isfinite(array)).any(axis=tuple(range(1, array.ndim))).sum()) if len(array) else 0


def as_normalised_float32(vectors: np.ndarray) -> np.ndarray:
    """Contiguous float32 rows of unit length (faiss wants exactly that for cosine search).

    A row holding NaN or infinity comes back all NaN, never as a plausible-looking vector; an
    all-zero row stays zero (it has no direction). Norms are taken in float64, so large finite
    float32 values do not overflow into infinity. Done in blocks of rows, so the float64 copy is
    never bigger than one block.
    """
    vectors = np.asarray(vectors)
    if vectors.ndim == 1:
        vectors = vectors[None, :]
    unit = np.empty(vectors.shape, dtype=np.float32)
    for start in range(0, len(vectors), _BLOCK):
        wide = vectors[start:start + _BLOCK].astype(np.float64, copy=False)
        finite = np.isfinite(wide).all(axis=1, keepdims=True)
        norms = np.linalg.norm(np.where(finite, wide, 0.0), axis=1, keepdims=True)
        unit[start:start + _BLOCK] = np.where(finite, wide / np.maximum(norms, 1e-12), np.nan)
    return unit


class NeighbourIndex:
    """`D, I = index.search(queries, k)`: euclidean distances on the unit sphere and row ids.

    Ids are row numbers of the `embeddings` given; rows with NaN or infinity are left out of the
    index (`size` counts the rows that can be found, `nonfinite` those left out).

    approximate: True for an IVF index, False for exact search, None (default) for IVF only above
    APPROXIMATE_ABOVE stored rows. `kind` is "exact" or "ivf"; for "ivf", `params` holds nlist,
    nprobe, train_rows, calibration_queries and target_recall, and `recall_at_10` the recall
    measured at build (None for exact). `describe()` says it in one line for users.
    """

    def __init__(self, embeddings: np.ndarray, approximate: bool | None = None, *, seed: int = 0) -> None:
        vectors = as_normalised_float32(embeddings)
        finite = np.isfinite(vectors).all(axis=1)
        self._set_rows(len(vectors), np.flatnonzero(~finite))
        if not finite.all():
            vectors = np.ascontiguousarray(vectors[finite])
        if approximate is None:
            approximate = self.size > APPROXIMATE_ABOVE
        self.recall_at_10: float | None = None
        self.params: dict = {}
        if approximate and self.size >= 2:  # fewer than two rows: nothing to approximate
            self.kind = "ivf"
            # k-means, add and the recall calibration are OpenMP regions (faiss's BLAS too): on this
            # process's share of the cores. On faiss's default, two threads on a 2-core machine beside
            # two busy processes, the 1M build took 78-152 s against 25-28 s quiet.
            with _threads_for(self.size):
                self._index = self._build_ivf(vectors, seed)
        else:
            self.kind = "exact"
            self._index = faiss.IndexFlatIP(vectors.shape[1])
            self._index.add(vectors)

    def _set_rows(self, total: int, nonfinite: np.ndarray) -> None:
        finite = np.ones(total, dtype=bool)
        finite[nonfinite] = False
        self._rows = np.flatnonzero(finite)  # index position → row id
        self._position = np.full(total, -1, dtype=np.int64)  # row id → index position
        self._position[self._rows] = np.arange(len(self._rows))
        self.size = len(self._rows)
        self.nonfinite = total - self.size

    def _build_ivf(self, vectors: np.ndarray, seed: int):
        """Train IVF-Flat on a bounded sample, add every row, then pick nprobe by measured recall."""
        n, dim = vectors.shape
        nlist = max(1, min(round(4 * math.sqrt(n)), n // MIN_ROWS_PER_LIST))
        rng = np.random.default_rng(seed)
        train_rows = min(n, TRAIN_ROWS_PER_LIST * nlist)
        sample = vectors if train_rows == n else vectors[np.sort(rng.choice(n, train_rows, replace=False))]
        index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        index.cp.niter, index.cp.seed = KMEANS_ITERATIONS, seed
        index.cp.max_points_per_centroid = TRAIN_ROWS_PER_LIST
        index.cp.min_points_per_centroid = 1  # tiny forced indexes: no warning on stderr
        index.train(sample)
        del sample
        index.add(vectors)
        index.make_direct_map()  # reconstruct(position) for neighbours_of, without a second copy

        queries = np.sort(rng.choice(n, min(CALIBRATION_QUERIES, n), replace=False))
        width = min(11, n)  # 10 others plus the query itself
        _, exact = faiss.knn(vectors[queries], vectors, width, metric=faiss.METRIC_INNER_PRODUCT)
        truth = _others(exact, queries, width - 1)

        def recall(nprobe: int) -> float:
            _, found = index.search(vectors[queries], width, params=faiss.SearchParametersIVF(nprobe=nprobe))
            return _recall(_others(found, queries, width - 1), truth)

        nprobe, reached = fewest_lists(recall, nlist, TARGET_RECALL)
        index.nprobe = nprobe
        self.recall_at_10 = float(reached)
        self.params = {"nlist": int(nlist), "nprobe": int(nprobe), "train_rows": int(train_rows),
                       "calibration_queries": int(len(queries)), "target_recall": TARGET_RECALL}
        return index

    def describe(self) -> str:
        """One line for users: which index answers, and how well the approximate one did at build."""
        if self.kind == "exact":
            return f"exact index: {self.size:,} images"
        return (f"approximate index: IVF {self.params['nlist']:,} lists, nprobe {self.params['nprobe']}, "
                f"recall@10 {self.recall_at_10:.2f} measured at build ({self.size:,} images)")

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances, ids), each (Q, k), nearest first, for one query (d,) or several (Q, d);
        ValueError when k is not from 1 to `size`, a query holds NaN or infinity, or the queries'
        dimension is not the index's. Never an id of -1, never a non-finite distance."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.size:
            raise ValueError(f"k must be from 1 to {self.size} (the number of stored images), got {k}")
        query_vectors = self._query_vectors(queries)
        with _threads_for(len(query_vectors)):
            similarities, positions = self._index.search(query_vectors, int(k))
            if self.kind == "ivf":
                short = np.flatnonzero((positions < 0).any(axis=1))
                if len(short):  # the probed lists held fewer than k rows: look in every list
                    every = faiss.SearchParametersIVF(nprobe=self._index.nlist)
                    similarities[short], positions[short] = self._index.search(query_vectors[short], int(k), params=every)
        # faiss pads with -1 (and a meaningless similarity) where it has fewer than k results; it
        # puts them last, so cutting every row to the shortest row's valid count keeps the order
        found = (positions >= 0) & np.isfinite(similarities)
        width = int(found.all(axis=0).sum()) if not found.all() else int(k)
        similarities, positions = similarities[:, :width], positions[:, :width]
        # ‖a − b‖ = sqrt(2 − 2 a·b) for unit vectors
        distances = np.sqrt(np.clip(2.0 - 2.0 * similarities, 0.0, 4.0))
        return distances, self._rows[positions]

    def search_centroid(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Search by several images at once: (distances, ids), each (1, k), of the normalised mean
        of the normalised queries. ValueError as search, and when the queries cancel out."""
        query_vectors = self._query_vectors(queries)
        if not len(query_vectors):
            raise ValueError("search by several images needs at least one image")
        mean = query_vectors.astype(np.float64).mean(axis=0)
        if np.linalg.norm(mean) < 1e-6:
            raise ValueError(f"the {len(query_vectors)} query images point in opposite directions: their mean has no direction to search with")
        return self.search(mean[None, :], k)

    def _query_vectors(self, queries: np.ndarray) -> np.ndarray:
        query_vectors = as_normalised_float32(queries)
        if query_vectors.ndim != 2 or query_vectors.shape[1] != self._index.d:
            raise ValueError(f"queries must have {self._index.d} dimensions, as the stored embeddings do; "
                             f"got shape {np.shape(queries)}")
        bad = nonfinite_rows(query_vectors)
        if bad:
            raise ValueError(f"{bad} of {len(query_vectors)} queries are NaN or infinite; they have no neighbours")
        return query_vectors

    def neighbours_of(self, row: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest other points of stored row `row` (itself left out); k from 1 to size − 1."""
        if not 0 <= int(row) < len(self._position):
            raise ValueError(f"row must be from 0 to {len(self._position) - 1}, got {row}")
        position = int(self._position[int(row)])
        if position < 0:
            raise ValueError(f"image {row} has a NaN or infinite embedding, so it has no neighbours")
        others = self.size - 1
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= others:
            raise ValueError(f"k must be from 1 to {others} (the number of other stored images), got {k}")
        query = self._index.reconstruct(position)[None, :]
        distances, ids = self.search(query, min(int(k) + 1, self.size))
        keep = ids[0] != row
        return distances[0][keep][:k], ids[0][keep][:k]

    def inverted_lists(self) -> tuple[np.ndarray, list[np.ndarray]]:
        """An IVF index's list centres (nlist, d) float32 and, per list, the row ids stored in it
        (what k-means assigned at build); ValueError for an exact index."""
        if self.kind != "ivf":
            raise ValueError("an exact index has no inverted lists")
        invlists = self._index.invlists
        centres = self._index.quantizer.reconstruct_n(0, self._index.nlist)
        lists = []
        for number in range(self._index.nlist):
            size = invlists.list_size(number)
            positions = faiss.rev_swig_ptr(invlists.get_ids(number), size).copy() if size else np.zeros(0, np.int64)
            lists.append(self._rows[positions])
        return np.asarray(centres, dtype=np.float32), lists

    def save(self, folder: str | os.PathLike) -> None:
        """Write INDEX_FILE and META_FILE into `folder` (created if needed), each to a temporary
        name first and then renamed, the description last: a crash never leaves half a file."""
        from storage.artifacts import temp_file_for

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        index_path, meta_path = folder / INDEX_FILE, folder / META_FILE
        tmp = temp_file_for(index_path)
        try:
            faiss.write_index(self._index, str(tmp))
            _fsync(tmp)
            index_bytes = tmp.stat().st_size
            os.replace(tmp, index_path)
        finally:
            tmp.unlink(missing_ok=True)
        meta = {"format": _FORMAT, "kind": self.kind, "params": self.params, "recall_at_10": self.recall_at_10,
                "rows": len(self._position), "nonfinite_rows": np.flatnonzero(self._position < 0).tolist(),
                "dim": int(self._index.d), "index_bytes": index_bytes}
        tmp = temp_file_for(meta_path)
        try:
            tmp.write_text(json.dumps(meta))
            _fsync(tmp)
            os.replace(tmp, meta_path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, folder: str | os.PathLike, expected_rows: int | None = None) -> "NeighbourIndex":
        """The index `save` wrote into `folder`. ValueError naming the file when one is missing or
        corrupt, or when the index was built for other than `expected_rows` rows (if given)."""
        folder = Path(folder)
        index_path, meta_path = folder / INDEX_FILE, folder / META_FILE
        meta = _read_meta(meta_path)
        if expected_rows is not None and meta["rows"] != expected_rows:
            raise ValueError(f"the neighbour index {meta_path} was built for {meta['rows']:,} rows, "
                             f"not the {expected_rows:,} expected; build it again")
        try:
            on_disk = index_path.stat().st_size
        except FileNotFoundError:
            raise ValueError(f"the neighbour index file {index_path} is missing") from None
        if on_disk != meta["index_bytes"]:
            raise ValueError(f"the neighbour index file {index_path} is corrupt: {on_disk:,} bytes, "
                             f"{meta_path.name} says {meta['index_bytes']:,}")
        try:
            index = faiss.read_index(str(index_path))
        except RuntimeError:
            raise ValueError(f"the neighbour index file {index_path} is corrupt: faiss cannot read it") from None
        loaded = cls.__new__(cls)
        loaded._set_rows(meta["rows"], np.asarray(meta["nonfinite_rows"], dtype=np.int64))
        expected_type = faiss.IndexIVFFlat if meta["kind"] == "ivf" else faiss.IndexFlatIP
        if not isinstance(index, expected_type) or index.ntotal != loaded.size or index.d != meta["dim"]:
            raise ValueError(f"the neighbour index file {index_path} does not match {meta_path.name}: "
                             f"{type(index).__name__} of {index.ntotal:,} × {index.d}, expected {meta['kind']} "
                             f"of {loaded.size:,} × {meta['dim']}")
        loaded.kind, loaded.params, loaded.recall_at_10 = meta["kind"], meta["params"], meta["recall_at_10"]
        if loaded.kind == "ivf":
            index.nprobe = int(loaded.params["nprobe"])  # faiss does not store it
            if index.direct_map.type == faiss.DirectMap.NoMap:
                index.make_direct_map()
        loaded._index = index
        return loaded


def fewest_lists(recall: Callable[[int], float], most: int, target: float) -> tuple[int, float]:
    """(the fewest lists, 1 to `most`, whose recall(lists) reaches `target` (else `most`), that
    recall). Recall only grows with the lists read (a superset of candidates), so it doubles, then
    halves the gap: a power of two alone overshoots, and the cost grows with the lists (a trained
    1M run needed 53 and got 64 in the run's k-NN: 227 s against 109 s)."""
    low, high = 0, 1
    measured = {high: recall(high)}
    while measured[high] < target and high < most:
        low, high = high, min(2 * high, most)
        measured[high] = recall(high)
    while high - low > 1:
        middle = (low + high) // 2
        measured[middle] = recall(middle)
        low, high = (low, middle) if measured[middle] >= target else (middle, high)
    return high, measured[high]


@contextmanager
def _threads_for(queries: int):
    """faiss's threads for this thread's search: one for fewer than SERIAL_BELOW queries, else
    this process's share of the cores (core.threads: faiss's OpenMP threads spin on busy cores)."""
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1 if queries < SERIAL_BELOW else thread_share())
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def _others(ids: np.ndarray, selves: np.ndarray, k: int) -> list[set]:
    """Each row's first k ids other than its own query row (or its first k when it is absent)."""
    return [set(row[row != own][:k].tolist()) for row, own in zip(ids, selves)]


def _recall(found: list[set], truth: list[set]) -> float:
    return float(np.mean([len(f & t) / max(1, len(t)) for f, t in zip(found, truth)]))


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _read_meta(meta_path: Path) -> dict:
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise ValueError(f"the neighbour index file {meta_path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"the neighbour index file {meta_path} is corrupt: {exc}") from None
    fields = {"format": int, "kind": str, "params": dict, "rows": int, "nonfinite_rows": list, "dim": int,
              "index_bytes": int}
    if (not isinstance(meta, dict) or any(not isinstance(meta.get(name), kind) for name, kind in fields.items())
            or meta["kind"] not in ("exact", "ivf") or meta["format"] != _FORMAT
            or (meta["kind"] == "ivf" and not isinstance(meta["params"].get("nprobe"), int))):
        raise ValueError(f"the neighbour index file {meta_path} is corrupt: it lacks or garbles the fields save() writes")
    nonfinite = meta["nonfinite_rows"]
    if (meta["rows"] < 0 or len(set(nonfinite)) != len(nonfinite)
            or not all(isinstance(row, int) and 0 <= row < meta["rows"] for row in nonfinite)):
        raise ValueError(f"the neighbour index file {meta_path} is corrupt: its NaN rows are not rows of the index")
    return meta
