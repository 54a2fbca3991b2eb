"""Nearest-neighbour search with faiss: exact inner product on L2-normalised float32 vectors."""
from __future__ import annotations

import faiss
import numpy as np


def as_normalised_float32(vectors: np.ndarray) -> np.ndarray:
    """Contiguous float32 rows of unit length (faiss wants exactly that for cosine search)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim == 1:
        vectors = vectors[None, :]
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12))


class NeighbourIndex:
    """`D, I = index.search(queries, k)`: euclidean distances on the unit sphere and row ids."""

    def __init__(self, embeddings: np.ndarray) -> None:
        vectors = as_normalised_float32(embeddings)
        self.size = len(vectors)
        self._index = faiss.IndexFlatIP(vectors.shape[1])
        self._index.add(vectors)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = max(1, min(int(k), self.size))
        similarities, ids = self._index.search(as_normalised_float32(queries), k)
        # ‖a − b‖ = sqrt(2 − 2 a·b) for unit vectors
        distances = np.sqrt(np.clip(2.0 - 2.0 * similarities, 0.0, None))
        return distances, ids

    def neighbours_of(self, row: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest other points of stored row `row` (itself left out)."""
        query = self._index.reconstruct(int(row))[None, :]
        distances, ids = self.search(query, k + 1)
        keep = ids[0] != row
        return distances[0][keep][:k], ids[0][keep][:k]
