import numpy as np
import pytest
from sklearn.manifold import trustworthiness

from core.explore.projection import PHASES, exact_knn, numba_cache_is_warm, project_pca, project_umap


def _blobs(n=300, d=16, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, size=n)
    return (rng.normal(scale=6, size=(5, d))[labels] + rng.normal(size=(n, d))).astype(np.float32)


@pytest.fixture(scope="module")
def mapped():
    """The module's one UMAP call (a cold machine compiles numba here): blobs, seeded, with every
    progress call recorded."""
    data = _blobs()
    calls = []
    coords = project_umap(data, n_neighbors=15, seed=0,
                          on_progress=lambda phase, fraction, message: calls.append((phase, fraction, message)))
    return data, coords, calls


def test_pca_keeps_the_main_axes():
    rng = np.random.default_rng(0)
    data = np.zeros((200, 5), dtype=np.float32)
    data[:, 0] = rng.normal(scale=10, size=200)
    data[:, 1] = rng.normal(scale=5, size=200)
    data[:, 2:] = rng.normal(scale=0.01, size=(200, 3))
    coords = project_pca(data)
    assert coords.shape == (200, 2) and coords.dtype == np.float32
    assert abs(np.corrcoef(coords[:, 0], data[:, 0])[0, 1]) > 0.99


def test_umap_preserves_neighbourhoods(mapped):
    data, coords, _ = mapped
    assert coords.shape == (300, 2) and coords.dtype == np.float32 and np.isfinite(coords).all()
    # structure kept: far above a random layout's trustworthiness (about 0.5)
    assert trustworthiness(data, coords, n_neighbors=10) > 0.9
    random_layout = np.random.default_rng(0).normal(size=(300, 2))
    assert trustworthiness(data, random_layout, n_neighbors=10) < 0.7


def test_progress_phases_in_order_and_layout_fractions_reach_one(mapped):
    _, _, calls = mapped
    phases = [phase for phase, _, _ in calls]
    # each phase starts once, in order
    firsts = [phase for i, phase in enumerate(phases) if i == 0 or phases[i - 1] != phase]
    assert firsts == list(PHASES)
    assert all(isinstance(message, str) and message for _, _, message in calls)
    compiling = [message for phase, _, message in calls if phase == "compiling"]
    assert any(word in compiling[0] for word in ("cache", "first time", "already"))
    layout = [fraction for phase, fraction, _ in calls if phase == "layout" and fraction is not None]
    assert layout[0] == 0.0 and layout[-1] == 1.0
    assert all(b > a for a, b in zip(layout, layout[1:]))
    assert max(np.diff(layout)) <= 0.05 + 1e-9  # at least every 5 % of the epochs
    assert calls[-1][:2] == ("done", 1.0)


def test_umap_caches_serial_and_parallel_layouts_under_different_names(mapped):
    """numba keys its cache by function name and bytecode, not by parallel=: one shared name
    would let a seeded (serial) map load the parallel machine code."""
    import umap.layouts

    serial = umap.layouts._nb_optimize_layout_euclidean_single_epoch
    parallel = umap.layouts._nb_optimize_layout_euclidean_single_epoch_parallel
    assert serial.py_func.__code__ is parallel.py_func.__code__
    assert serial.py_func.__qualname__ != parallel.py_func.__qualname__
    assert serial.targetoptions.get("parallel") is False and parallel.targetoptions.get("parallel") is True


def test_cache_warmth_is_read_from_the_cache_folder(mapped, tmp_path, monkeypatch):
    assert numba_cache_is_warm(seeded=True)  # the fixture's seeded map filled (or read) conftest's cache
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    assert not numba_cache_is_warm() and not numba_cache_is_warm(seeded=True)


def _brute_force(data, k, metric):
    if metric == "cosine":
        unit = data / np.linalg.norm(data, axis=1, keepdims=True)
        dist = 1.0 - unit @ unit.T
    else:
        dist = np.sqrt(np.maximum(((data[:, None, :] - data[None, :, :]) ** 2).sum(-1), 0.0))
    np.fill_diagonal(dist, -1.0)  # own point first
    ids = np.argsort(dist, axis=1, kind="stable")[:, :k]
    distances = np.take_along_axis(dist, ids, axis=1)
    distances[:, 0] = 0.0
    return ids, distances


@pytest.mark.parametrize("metric,normalised", [("euclidean", True), ("euclidean", False), ("cosine", False)])
def test_faiss_neighbours_equal_brute_force(metric, normalised):
    data = _blobs(n=200, d=8, seed=1).astype(np.float64)
    if normalised:
        data /= np.linalg.norm(data, axis=1, keepdims=True)
    ids, distances = exact_knn(data.astype(np.float32), 10, metric)
    want_ids, want_distances = _brute_force(data, 10, metric)
    assert ids.dtype == np.int64 and distances.dtype == np.float32 and ids.shape == (200, 10)
    assert (ids[:, 0] == np.arange(200)).all() and (distances[:, 0] == 0).all()
    np.testing.assert_allclose(distances, want_distances, rtol=1e-3, atol=2e-3)
    # same sets of neighbours (an order can differ only between float-equal distances)
    assert np.mean([set(a) == set(b) for a, b in zip(ids, want_ids)]) > 0.98


def test_duplicates_still_list_their_own_point_first():
    data = np.repeat(np.eye(3, dtype=np.float32), 4, axis=0)  # 3 points, 4 copies each
    ids, distances = exact_knn(data, 3)
    assert (ids[:, 0] == np.arange(12)).all() and (distances == 0).all()
    assert all(set(row) <= set(range(4 * (i // 4), 4 * (i // 4) + 4)) for i, row in enumerate(ids))
