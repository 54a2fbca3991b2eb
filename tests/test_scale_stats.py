"""Statistics and the map at scale: the whole run's k-NN computed once and shared, the sampled
average precision's interval, and the landmark map's trustworthiness."""
import numpy as np
import pytest

from core.explore import knn as run_knn
from core.explore.failures import (compute_statistics, describe_map_at_r, load_statistics, mean_interval,
                                   save_statistics)


def _overlapping(n=3_000, classes=8, d=16, seed=3):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    embeddings = rng.normal(size=(classes, d))[labels] + rng.normal(scale=1.2, size=(n, d))
    return embeddings.astype(np.float32), labels.astype(np.int64)


def test_sampled_ap_equals_the_exact_per_query_term_and_its_interval_covers_the_exact_map_at_r():
    embeddings, labels = _overlapping()
    labels[:40] = -1  # unlabeled: never queries, still in every ranking
    evaluated = np.random.default_rng(1).random(len(labels)) < 0.7
    exact = compute_statistics(embeddings, labels, evaluated)
    knn = run_knn.compute_run_knn(embeddings)  # searched once for the 20 samples below
    truth = exact.summary["map_at_r"]
    assert truth["method"] == "exact" and truth["low"] == truth["high"] == truth["value"]
    covered, widths = 0, []
    for seed in range(20):
        sampled = compute_statistics(embeddings, labels, evaluated, ap_sample=150, ap_seed=seed, knn=knn)
        estimate = sampled.summary["map_at_r"]
        assert estimate["method"] == "sampled" and estimate["queries"] == 150
        assert estimate["population"] == truth["queries"]
        chosen = np.isfinite(sampled.ap)
        assert chosen.sum() == 150
        # each sampled query's AP is the exact one (the fast route ranks as the exact one does)
        np.testing.assert_allclose(sampled.ap[chosen], exact.ap[chosen], atol=1e-6)
        covered += estimate["low"] <= truth["value"] <= estimate["high"]
        widths.append(estimate["high"] - estimate["low"])
    # a 95 % interval: it covers the exact MAP@R in (nearly) every one of 20 seeded samples, and is not vacuous
    assert covered >= 17, covered
    assert 0.0 < np.mean(widths) < 0.15
    # the nearest-neighbour figures come from every image even when the AP is sampled
    sampled = compute_statistics(embeddings, labels, evaluated, ap_sample=150)
    np.testing.assert_array_equal(sampled.nn_correct, exact.nn_correct)
    np.testing.assert_array_equal(sampled.confusion, exact.confusion)
    row = sampled.per_class[0]
    assert row["map_queries"] < row["n_queries"] and row["map_low"] <= row["map_at_r"] <= row["map_high"]
    # what users read, and what the stored file keeps
    assert "150 randomly sampled queries of" in describe_map_at_r(sampled) and "95% interval" in describe_map_at_r(sampled)
    assert describe_map_at_r(exact).startswith(f"MAP@R {truth['value']:.3f}, exact over all")


def test_the_summary_survives_the_file_and_old_files_read_without_one(tmp_path):
    embeddings, labels = _overlapping(n=400)
    sampled = compute_statistics(embeddings, labels, np.ones(400, dtype=bool), ap_sample=50)
    save_statistics(sampled, tmp_path / "s.npz")
    assert load_statistics(tmp_path / "s.npz").summary == sampled.summary
    with np.load(tmp_path / "s.npz") as archive:
        old = {name: archive[name] for name in archive.files if name != "summary"}
    np.savez(tmp_path / "old.npz", **old)
    assert load_statistics(tmp_path / "old.npz").summary == {} and describe_map_at_r(load_statistics(tmp_path / "old.npz")) == ""


def test_the_interval_closes_on_a_whole_population_and_widens_with_spread():
    values = np.linspace(0, 1, 101)
    whole = mean_interval(values, 101)
    assert whole["low"] == whole["high"] == pytest.approx(0.5)
    part = mean_interval(values[::2], 1_000)
    assert part["low"] < 0.5 < part["high"]
    assert mean_interval(np.full(10, 0.3), 100)["high"] == pytest.approx(0.3)


def test_statistics_from_the_run_knn_equal_those_that_search_themselves(tmp_path):
    embeddings, labels = _overlapping(n=1_500)
    evaluated = np.ones(len(labels), dtype=bool)
    own = compute_statistics(embeddings, labels, evaluated)
    knn = run_knn.compute_run_knn(embeddings, source="runs/1/embeddings.npy")
    assert knn.kind == "exact" and knn.width == run_knn.KNN_WIDTH
    assert (knn.ids[:, 0] == np.arange(len(labels))).all() and (knn.distances[:, 0] == 0).all()
    run_knn.save_run_knn(knn, tmp_path / "knn")
    loaded = run_knn.load_run_knn(tmp_path / "knn", expected_rows=len(labels), source="runs/1/embeddings.npy")
    shared = compute_statistics(embeddings, labels, evaluated, knn=loaded)
    np.testing.assert_array_equal(shared.neighbours, own.neighbours)
    np.testing.assert_allclose(shared.distances, own.distances, atol=1e-5)
    np.testing.assert_array_equal(shared.suspect_label, own.suspect_label)
    assert shared.per_class == own.per_class
    # another embeddings file's k-NN is never read; a damaged one is refused by name
    with pytest.raises(LookupError):
        run_knn.load_run_knn(tmp_path / "knn", source="runs/1/embeddings-other.npy")
    np.save(tmp_path / "knn" / "ids.npy", knn.ids[:10])
    with pytest.raises(ValueError, match="ids.npy"):
        run_knn.load_run_knn(tmp_path / "knn", source="runs/1/embeddings.npy")


def test_an_approximate_knn_keeps_most_exact_neighbours():
    embeddings, _ = _overlapping(n=4_000, d=32)
    exact = run_knn.compute_run_knn(embeddings, approximate=False)
    approximate = run_knn.compute_run_knn(embeddings, approximate=True)
    assert approximate.kind == "ivf" and approximate.recall_at_10 >= 0.95
    assert (approximate.ids[:, 0] == np.arange(len(embeddings))).all()
    recall = np.mean([len(set(a[1:11]) & set(e[1:11])) / 10 for a, e in zip(approximate.ids, exact.ids)])
    assert recall >= 0.9, recall


def test_the_list_wise_knn_compares_the_fewest_lists_that_reach_the_target(monkeypatch):
    from core.explore import search
    from core.explore.search import NeighbourIndex

    embeddings, _ = _overlapping(n=4_000, d=32)
    index = NeighbourIndex(embeddings, approximate=True)
    chosen = {}  # target → (lists compared, recall they reach)
    for target in np.linspace(0.3, 0.99, 15):
        monkeypatch.setattr(search, "TARGET_RECALL", float(target))
        knn = run_knn.compute_run_knn(embeddings, index=index)
        chosen[target] = (knn.params["probe_lists"], knn.recall_at_10)
        assert knn.recall_at_10 >= target
    # the fewest: every smaller count seen for any target falls short of this target
    for target, (lists, _) in chosen.items():
        assert all(recall < target for fewer, recall in chosen.values() if fewer < lists), (target, chosen)
    # not only powers of two (doubling alone overshoots)
    assert any(lists & (lists - 1) for lists, _ in chosen.values()), chosen


@pytest.mark.parametrize("map_first", [False, True])
def test_the_run_knn_is_computed_once_and_read_by_the_other_job(engine, monkeypatch, map_first):
    """Statistics then map (the usual order), or map then statistics: one k-NN computation, and the
    map's umap is handed the run's k-NN rather than searching again."""
    from core.explore import projection
    from core.runs import worker
    from storage import artifacts
    from storage.run_files import RunFiles
    from tests.helpers import clustered_run

    made = clustered_run(engine, 600, classes=4, seed=2, umap=False)
    run_id = made["run_id"]
    unit = made["embeddings"] / np.linalg.norm(made["embeddings"], axis=1, keepdims=True)
    np.save(artifacts.absolute(RunFiles(run_id).relative("embeddings.npy")), unit)  # a trained run's: unit length
    computed, handed = [], []
    real = run_knn.compute_run_knn
    monkeypatch.setattr(run_knn, "compute_run_knn", lambda *a, **kw: computed.append(1) or real(*a, **kw))

    def fake_umap(embeddings, on_progress=None, knn=None, **params):
        handed.append(knn)
        return np.zeros((len(embeddings), 2), dtype=np.float32)

    monkeypatch.setattr(projection, "project_umap", fake_umap)
    jobs = [worker.compute_statistics, worker.compute_projection]
    for job in (reversed(jobs) if map_first else jobs):
        row = job(engine, run_id)
        assert row.status == "done", row.reason
    assert len(computed) == 1
    (ids, distances), = handed
    assert ids.shape == (600, 15) and (ids[:, 0] == np.arange(600)).all()
    stored = run_knn.load_run_knn(artifacts.absolute(RunFiles(run_id).knn), expected_rows=600)
    np.testing.assert_array_equal(ids, stored.ids[:, :15])
    # the statistics' neighbours are the same k-NN's
    from core.explore import service as explore

    stats = explore.load_run_statistics(explore.statistics_path(engine, run_id))
    np.testing.assert_array_equal(stats.neighbours, stored.ids[:, 1:11])


def test_a_landmark_map_is_as_trustworthy_as_an_exact_layout_of_a_sample():
    """umap fitted on a quarter of the points, the rest placed from the run's k-NN: on a sample
    (not the landmarks), its trustworthiness is within 0.02 of an exact-k-NN UMAP of that sample;
    the same landmarks with the rest placed without their neighbours are far outside it."""
    from bench.synthetic import clustered_embeddings
    from core.explore.projection import project_umap, trustworthiness

    data, _ = clustered_embeddings(4_000, classes=10, dim=32, seed=1)
    knn = run_knn.compute_run_knn(data)
    calls = []
    coords = project_umap(data, seed=0, knn=run_knn.for_umap(knn, 15, "euclidean"), landmarks=1_000,
                          on_progress=lambda phase, fraction, message: calls.append((phase, fraction, message)))
    assert coords.shape == (4_000, 2) and np.isfinite(coords).all()
    assert any("1,000 landmarks" in message for phase, _, message in calls if phase == "done")
    sample = np.sort(np.random.default_rng(99).choice(4_000, 1_000, replace=False))
    ours = trustworthiness(data[sample], coords[sample], 10)
    exact = trustworthiness(data[sample], project_umap(data[sample], seed=0), 10)
    assert ours >= exact - 0.02, (ours, exact)
    landmarks = np.sort(np.random.default_rng(0).choice(4_000, 1_000, replace=False))
    careless = coords.copy()
    careless[np.setdiff1d(np.arange(4_000), landmarks)] = coords[np.random.default_rng(5).choice(landmarks, 3_000)]
    assert trustworthiness(data[sample], careless[sample], 10) < exact - 0.1


def test_trustworthiness_equals_scikit_learn_s():
    from sklearn.manifold import trustworthiness as reference

    from core.explore.projection import trustworthiness

    rng = np.random.default_rng(0)
    data = rng.normal(size=(600, 12)).astype(np.float32)
    coords = (data[:, :2] + rng.normal(scale=0.5, size=(600, 2))).astype(np.float32)
    assert trustworthiness(data, coords, 7, block=64) == pytest.approx(reference(data, coords, n_neighbors=7), abs=1e-9)
