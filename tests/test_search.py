import numpy as np
import pytest

from core.search import NeighbourIndex, as_normalised_float32, nonfinite_rows


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


def test_k_out_of_range_is_an_error_not_a_silent_clamp():
    index = NeighbourIndex(np.eye(4, dtype=np.float32))
    for k in (0, -1, 5, 100):
        with pytest.raises(ValueError, match=rf"^k must be from 1 to 4 \(the number of stored images\), got {k}$"):
            index.search(np.ones((1, 4)), k)
    distances, ids = index.search(np.ones((1, 4)), 4)
    assert sorted(ids[0].tolist()) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"^k must be from 1 to 3 \(the number of other stored images\), got 4$"):
        index.neighbours_of(0, 4)
    distances, ids = index.neighbours_of(0, 3)  # asks faiss for 4 internally, which is every image
    assert sorted(ids.tolist()) == [1, 2, 3] and np.all(np.isfinite(distances))


def test_nan_and_infinite_rows_never_come_back_as_minus_one_or_nan():
    rng = np.random.default_rng(2)
    data = rng.normal(size=(6, 3)).astype(np.float32)
    data[1] = np.nan
    data[4, 2] = np.inf
    assert nonfinite_rows(data) == 2
    index = NeighbourIndex(data)
    assert index.size == 4 and index.nonfinite == 2
    distances, ids = index.search(data[[0, 3]], 4)
    assert ids.shape == (2, 4) and set(ids.ravel()) == {0, 2, 3, 5}  # row numbers of the input, NaN rows never
    assert np.all(np.isfinite(distances)) and np.all((distances >= 0) & (distances <= 2))
    assert ids[0, 0] == 0 and ids[1, 0] == 3  # each query's nearest is itself
    with pytest.raises(ValueError, match="k must be from 1 to 4"):
        index.search(data[:1], 5)
    with pytest.raises(ValueError, match="^1 of 2 queries are NaN or infinite; they have no neighbours$"):
        index.search(data[[0, 1]], 2)
    with pytest.raises(ValueError, match="^image 4 has a NaN or infinite embedding, so it has no neighbours$"):
        index.neighbours_of(4, 1)
    distances, ids = index.neighbours_of(5, 3)
    assert sorted(ids.tolist()) == [0, 2, 3]


def test_faiss_padding_is_cut_never_returned(monkeypatch):
    index = NeighbourIndex(np.eye(3, dtype=np.float32))
    real_search = index._index.search

    def short_answer(queries, k):  # what faiss returns when it has fewer than k results
        similarities, positions = real_search(queries, k)
        similarities[:, -1], positions[:, -1] = -3.4e38, -1
        return similarities, positions

    monkeypatch.setattr(index._index, "search", short_answer)
    distances, ids = index.search(np.eye(3, dtype=np.float32), 3)
    assert ids.shape == (3, 2) and (ids >= 0).all() and np.isfinite(distances).all()


def test_normalising_never_makes_a_nan_row_look_valid():
    rows = np.array([[3, 4], [np.nan, 1], [np.inf, 1], [-np.inf, -np.inf], [0, 0], [3e38, 3e38]], dtype=np.float32)
    unit = as_normalised_float32(rows)
    np.testing.assert_allclose(unit[0], [0.6, 0.8])
    assert np.isnan(unit[1:4]).all()  # whole rows NaN, not [nan, 1] or [0, 0]
    np.testing.assert_array_equal(unit[4], [0, 0])
    np.testing.assert_allclose(unit[5], [2 ** -0.5] * 2, rtol=1e-6)  # huge but finite: no overflow
    assert nonfinite_rows(rows) == 3 and nonfinite_rows(rows[0]) == 0 and nonfinite_rows(np.zeros((0, 2))) == 0
