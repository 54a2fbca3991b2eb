"""Every pair of rows closer than a radius, exactly, without computing all N² distances.

What duplicate finding (core.data.duplicates) stands on: "which images lie within r of another"
is a range search over the whole set. faiss's exhaustive range search was measured too slow for
it on the 2-core dev machine (70,000 × 16 dims: 11 s on one thread, 37 s on two under load; ×256
dims: 66–93 s), and an IVF index misses pairs near its cells' borders. So this module prunes with
two bounds that never drop a pair, and checks what is left in full:

1. An orthonormal projection never lengthens a difference: ‖P(x − y)‖ ≤ ‖x − y‖. The rows are
   projected onto their first PROJECTED_DIMS principal axes (an SVD of a sample), so a pair
   within r stays within r there.
2. In the projection, the rows are split into clusters (faiss k-means), and each cluster into
   shells by distance to its centre. By the triangle inequality a query q can have a partner in
   a shell only if |‖q − c‖ − ‖b − c‖| ≤ r for some member b: its distance to the centre lies
   within r of the shell's range. Only those (query, shell) blocks are compared, as one matrix
   product each.

The candidates' distances are then computed in full; a pair is kept when that distance is at most
r. The answer is exact whatever the clustering (a poor clustering costs time, never a pair).
Measured on Fashion-MNIST (70,000 pixel descriptors of 256 dims, r = 0.05, five shifted query
sets, one thread, load average 3.5–5 on 2 cores): 4.9 CPU-seconds; about 300 million of the 24.5
billion possible (query, row) distances looked at in the projection, 93,362 candidates checked in
full for 88 pairs; the same pairs as brute force on a 10,000-image sample at r = 0.1 (175 pairs,
0.7 s against 6.5 s).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import faiss
import numpy as np
from threadpoolctl import threadpool_limits

from core.threads import thread_share

PROJECTED_DIMS = 16  # 16 against 32: 5.0 against 6.3 CPU-s on Fashion-MNIST (more candidates, cheaper blocks)
# about sqrt(N) clusters, at most this many: 70k rows took 5.0 s at 256, 6.3 s at 128, 9.0 s at 512
# (Python's share grows with the number of blocks)
MAX_CLUSTERS = 256
SHELLS_PER_CLUSTER = 16  # shells are at least radius wide, and at most this many per cluster
PCA_SAMPLE = 20_000  # rows the principal axes are fitted on
QUERY_CHUNK = 131_072  # queries whose distances to the centres are held at once (256 × 131k float32: 134 MB)
BLOCK_ENTRIES = 1 << 20  # (query, row) distances computed in one matrix product, at most
VERIFY_BATCH = 1 << 15  # candidates whose full distances are computed together (256 dims: a 32 MB difference)
MAX_PAIRS = 2_000_000  # more pairs than this: the radius links too much to be called duplicates
ESTIMATE_SAMPLE = 2000  # rows sampled to estimate the pairs before searching
ESTIMATE_MARGIN = 4  # refuse at once only when the estimate is this many times the limit
# float32 rounding in the pruning's squared distances, per unit of squared length: prune a hair wide, never narrow
_SLACK = 1e-5


@dataclass(frozen=True)
class NearPairs:
    """Unordered pairs of rows a < b, each once, with their distance (float32, at most the radius),
    sorted by (a, b)."""

    a: np.ndarray
    b: np.ndarray
    distance: np.ndarray

    def __len__(self) -> int:
        return len(self.a)


class TooManyPairs(ValueError):
    """The radius links more than the allowed number of pairs."""


def pairs_within(index: np.ndarray, radius: float, query_sets: Optional[Iterable[np.ndarray]] = None,
                 max_pairs: int = MAX_PAIRS, seed: int = 0) -> NearPairs:
    """Every pair of rows (a, b), a ≠ b, with a distance at most `radius`.

    index: (N, d) vectors. query_sets: other descriptions of the same N items, row for row (each
    (N, d); an iterator is read one set at a time), e.g. each image's descriptor with its window
    moved by a pixel; a pair (a, b) is then within the radius when some set's row a is within it
    of index row b, or its row b of index row a, and its distance is the smallest of those. None:
    the index itself (plain euclidean distance). Rows holding NaN or infinity have no partners.
    TooManyPairs (a ValueError with a sentence) when more than `max_pairs` pairs are within the radius.
    """
    index = np.ascontiguousarray(index, dtype=np.float32)
    if index.ndim != 2:
        raise ValueError(f"expected an (N, d) array of vectors, got shape {index.shape}")
    if isinstance(radius, bool) or not (isinstance(radius, (int, float, np.floating)) and math.isfinite(radius)
                                        and radius > 0):
        raise ValueError(f"the radius must be a positive number, got {radius!r}")
    rows = np.flatnonzero(np.isfinite(index).all(axis=1))
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    if len(rows) < 2:
        return _unique(found)
    estimate = _estimated_pairs(index[rows] if len(rows) < len(index) else index, float(radius), seed)
    if estimate > ESTIMATE_MARGIN * max_pairs:
        raise TooManyPairs(f"about {estimate:,.0f} pairs lie within {radius:g} of each other, more than the "
                           f"{max_pairs:,} allowed; choose a smaller threshold")
    # one BLAS thread: the blocks are small products, and OpenBLAS's second thread spins between them
    # (70,000 images: 29 CPU-s and 33 s on two threads against 10 CPU-s and 12 s on one, loaded machine)
    with threadpool_limits(limits=1, user_api="blas"):
        partition = _Partition(index[rows] if len(rows) < len(index) else index, float(radius), seed)
        total, check_at = 0, max_pairs
        for queries in [index] if query_sets is None else query_sets:
            queries = np.ascontiguousarray(queries, dtype=np.float32)
            if queries.shape != index.shape:
                raise ValueError(f"each query set must have the index's shape {index.shape}, got {queries.shape}")
            # a query row of NaN is never near anything: its distances are NaN, which no bound passes
            for q, i, d in partition.pairs(queries[rows] if len(rows) < len(index) else queries):
                found.append((rows[q], rows[i], d))
                total += len(q)
                if total > check_at:  # a pair is found from both ends and by several sets: count each once
                    unique = _unique(found)
                    if len(unique) > max_pairs:
                        raise TooManyPairs(f"more than {max_pairs:,} pairs lie within {radius:g} of each other; "
                                           "choose a smaller threshold")
                    found, total = [(unique.a, unique.b, unique.distance)], len(unique)
                    check_at = max(max_pairs, 2 * total)
    return _unique(found)


def _estimated_pairs(index: np.ndarray, radius: float, seed: int) -> float:
    """Pairs within the radius among all rows, extrapolated from a random sample of ESTIMATE_SAMPLE
    rows (a threshold that links millions fails at once instead of after a minute's search)."""
    n = len(index)
    if n <= ESTIMATE_SAMPLE:
        return 0.0  # the search itself is quick
    sample = index[np.sort(np.random.default_rng(seed).choice(n, ESTIMATE_SAMPLE, replace=False))].astype(np.float64)
    squared = np.einsum("ij,ij->i", sample, sample)
    distances = squared[:, None] + squared[None, :] - 2 * sample @ sample.T
    within = int(np.triu(distances <= radius * radius, 1).sum())
    return within * (n * (n - 1)) / (ESTIMATE_SAMPLE * (ESTIMATE_SAMPLE - 1))


def _unique(found: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> NearPairs:
    """Each unordered pair once, with its smallest distance."""
    if not found:
        empty = np.zeros(0, dtype=np.int64)
        return NearPairs(empty, empty.copy(), np.zeros(0, dtype=np.float32))
    q = np.concatenate([f[0] for f in found])
    i = np.concatenate([f[1] for f in found])
    d = np.concatenate([f[2] for f in found])
    a, b = np.minimum(q, i), np.maximum(q, i)
    order = np.lexsort((d, b, a))  # by a, then b, the smallest distance first
    a, b, d = a[order], b[order], d[order]
    first = np.ones(len(a), dtype=bool)
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    return NearPairs(a[first], b[first], d[first])


class _Partition:
    """The index rows projected, clustered and cut into shells; `pairs` finds a query set's partners."""

    def __init__(self, index: np.ndarray, radius: float, seed: int) -> None:
        self.index, self.radius = index, radius
        n, dims = index.shape
        rng = np.random.default_rng(seed)
        self.mean = index.mean(axis=0, dtype=np.float64).astype(np.float32)
        sample = index[np.sort(rng.choice(n, PCA_SAMPLE, replace=False))] if n > PCA_SAMPLE else index
        centred = (sample - self.mean).astype(np.float64)
        _, vectors = np.linalg.eigh(centred.T @ centred)  # the principal axes, smallest variance first
        # (d, p) with orthonormal columns, so a projected difference is never longer than the difference
        self.axes = np.ascontiguousarray(vectors[:, ::-1][:, :PROJECTED_DIMS], dtype=np.float32)
        projected = self.project(index)
        clusters = max(1, min(MAX_CLUSTERS, math.isqrt(n), n // 8))
        if clusters > 1:
            kmeans = faiss.Kmeans(projected.shape[1], clusters, niter=10, seed=seed, max_points_per_centroid=64,
                                  min_points_per_centroid=1, verbose=False)
            previous = faiss.omp_get_max_threads()
            faiss.omp_set_num_threads(thread_share())
            try:
                kmeans.train(projected)
                _, assigned = kmeans.index.search(projected, 1)
            finally:
                faiss.omp_set_num_threads(previous)
            self.centres, assigned = kmeans.centroids, assigned[:, 0]
        else:
            self.centres, assigned = projected.mean(axis=0, keepdims=True), np.zeros(n, dtype=np.int64)
        to_centre = np.linalg.norm(projected - self.centres[assigned], axis=1)
        width = max(radius, float(to_centre.max()) / SHELLS_PER_CLUSTER)
        shell = np.minimum((to_centre / width).astype(np.int64), SHELLS_PER_CLUSTER)
        shells = SHELLS_PER_CLUSTER + 1
        order = np.lexsort((to_centre, shell, assigned))  # by cluster, shell, then distance to the centre
        key = assigned[order] * shells + shell[order]
        starts = np.searchsorted(key, np.arange(len(self.centres) * shells + 1))
        self.order = order
        self.sorted_rows = np.ascontiguousarray(projected[order])
        squared_lengths = np.einsum("ij,ij->i", self.sorted_rows, self.sorted_rows)
        # rounding grows with the vectors' squared lengths (about 1 for unit vectors, centred and projected)
        self.slack = _SLACK * max(1.0, float(squared_lengths.max()))
        # ‖q − b‖² ≤ r² ⟺ q·b − ‖q‖²/2 − (‖b‖² − r²)/2 ≥ 0: the row's half, slack included
        self.row_half = (squared_lengths - (radius * radius + self.slack)) / 2
        self.to_centre = to_centre[order]
        # per cluster: its shells as (start, end) ranges of the sorted rows
        self.shells = [[(int(starts[c * shells + s]), int(starts[c * shells + s + 1])) for s in range(shells)
                        if starts[c * shells + s + 1] > starts[c * shells + s]] for c in range(len(self.centres))]

    def project(self, vectors: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray((vectors - self.mean) @ self.axes)

    def pairs(self, queries: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yields (query rows, index rows, distances) of the pairs within the radius, a batch at a time."""
        reach = self.radius + math.sqrt(self.slack)
        centre_norms = np.einsum("ij,ij->i", self.centres, self.centres)
        for start in range(0, len(queries), QUERY_CHUNK):
            chunk = queries[start:start + QUERY_CHUNK]
            projected = self.project(chunk)
            query_half = np.einsum("ij,ij->i", projected, projected) / 2
            to_centres = self.centres @ projected.T  # (clusters, queries), then in place: the distances
            to_centres *= -2
            to_centres += centre_norms[:, None]
            to_centres += 2 * query_half[None, :]
            np.sqrt(np.maximum(to_centres, 0.0, out=to_centres), out=to_centres)
            pending: list[tuple[np.ndarray, np.ndarray]] = []
            waiting = 0
            for cluster, shells in enumerate(self.shells):
                if not shells:
                    continue
                distances = to_centres[cluster]
                near = np.flatnonzero(distances <= self.to_centre[shells[-1][1] - 1] + reach)
                if not len(near):
                    continue
                near_distances = distances[near]
                for low, high in shells:
                    inside = ((near_distances >= self.to_centre[low] - reach)
                              & (near_distances <= self.to_centre[high - 1] + reach))
                    for q, i in self._candidates(projected, query_half, near[inside], low, high):
                        pending.append((q, i))
                        waiting += len(q)
                    if waiting >= VERIFY_BATCH:
                        yield from self._verified(chunk, start, pending)
                        pending, waiting = [], 0
            yield from self._verified(chunk, start, pending)

    def _candidates(self, projected, query_half, candidates, low, high):
        """(chunk rows, index rows) whose projections lie within the radius: a matrix product per block."""
        step = max(1, BLOCK_ENTRIES // (high - low))
        for first in range(0, len(candidates), step):
            rows = candidates[first:first + step]
            scores = projected[rows] @ self.sorted_rows[low:high].T
            scores -= query_half[rows, None]
            scores -= self.row_half[None, low:high]
            q, i = np.nonzero(scores >= 0)
            if len(q):
                yield rows[q], self.order[low + i]

    def _verified(self, chunk, start, pending):
        """The pending candidates whose full distance is within the radius (an item is not its own duplicate)."""
        if not pending:
            return
        q = np.concatenate([p[0] for p in pending])
        i = np.concatenate([p[1] for p in pending])
        order = np.argsort(q, kind="stable")  # read the chunk's rows in order
        q, i = q[order], i[order]
        difference = chunk[q]
        difference -= self.index[i]
        distance = np.sqrt(np.einsum("ij,ij->i", difference, difference))
        keep = (distance <= self.radius) & (q + start != i)
        if keep.any():
            yield q[keep] + start, i[keep], distance[keep].astype(np.float32)
