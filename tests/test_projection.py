import numpy as np
from sklearn.manifold import trustworthiness

from core.projection import project_pca, project_umap


def _blobs(n=300, d=16, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, size=n)
    return (rng.normal(scale=6, size=(5, d))[labels] + rng.normal(size=(n, d))).astype(np.float32)


def test_pca_keeps_the_main_axes():
    rng = np.random.default_rng(0)
    data = np.zeros((200, 5), dtype=np.float32)
    data[:, 0] = rng.normal(scale=10, size=200)
    data[:, 1] = rng.normal(scale=5, size=200)
    data[:, 2:] = rng.normal(scale=0.01, size=(200, 3))
    coords = project_pca(data)
    assert coords.shape == (200, 2) and coords.dtype == np.float32
    assert abs(np.corrcoef(coords[:, 0], data[:, 0])[0, 1]) > 0.99


def test_umap_preserves_neighbourhoods():
    data = _blobs()
    coords = project_umap(data, n_neighbors=15, seed=0)
    assert coords.shape == (300, 2) and np.isfinite(coords).all()
    # structure kept: far above a random layout's trustworthiness (about 0.5)
    assert trustworthiness(data, coords, n_neighbors=10) > 0.9
    random_layout = np.random.default_rng(0).normal(size=(300, 2))
    assert trustworthiness(data, random_layout, n_neighbors=10) < 0.7
