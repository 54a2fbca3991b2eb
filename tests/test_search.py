import json
import re

import numpy as np
import pytest

import core.explore.search as search
from core.explore.search import INDEX_FILE, META_FILE, NeighbourIndex, as_normalised_float32, nonfinite_rows


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


# --- approximate (IVF) index, saving and loading, search by several images ---------------------


def clustered(n: int, d: int = 32, seed: int = 0, centres: int = 100) -> np.ndarray:
    """Rows around `centres` Gaussian centres of mixed spread, as trained embeddings tend to be."""
    rng = np.random.default_rng(seed)
    middle = rng.normal(size=(centres, d))
    spread = rng.uniform(0.2, 1.0, size=centres)
    labels = rng.integers(0, centres, size=n)
    return (middle[labels] + rng.normal(size=(n, d)) * spread[labels, None]).astype(np.float32)


def brute_force(data: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest cosine similarities, by numpy alone (NaN rows never win)."""
    unit, q = as_normalised_float32(data), as_normalised_float32(queries)
    similarities = np.nan_to_num(q @ unit.T, nan=-np.inf)
    return np.argsort(-similarities, axis=1, kind="stable")[:, :k]


def overlap(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth)]))


@pytest.fixture(scope="module")
def approximate():
    data = clustered(30_000)
    return data, NeighbourIndex(data, approximate=True)


def test_approximate_index_finds_the_exact_neighbours_it_claims_to(approximate):
    data, index = approximate
    assert index.kind == "ivf" and 0.97 <= index.recall_at_10 <= 1.0
    nlist, nprobe = index.params["nlist"], index.params["nprobe"]
    assert abs(nlist - 4 * np.sqrt(len(data))) < 0.1 * nlist
    assert 1 <= nprobe < nlist // 4  # it looks in a few lists, not all of them
    assert f"IVF {nlist} lists, nprobe {nprobe}, recall@10 {index.recall_at_10:.2f}" in index.describe()

    # new points near stored ones, not stored rows
    queries = data[np.random.default_rng(3).integers(0, len(data), 500)] + 0.3 * clustered(500, seed=7)
    _, ids = index.search(queries, 10)
    assert overlap(ids, brute_force(data, queries, 10)) >= 0.95

    # its own figure agrees with one measured independently, on other stored rows, as neighbours_of answers
    rows = np.random.default_rng(4).choice(len(data), 300, replace=False)
    truth = brute_force(data, data[rows], 11)
    truth = [row_ids[row_ids != row][:10] for row_ids, row in zip(truth, rows)]
    found = []
    for row in rows:
        distances, ids = index.neighbours_of(int(row), 10)
        assert row not in ids and len(ids) == 10 and np.all(np.diff(distances) >= -1e-6)
        found.append(ids)
    assert abs(overlap(found, truth) - index.recall_at_10) <= 0.03


def test_size_decides_unless_told(monkeypatch):
    data = clustered(3_000, d=8)
    monkeypatch.setattr(search, "APPROXIMATE_ABOVE", 2_999)
    assert NeighbourIndex(data).kind == "ivf"
    exact = NeighbourIndex(data, approximate=False)
    assert exact.kind == "exact" and exact.recall_at_10 is None and exact.params == {}
    monkeypatch.setattr(search, "APPROXIMATE_ABOVE", 3_000)
    assert NeighbourIndex(data).kind == "exact"
    assert NeighbourIndex(data[:1], approximate=True).kind == "exact"  # one row: nothing to approximate


def test_approximate_index_never_returns_nan_rows_or_minus_one():
    data = clustered(2_000, d=8, seed=5)
    data[[3, 500, 1999]] = np.nan
    data[10, 0] = np.inf
    index = NeighbourIndex(data, approximate=True)
    assert index.kind == "ivf" and index.size == 1_996 and index.nonfinite == 4
    # k = every stored image: more than the probed lists hold, so it must look further, not pad with -1
    distances, ids = index.search(data[[0, 1]], index.size)
    assert ids.shape == (2, 1_996) and (ids >= 0).all() and np.isfinite(distances).all()
    assert set(ids[0]) == set(range(2_000)) - {3, 10, 500, 1999}
    for k in (0, 1_997):
        with pytest.raises(ValueError, match=rf"^k must be from 1 to 1996 \(the number of stored images\), got {k}$"):
            index.search(data[:1], k)
    with pytest.raises(ValueError, match=r"^k must be from 1 to 1995 \(the number of other stored images\), got 1996$"):
        index.neighbours_of(0, 1_996)
    with pytest.raises(ValueError, match="^image 500 has a NaN or infinite embedding, so it has no neighbours$"):
        index.neighbours_of(500, 1)
    _, ids = index.neighbours_of(1_998, 1_995)
    assert sorted(ids.tolist()) == sorted(set(range(2_000)) - {3, 10, 500, 1998, 1999})


def test_a_batch_of_queries_gets_what_each_query_gets_alone(approximate):
    data, index = approximate
    queries = data[:20] + np.random.default_rng(6).normal(size=(20, 32)).astype(np.float32)
    distances, ids = index.search(queries, 5)
    assert ids.shape == (20, 5)
    for query, row_distances, row_ids in zip(queries, distances, ids):
        alone_distances, alone_ids = index.search(query, 5)  # one query as a 1-d vector
        np.testing.assert_array_equal(alone_ids[0], row_ids)
        np.testing.assert_allclose(alone_distances[0], row_distances, atol=1e-6)
    with pytest.raises(ValueError, match=r"^queries must have 32 dimensions, as the stored embeddings do; got shape \(2, 31\)$"):
        index.search(queries[:2, :31], 5)


@pytest.mark.parametrize("approximate_kind", [False, True])
def test_search_centroid_searches_with_the_mean_direction(approximate_kind):
    data = clustered(2_000, d=8, seed=8)
    index = NeighbourIndex(data, approximate=approximate_kind)
    one = data[42] * 3.0
    np.testing.assert_array_equal(index.search_centroid(np.stack([one, one / 10]), 7)[1], index.search(one, 7)[1])
    pair = data[[1, 2]]
    unit = as_normalised_float32(pair)
    mean = (unit[0] + unit[1]) / 2
    distances, ids = index.search_centroid(pair, 7)
    assert ids.shape == (1, 7)
    np.testing.assert_array_equal(ids, index.search(mean, 7)[1])
    np.testing.assert_allclose(distances, np.linalg.norm(as_normalised_float32(data)[ids[0]] - mean / np.linalg.norm(mean), axis=1)[None, :], atol=1e-5)
    with pytest.raises(ValueError, match="^the 2 query images point in opposite directions"):
        index.search_centroid(np.stack([one, -one]), 3)
    with pytest.raises(ValueError, match="^1 of 2 queries are NaN or infinite"):
        index.search_centroid(np.stack([one, one * np.nan]), 3)


@pytest.mark.parametrize("approximate_kind", [False, True])
def test_save_and_load_give_the_same_answers(tmp_path, approximate_kind):
    data = clustered(3_000, d=16, seed=9)
    data[77] = np.nan
    index = NeighbourIndex(data, approximate=approximate_kind)
    index.save(tmp_path / "index")
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == sorted([INDEX_FILE, META_FILE])  # no temp files left
    loaded = NeighbourIndex.load(tmp_path / "index", expected_rows=3_000)
    assert (loaded.kind, loaded.params, loaded.recall_at_10, loaded.size, loaded.nonfinite) == \
        (index.kind, index.params, index.recall_at_10, index.size, index.nonfinite)
    queries = data[:50] + 0.1
    for got, expected in zip(loaded.search(queries, 20), index.search(queries, 20)):
        np.testing.assert_array_equal(got, expected)
    for got, expected in zip(loaded.neighbours_of(5, 10), index.neighbours_of(5, 10)):
        np.testing.assert_array_equal(got, expected)
    assert 77 not in loaded.search(queries, 2_999)[1]
    with pytest.raises(ValueError, match="^image 77 has a NaN"):
        loaded.neighbours_of(77, 1)
    with pytest.raises(ValueError, match=rf"^the neighbour index {re.escape(str(tmp_path / 'index' / META_FILE))} was built for 3,000 rows, not the 2,999 expected"):
        NeighbourIndex.load(tmp_path / "index", expected_rows=2_999)


def test_load_names_the_missing_or_corrupt_file(tmp_path):
    NeighbourIndex(clustered(2_000, d=8), approximate=True).save(tmp_path)
    index_path, meta_path = tmp_path / INDEX_FILE, tmp_path / META_FILE
    whole = index_path.read_bytes()

    index_path.write_bytes(whole[: len(whole) // 2])  # truncated
    with pytest.raises(ValueError, match=f"^the neighbour index file {re.escape(str(index_path))} is corrupt"):
        NeighbourIndex.load(tmp_path)
    index_path.write_bytes(b"x" * len(whole))  # right length, not an index
    with pytest.raises(ValueError, match=f"^the neighbour index file {re.escape(str(index_path))} is corrupt: faiss cannot read it$"):
        NeighbourIndex.load(tmp_path)
    index_path.unlink()
    with pytest.raises(ValueError, match=f"^the neighbour index file {re.escape(str(index_path))} is missing$"):
        NeighbourIndex.load(tmp_path)
    index_path.write_bytes(whole)
    assert NeighbourIndex.load(tmp_path).kind == "ivf"

    meta = meta_path.read_text()
    meta_path.write_text(meta[: len(meta) // 2])
    with pytest.raises(ValueError, match=f"^the neighbour index file {re.escape(str(meta_path))} is corrupt"):
        NeighbourIndex.load(tmp_path)
    meta_path.write_text(json.dumps({**json.loads(meta), "nonfinite_rows": [5_000]}))
    with pytest.raises(ValueError, match=f"^the neighbour index file {re.escape(str(meta_path))} is corrupt"):
        NeighbourIndex.load(tmp_path)
    meta_path.unlink()
    with pytest.raises(ValueError, match=f"^the neighbour index file {re.escape(str(meta_path))} is missing$"):
        NeighbourIndex.load(tmp_path)


def test_normalising_in_blocks_changes_nothing(monkeypatch):
    rows = np.array([[3, 4], [np.nan, 1], [np.inf, 1], [0, 0], [3e38, 3e38], [1, 1], [-2, 0]], dtype=np.float32)
    whole = as_normalised_float32(rows)
    monkeypatch.setattr(search, "_BLOCK", 2)
    np.testing.assert_array_equal(as_normalised_float32(rows), whole)


def test_a_few_queries_run_on_one_faiss_thread_more_on_the_share_and_leave_the_setting_as_it_was(monkeypatch):
    import faiss

    monkeypatch.setenv("EMBEDDING_LAB_THREADS", "3")  # the process's share (core.threads), here fixed

    index = NeighbourIndex(clustered(500, d=8))
    seen = []
    real_search = index._index.search

    def recording(queries, k, **kwargs):
        seen.append((len(queries), faiss.omp_get_max_threads()))
        return real_search(queries, k, **kwargs)

    monkeypatch.setattr(index._index, "search", recording)
    before = faiss.omp_get_max_threads()
    index.search(np.ones(8), 3)
    index.neighbours_of(0, 3)
    index.search(np.ones((search.SERIAL_BELOW, 8)), 3)
    assert seen == [(1, 1), (1, 1), (search.SERIAL_BELOW, 3)]
    assert faiss.omp_get_max_threads() == before
