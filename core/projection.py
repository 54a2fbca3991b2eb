"""2-D projections of embeddings: PCA as an instant preview, UMAP as the map."""
from __future__ import annotations

import json
import os

import numpy as np

UMAP_DEFAULTS = {"n_neighbors": 15, "min_dist": 0.1, "metric": "euclidean", "seed": None}


def params_key(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


def project_pca(embeddings: np.ndarray) -> np.ndarray:
    """(N, d) → (N, 2) float32 along the two main axes; milliseconds for 70k × 128."""
    centred = embeddings - embeddings.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred[: min(len(centred), 20_000)], full_matrices=False)
    return (centred @ vt[:2].T).astype(np.float32)


def project_umap(embeddings: np.ndarray, n_neighbors: int = 15, min_dist: float = 0.1,
                 metric: str = "euclidean", seed: int | None = None) -> np.ndarray:
    """(N, d) → (N, 2) float32 with umap-learn. Slow to import and to compile the first time:
    call it from a worker process, never a page's script thread. A seed makes it repeatable
    but single-threaded; None lets umap use every core."""
    os.environ.setdefault("NUMBA_CACHE_DIR", _numba_cache())
    import umap  # imported here: 20+ s cold, never at import time of a page

    n_neighbors = max(2, min(n_neighbors, len(embeddings) - 1))
    reducer = umap.UMAP(n_neighbors=n_neighbors, min_dist=min_dist, metric=metric, random_state=seed)
    return reducer.fit_transform(np.ascontiguousarray(embeddings, dtype=np.float32)).astype(np.float32)


def _numba_cache() -> str:
    from storage.settings import data_home

    path = data_home() / "numba-cache"
    path.mkdir(exist_ok=True)
    return str(path)
