"""Nearest-neighbour search with faiss: exact inner product on L2-normalised float32 vectors.

Rows that hold NaN or infinity have no place on the unit sphere: they stay NaN through
normalisation, are never stored in the index (so faiss never answers -1 or a NaN distance for
them), and a query made of them is refused.
"""
from __future__ import annotations

import faiss
import numpy as np


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
    float32 values do not overflow into infinity.
    """
    vectors = np.asarray(vectors)
    if vectors.ndim == 1:
        vectors = vectors[None, :]
    wide = vectors.astype(np.float64, copy=False)
    finite = np.isfinite(wide).all(axis=1, keepdims=True)
    norms = np.linalg.norm(np.where(finite, wide, 0.0), axis=1, keepdims=True)
    unit = np.where(finite, wide / np.maximum(norms, 1e-12), np.nan)
    return np.ascontiguousarray(unit, dtype=np.float32)


class NeighbourIndex:
    """`D, I = index.search(queries, k)`: euclidean distances on the unit sphere and row ids.

    Ids are row numbers of the `embeddings` given; rows with NaN or infinity are left out of the
    index (`size` counts the rows that can be found, `nonfinite` those left out).
    """

    def __init__(self, embeddings: np.ndarray) -> None:
        vectors = as_normalised_float32(embeddings)
        finite = np.isfinite(vectors).all(axis=1)
        self._rows = np.flatnonzero(finite)  # index position → row id
        self._position = np.full(len(vectors), -1, dtype=np.int64)  # row id → index position
        self._position[self._rows] = np.arange(len(self._rows))
        self.size = len(self._rows)
        self.nonfinite = len(vectors) - self.size
        self._index = faiss.IndexFlatIP(vectors.shape[1])
        self._index.add(np.ascontiguousarray(vectors[finite]))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances, ids), each (Q, k), nearest first; ValueError when k is not from 1 to
        `size` or a query holds NaN or infinity. Never an id of -1, never a non-finite distance."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.size:
            raise ValueError(f"k must be from 1 to {self.size} (the number of stored images), got {k}")
        query_vectors = as_normalised_float32(queries)
        bad = nonfinite_rows(query_vectors)
        if bad:
            raise ValueError(f"{bad} of {len(query_vectors)} queries are NaN or infinite; they have no neighbours")
        similarities, positions = self._index.search(query_vectors, int(k))
        # faiss pads with -1 (and a meaningless similarity) where it has fewer than k results; it
        # puts them last, so cutting every row to the shortest row's valid count keeps the order
        found = (positions >= 0) & np.isfinite(similarities)
        width = int(found.all(axis=0).sum()) if not found.all() else int(k)
        similarities, positions = similarities[:, :width], positions[:, :width]
        # ‖a − b‖ = sqrt(2 − 2 a·b) for unit vectors
        distances = np.sqrt(np.clip(2.0 - 2.0 * similarities, 0.0, 4.0))
        return distances, self._rows[positions]

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
