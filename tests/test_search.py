import numpy as np

from core.search import NeighbourIndex, as_normalised_float32


def test_exact_search_matches_brute_force_cosine():
    rng = np.random.default_rng(1)
    data = rng.normal(size=(500, 32)) * rng.uniform(0.1, 10, size=(500, 1))  # unnormalised, float64
    queries = rng.normal(size=(20, 32))
    distances, ids = NeighbourIndex(data).search(queries, 10)
    unit, q = as_normalised_float32(data), as_normalised_float32(queries)
    expected = np.argsort(-(q @ unit.T), axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, expected)])
    assert recall == 1.0
    brute = np.linalg.norm(unit[ids] - q[:, None, :], axis=2)
    np.testing.assert_allclose(distances, brute, atol=1e-4)
    assert np.all(np.diff(distances, axis=1) >= -1e-6)  # nearest first


def test_neighbours_of_leaves_the_point_itself_out():
    data = np.array([[1, 0], [0.9, 0.1], [0, 1], [-1, 0]], dtype=np.float32)
    distances, ids = NeighbourIndex(data).neighbours_of(0, 2)
    assert list(ids) == [1, 2]
    assert distances[0] < distances[1]
