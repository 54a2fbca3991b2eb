"""The whole run's k nearest neighbours, computed once per run and read by every job that needs them.

The statistics job (core.explore.failures: nearest-neighbour correctness, likely label errors, the
confusion matrix) and the UMAP map (core.explore.projection: umap's `precomputed_knn`) both need
each image's nearest neighbours over the whole run. Whichever job of the run comes first computes
them and leaves them in the run's `knn/` folder (storage.run_files.RunFiles.knn); the other reads
them. The file names the embeddings file it was computed from, so a run embedded again never reads
the neighbours of its old embeddings.

Layout: `ids.npy` (N, W) int64 and `distances.npy` (N, W) float32, each row's own image first at
distance 0 (as umap's own k-NN returns it), then its W − 1 nearest other images, nearest first;
euclidean distances between the L2-normalised embeddings (the unit sphere). W = KNN_WIDTH covers
the statistics' 10 neighbours and umap's default n_neighbors of 15 (which counts the point itself).

Exact (a faiss flat index, every pair) up to EXACT_UP_TO images, so small runs get exactly the
figures they always had; above, from an IVF index's lists (the run's own search index when it has
one, core.explore.search; else one built for the purpose): each list's rows against the rows of
the lists nearest it, one matrix product per list (_listwise), with the number of lists compared
chosen by the recall@10 it reaches against exact answers, which is kept in `knn.json` and shown
with the statistics.

Cost of the exact search: N² · d multiply-adds (100k × 128: 43 s on the shared 2-core machine at
a load average of 3), so a million images would take hours. At 200k × 128, loaded: IVF build 65 s,
list-wise k-NN 21 s at recall@10 0.999 (faiss's own per-query IVF search of the same index: about
65 s; it reads nprobe lists per query, a terabyte of memory traffic at 1M). bench/scale_stats.py.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from core.explore.search import NeighbourIndex, as_normalised_float32, nonfinite_rows
from core.threads import thread_share

KNN_WIDTH = 16  # own image + 15 others: the statistics' k = 10 and umap's n_neighbors = 15 (itself included)
EXACT_UP_TO = 100_000  # images; more and the whole-run k-NN comes from an IVF index
SEARCH_BLOCK = 16_384  # queries per faiss call (progress, and a bounded (block, W) result)
IDS_FILE, DISTANCES_FILE, META_FILE = "ids.npy", "distances.npy", "knn.json"
UNIT_TOLERANCE = 1e-3  # rows whose norms are all within this of 1 count as already on the unit sphere
_FORMAT = 1
MAX_PROBE_LISTS = 256  # the most lists one list's rows are compared with (the recall decides; see _listwise)


@dataclass
class RunKnn:
    """Each image's own row and W − 1 nearest others (see the module's docstring)."""

    ids: np.ndarray  # (N, W) int64, column 0 = the row itself
    distances: np.ndarray  # (N, W) float32, unit-sphere euclidean, column 0 = 0
    kind: str  # "exact" or "ivf"
    recall_at_10: Optional[float] = None  # the IVF index's, measured at build; None when exact
    unit_rows: bool = True  # whether the embeddings were already unit length (then the euclidean k-NN of the raw rows too)
    source: str = ""  # the embeddings file (relative to the data home) they were computed from
    params: dict = field(default_factory=dict)  # the IVF index's nlist, nprobe, ...

    @property
    def width(self) -> int:
        return int(self.ids.shape[1])

    def describe(self) -> str:
        if self.kind == "exact":
            return f"exact {self.width - 1}-NN of {len(self.ids):,} images"
        probed = (f"each list against its {self.params['probe_lists']} nearest of {self.params.get('nlist', 0):,}"
                  if "probe_lists" in self.params else f"nprobe {self.params.get('nprobe')}")
        return (f"approximate {self.width - 1}-NN of {len(self.ids):,} images (IVF, {probed}, "
                f"recall@10 {self.recall_at_10:.3f} measured at build)")

    def summary(self) -> dict:
        return {"kind": self.kind, "width": self.width, "recall_at_10": self.recall_at_10, "params": self.params}


def compute_run_knn(embeddings: np.ndarray, width: int = KNN_WIDTH, index: Optional[NeighbourIndex] = None,
                    approximate: Optional[bool] = None, source: str = "",
                    on_progress: Optional[Callable[[float], None]] = None) -> RunKnn:
    """The k-NN of every row of `embeddings` (N, d) among all of them, own row first (see the module).

    index: the run's own NeighbourIndex over these embeddings (used as it is: exact or IVF).
    approximate: True / False forces IVF / exact; None (default) is IVF above EXACT_UP_TO rows.
    width shrinks to N. ValueError naming the count for NaN or infinite rows or fewer than 2 rows.
    on_progress(fraction) after each block of queries.
    """
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be one row per image (N, d); got shape {embeddings.shape}")
    n = len(embeddings)
    if n < 2:
        raise ValueError(f"a k-NN needs at least two images; this run has {n}")
    bad = nonfinite_rows(embeddings)
    if bad:
        raise ValueError(f"embeddings of {bad} of {n} images are NaN or infinite; they have no neighbours")
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 2:
        raise ValueError(f"width must be a whole number from 2 (the row itself and one other), got {width}")
    width = min(int(width), n)
    unit_rows = _unit_rows(embeddings)
    unit = as_normalised_float32(embeddings)
    if index is None:
        if approximate is None:
            approximate = n > EXACT_UP_TO
        index = NeighbourIndex(unit, approximate=approximate)
    elif index.size != n:
        raise ValueError(f"the index holds {index.size:,} images but the run has {n:,}")
    if index.kind == "ivf":
        ids, distances, params, recall = _listwise(index, unit, width, on_progress)
        return RunKnn(ids=ids, distances=distances, kind="ivf", recall_at_10=recall, unit_rows=unit_rows,
                      source=source, params=params)
    ids = np.empty((n, width), dtype=np.int64)
    distances = np.empty((n, width), dtype=np.float32)
    for start in range(0, n, SEARCH_BLOCK):
        block = slice(start, min(n, start + SEARCH_BLOCK))
        d, i = index.search(unit[block], width)
        if i.shape[1] < width:  # faiss found fewer (only on degenerate indexes): pad with the last found
            d = np.pad(d, ((0, 0), (0, width - d.shape[1])), mode="edge")
            i = np.pad(i, ((0, 0), (0, width - i.shape[1])), mode="edge")
        i, d = own_point_first(i.astype(np.int64), d.astype(np.float32), np.arange(block.start, block.stop))
        ids[block], distances[block] = i, d
        if on_progress is not None:
            on_progress(block.stop / n)
    return RunKnn(ids=ids, distances=distances, kind=index.kind, recall_at_10=index.recall_at_10,
                  unit_rows=unit_rows, source=source, params=dict(index.params))


def _listwise(index: NeighbourIndex, unit: np.ndarray, width: int,
              on_progress: Optional[Callable[[float], None]]) -> tuple[np.ndarray, np.ndarray, dict, float]:
    """Every row's k-NN from an IVF index's lists, a list at a time: the rows of list l against the
    rows of the P lists whose centres are nearest l's centre (l first), one matrix product each.

    faiss's own IVF search reads nprobe lists per query (a million queries × nprobe · N / nlist
    rows: about a terabyte of memory traffic at 1M × 128, nprobe 8) and searches the quantizer per
    query; here each list's candidates are read once for all its rows, as one BLAS product. P is
    chosen like the index's nprobe (search.fewest_lists): the fewest whose candidate lists hold at
    least search.TARGET_RECALL of the exact 10 nearest others of CALIBRATION_QUERIES random rows
    (exact answers by brute force), so the recall kept with the k-NN is measured, not assumed.
    Returns (ids, distances, params, recall@10)."""
    import faiss

    from core.explore.search import CALIBRATION_QUERIES, TARGET_RECALL, _threads_for, fewest_lists

    n = len(unit)
    centres, lists = index.inverted_lists()
    nlist = len(lists)
    list_of = np.empty(n, dtype=np.int64)
    for number, rows in enumerate(lists):
        list_of[rows] = number
    # each list's nearest lists by centre, itself first
    most = min(nlist, MAX_PROBE_LISTS)
    with _threads_for(nlist):
        _, near = faiss.knn(centres, centres, most, metric=faiss.METRIC_INNER_PRODUCT)
    near = np.where(near < 0, np.arange(nlist)[:, None], near)
    first = np.where(near == np.arange(nlist)[:, None], -1, np.arange(most)[None, :])
    near = np.take_along_axis(near, np.argsort(first, axis=1, kind="stable"), axis=1)

    rng = np.random.default_rng(0)
    queries = np.sort(rng.choice(n, min(CALIBRATION_QUERIES, n), replace=False))
    others = min(10, n - 1)
    with _threads_for(len(queries)):
        _, exact = faiss.knn(np.ascontiguousarray(unit[queries]), unit, others + 1, metric=faiss.METRIC_INNER_PRODUCT)
    is_self = exact == queries[:, None]
    keep = np.where(is_self.any(axis=1, keepdims=True), ~is_self, np.arange(others + 1)[None, :] < others)
    truth_lists = list_of[exact[keep].reshape(len(queries), others)]  # (Q, 10): the lists the true neighbours are in

    def recall_at(lists_probed: int) -> float:
        probed = near[list_of[queries], :lists_probed]  # (Q, P)
        return float((truth_lists[:, :, None] == probed[:, None, :]).any(axis=2).mean())

    probe, recall = fewest_lists(recall_at, most, TARGET_RECALL)

    ids = np.empty((n, width), dtype=np.int64)
    distances = np.empty((n, width), dtype=np.float32)

    def one_list(number: int) -> int:
        rows = lists[number]
        if not len(rows):
            return 0
        candidates = np.concatenate([lists[other] for other in near[number, :probe]])
        if len(candidates) < width:  # tiny lists: the index's own search over every list
            d, i = index.search(unit[rows], width)
        else:
            sims = unit[rows] @ unit[candidates].T  # (m, c)
            top = np.argpartition(-sims, width - 1, axis=1)[:, :width]
            top_sims = np.take_along_axis(sims, top, axis=1)
            order = np.argsort(-top_sims, axis=1, kind="stable")
            i = candidates[np.take_along_axis(top, order, axis=1)]
            d = np.sqrt(np.clip(2.0 - 2.0 * np.take_along_axis(top_sims, order, axis=1), 0.0, 4.0))
        i, d = own_point_first(i.astype(np.int64), d.astype(np.float32), rows)
        ids[rows], distances[rows] = i, d
        return len(rows)

    # small products: one BLAS thread each (two OpenBLAS threads on a loaded 2-core machine made a
    # 112 × 900 product 30× slower), lists spread over this process's share of the cores
    workers = thread_share()
    done = 0
    with blas_threads(1), ThreadPoolExecutor(max_workers=workers) as pool:
        for number, rows_done in enumerate(pool.map(one_list, range(nlist))):
            done += rows_done
            if on_progress is not None and (number % 64 == 0 or done == n):
                on_progress(done / n)
    params = {"nlist": int(nlist), "probe_lists": int(probe), "calibration_queries": int(len(queries)),
              "target_recall": TARGET_RECALL, "method": "list-wise"}
    return ids, distances, params, recall


@contextmanager
def blas_threads(threads: int):
    """numpy's BLAS (OpenBLAS) limited to `threads` inside the block, where threadpoolctl is installed
    (scikit-learn brings it); unchanged otherwise."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=max(1, int(threads)), user_api="blas"):
        yield


def own_point_first(ids: np.ndarray, distances: np.ndarray, rows: Optional[np.ndarray] = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Each row i (or rows[i]) starts with itself at distance exactly 0 (a float rounding of
    sqrt(2 − 2·1) is not 0, and umap's rho is the first non-zero distance); where ties with
    duplicates moved it later it is moved to the front, the others keeping their order; where they
    pushed it off the end it is put first and the last dropped."""
    n, k = ids.shape
    rows = np.arange(n) if rows is None else np.asarray(rows)
    is_self = ids == rows[:, None]
    order = np.argsort(np.where(is_self, -1, np.arange(k)[None, :]), axis=1, kind="stable")
    ids = np.take_along_axis(ids, order, axis=1)
    distances = np.take_along_axis(distances, order, axis=1)
    missing = ~is_self.any(axis=1)
    if missing.any():
        ids[missing, 1:] = ids[missing, :-1].copy()
        distances[missing, 1:] = distances[missing, :-1].copy()
        ids[missing, 0] = rows[missing]
    distances[:, 0] = 0.0
    return np.ascontiguousarray(ids), np.ascontiguousarray(distances)


def others(knn: RunKnn, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(distances (N, k) float32, ids (N, k) int64): each row's k nearest other images."""
    if k > knn.width - 1:
        raise ValueError(f"the run's k-NN holds {knn.width - 1} neighbours per image, fewer than the {k} asked for")
    return knn.distances[:, 1:k + 1], knn.ids[:, 1:k + 1]


def save_run_knn(knn: RunKnn, folder) -> None:
    """ids.npy, distances.npy, then knn.json (last: a folder without it is never read) into `folder`,
    each written to a temporary name, synced, then renamed."""
    from storage.artifacts import save_array_atomic, temp_file_for

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in ((IDS_FILE, knn.ids), (DISTANCES_FILE, knn.distances)):
        save_array_atomic(folder / name, array)
    meta = {"format": _FORMAT, "rows": int(len(knn.ids)), "width": knn.width, "kind": knn.kind,
            "recall_at_10": knn.recall_at_10, "unit_rows": bool(knn.unit_rows), "source": knn.source,
            "params": knn.params}
    path = folder / META_FILE
    tmp = temp_file_for(path)
    try:
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_run_knn(folder, expected_rows: Optional[int] = None, source: Optional[str] = None,
                 min_width: int = 2) -> RunKnn:
    """The k-NN `save_run_knn` wrote into `folder`. LookupError when there is none (or it was
    computed from other embeddings than `source`, or holds fewer than `min_width` columns: then it
    must be computed again); ValueError naming the file when it is corrupt or does not fit `expected_rows`."""
    folder = Path(folder)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise LookupError(f"no k-NN in {folder}")
    try:
        meta = json.loads(meta_path.read_text())
        rows, width, kind = int(meta["rows"]), int(meta["width"]), str(meta["kind"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"the k-NN file {meta_path} is corrupt: {exc}") from None
    if source is not None and meta.get("source") != source:
        raise LookupError(f"the k-NN in {folder} was computed from {meta.get('source')!r}, not {source!r}")
    if width < min_width:
        raise LookupError(f"the k-NN in {folder} holds {width} columns, fewer than the {min_width} needed")
    if expected_rows is not None and rows != expected_rows:
        raise ValueError(f"the k-NN file {meta_path} holds {rows:,} images, not the run's {expected_rows:,}")
    arrays = {}
    for name, dtype in ((IDS_FILE, np.int64), (DISTANCES_FILE, np.float32)):
        path = folder / name
        try:
            array = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise ValueError(f"the k-NN file {path} is missing") from None
        except (OSError, ValueError) as exc:
            raise ValueError(f"the k-NN file {path} is corrupt: {exc}") from None
        if array.shape != (rows, width) or array.dtype != dtype:
            raise ValueError(f"the k-NN file {path} is corrupt: {array.dtype} {array.shape}, "
                             f"{META_FILE} says {np.dtype(dtype)} ({rows}, {width})")
        arrays[name] = array
    ids = arrays[IDS_FILE]
    if rows and (ids.min() < 0 or ids.max() >= rows):
        raise ValueError(f"the k-NN file {folder / IDS_FILE} is corrupt: it names images outside 0 to {rows - 1}")
    return RunKnn(ids=ids, distances=arrays[DISTANCES_FILE], kind=kind, recall_at_10=meta.get("recall_at_10"),
                  unit_rows=bool(meta.get("unit_rows", False)), source=str(meta.get("source", "")),
                  params=dict(meta.get("params") or {}))


def for_umap(knn: RunKnn, n_neighbors: int, metric: str) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(ids, distances) (N, n_neighbors), own point first, in `metric`'s distance, for umap's
    precomputed_knn; None when this k-NN cannot stand for that metric's (euclidean on rows that
    were not unit length, another metric) or is too narrow."""
    if n_neighbors > knn.width:
        return None
    ids, distances = knn.ids[:, :n_neighbors], knn.distances[:, :n_neighbors]
    if metric == "euclidean" and knn.unit_rows:
        return np.ascontiguousarray(ids), np.ascontiguousarray(distances)
    if metric == "cosine":  # 1 − sim = d² / 2 on the unit sphere
        return np.ascontiguousarray(ids), np.ascontiguousarray(np.clip(distances * distances / 2.0, 0.0, 2.0))
    return None


def _unit_rows(embeddings: np.ndarray) -> bool:
    """Whether every row is (within UNIT_TOLERANCE) of unit length, in blocks (no float64 copy of all)."""
    for start in range(0, len(embeddings), 65_536):
        norms = np.linalg.norm(embeddings[start:start + 65_536].astype(np.float64, copy=False), axis=1)
        if not np.allclose(norms, 1.0, atol=UNIT_TOLERANCE):
            return False
    return True
