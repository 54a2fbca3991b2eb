import numpy as np
import pytest

from core.explore.failures import (RunStatistics, compute_statistics, confusion_normalised, label_errors, load_statistics,
                           save_statistics, worst_queries)
from core.explore.metrics import retrieval_metrics


def _clusters(per_class=30, classes=4, d=16, spread=0.15, seed=0):
    """Tight clusters, one per class, around orthogonal centres."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    centres = np.eye(d)[:classes] * 3.0
    embeddings = centres[labels] + rng.normal(scale=spread, size=(len(labels), d))
    return embeddings.astype(np.float32), labels.astype(np.int64), centres


def _with_mislabelled(seed=0):
    """Clusters plus one image of label 0 placed in the middle of class 2's cluster (the last row)."""
    embeddings, labels, centres = _clusters(seed=seed)
    stray = centres[2] + np.random.default_rng(seed + 1).normal(scale=0.05, size=centres.shape[1])
    return np.vstack([embeddings, stray[None, :].astype(np.float32)]), np.append(labels, 0)


def _noisy(n=90, classes=4, d=6, seed=3):
    """Overlapping classes: rankings mix relevant and irrelevant images."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    embeddings = rng.normal(size=(classes, d))[labels] + rng.normal(scale=1.0, size=(n, d))
    return embeddings.astype(np.float32), labels.astype(np.int64)


def _distance_matrix(embeddings):
    unit = embeddings.astype(np.float64) / np.linalg.norm(embeddings.astype(np.float64), axis=1, keepdims=True)
    return np.sqrt(np.clip(2.0 - 2.0 * unit @ unit.T, 0.0, None))


def _brute_force(embeddings, labels, evaluated, k):
    """Per query within the evaluated set, by numpy argsort of the full distance matrix: AP (MAP@R's
    term), whether the nearest other is relevant, and the classes of the k nearest others."""
    rows = np.flatnonzero(evaluated)
    distances = _distance_matrix(embeddings[rows])
    ap, first, top_classes = {}, {}, {}
    for i, q in enumerate(rows):
        if labels[q] < 0:
            continue
        order = [j for j in np.argsort(distances[i], kind="stable") if j != i]
        relevant = labels[rows[order]] == labels[q]
        top_classes[q] = labels[rows[order[:k]]]
        r = int(relevant.sum())
        if r == 0:
            continue
        hits = relevant[:r]
        ap[q] = float((np.cumsum(hits) / np.arange(1, r + 1) * hits).sum() / r)
        first[q] = bool(relevant[0])
    return ap, first, top_classes


def test_a_mislabelled_image_is_the_first_label_error_and_the_worst_query():
    embeddings, labels = _with_mislabelled()
    stray = len(labels) - 1
    stats = compute_statistics(embeddings, labels, np.ones(len(labels), dtype=bool))
    errors = label_errors(stats)
    assert errors[0]["position"] == stray
    assert errors[0]["label"] == 0 and errors[0]["suspect_label"] == 2
    assert errors[0]["share"] == pytest.approx(1.0)
    assert errors[0]["mean_distance"] == pytest.approx(float(stats.distances[stray].mean()), rel=1e-5)
    assert all(row["share"] >= 0.5 for row in errors)
    assert worst_queries(stats, n=1)[0] == stray
    assert stats.ap[stray] < 0.1 and np.nanmin(np.delete(stats.ap, stray)) > 0.8
    assert (stats.ap[(labels == 1) | (labels == 3)] == 1).all()  # untouched clusters: every relevant image first
    assert stats.nn_correct[stray] == 0 and stats.suspect_label[stray] == 2


def test_a_clean_dataset_has_no_label_errors():
    embeddings, labels, _ = _clusters()
    stats = compute_statistics(embeddings, labels, np.ones(len(labels), dtype=bool))
    assert label_errors(stats, min_share=0.5) == []
    assert (stats.nn_correct == 1).all()
    assert (stats.suspect_share < 0.5).all()


def test_worst_queries_are_ordered_and_among_restricts_them():
    embeddings, labels = _noisy()
    evaluated = np.arange(len(labels)) >= 30
    stats = compute_statistics(embeddings, labels, evaluated, k=5)
    worst = worst_queries(stats, n=10)
    assert len(worst) == 10 and evaluated[worst].all()
    assert (np.diff(stats.ap[worst]) >= 0).all()
    assert stats.ap[worst[-1]] <= np.nanmin(np.delete(stats.ap, worst))
    among = np.arange(50, 70)
    restricted = worst_queries(stats, n=100, among=among)
    assert set(restricted) == set(among[np.isfinite(stats.ap[among])])
    mask = np.zeros(len(labels), dtype=bool)
    mask[among] = True
    assert list(worst_queries(stats, n=5, among=mask)) == list(restricted[:5])
    assert worst_queries(stats, n=5, among=np.arange(0, 30)).size == 0  # none of those is evaluated
    with pytest.raises(ValueError, match="among"):
        worst_queries(stats, among=[len(labels)])


def test_mean_ap_and_per_class_figures_reproduce_retrieval_metrics():
    embeddings, labels = _noisy(n=160, classes=5)
    labels[40] = 7  # a class with one evaluated member: skipped, as retrieval_metrics skips it
    evaluated = np.arange(len(labels)) >= 40
    stats = compute_statistics(embeddings, labels, evaluated)
    expected = retrieval_metrics(embeddings[evaluated], labels[evaluated])
    usable = np.isfinite(stats.ap)
    assert not usable[40] and not usable[:40].any()
    assert stats.ap[usable].astype(np.float64).mean() == pytest.approx(expected["map_at_r"], abs=1e-6)
    total = sum(row["n_queries"] for row in stats.per_class)
    assert total == usable.sum()
    assert 7 not in [row["class"] for row in stats.per_class]
    weighted = {key: sum(row["n_queries"] * row[key] for row in stats.per_class) / total
                for key in ("precision_at_1", "map_at_r")}
    assert weighted["precision_at_1"] == pytest.approx(expected["precision_at_1"], abs=1e-9)
    assert weighted["map_at_r"] == pytest.approx(expected["map_at_r"], abs=1e-6)


def test_ap_precision_at_1_and_confusion_match_brute_force_with_unlabeled_images():
    embeddings, labels = _noisy(n=70, classes=3, seed=5)
    labels[[3, 40, 41]] = -1  # unlabeled: never a query, never relevant, still in the rankings
    evaluated = np.arange(len(labels)) % 3 != 0
    k = 4
    stats = compute_statistics(embeddings, labels, evaluated, k=k)
    ap, first, top_classes = _brute_force(embeddings, labels, evaluated, k)
    assert set(np.flatnonzero(np.isfinite(stats.ap))) == set(ap)
    for q, value in ap.items():
        assert stats.ap[q] == pytest.approx(value, abs=1e-6), q
    for row in stats.per_class:
        queries = [q for q in ap if labels[q] == row["class"]]
        assert row["n_queries"] == len(queries)
        assert row["precision_at_1"] == pytest.approx(np.mean([first[q] for q in queries]))
        assert row["map_at_r"] == pytest.approx(np.mean([ap[q] for q in queries]), abs=1e-6)
    expected = np.zeros((3, 3), dtype=np.int64)
    for q, classes in top_classes.items():
        for c in classes[classes >= 0]:
            expected[labels[q], c] += 1
    assert (stats.confusion == expected).all()


def test_ap_is_the_same_whatever_the_block_size():
    embeddings, labels = _noisy(n=101, classes=3, seed=8)
    evaluated = np.ones(len(labels), dtype=bool)
    whole = compute_statistics(embeddings, labels, evaluated, block_size=1000)
    for block_size in (1, 3, 7):
        blocked = compute_statistics(embeddings, labels, evaluated, block_size=block_size)
        np.testing.assert_allclose(blocked.ap, whole.ap, atol=1e-7)
    ap, _, _ = _brute_force(embeddings, labels, evaluated, 10)
    np.testing.assert_allclose(whole.ap[list(ap)], list(ap.values()), atol=1e-6)


def test_overlapping_classes_show_in_the_off_diagonal():
    embeddings, labels, centres = _clusters(per_class=25, classes=3)
    rng = np.random.default_rng(2)
    labels = np.append(labels, np.full(25, 3))  # class 3 drawn around class 1's centre
    embeddings = np.vstack([embeddings, (centres[1] + rng.normal(scale=0.15, size=(25, 16))).astype(np.float32)])
    stats = compute_statistics(embeddings, labels, np.ones(len(labels), dtype=bool), k=10)
    assert stats.confusion[1, 3] > 0 and stats.confusion[3, 1] > 0
    assert stats.confusion[0, 1] == 0 and stats.confusion[0, 0] == 25 * 10
    assert (stats.confusion.sum(axis=1) == 25 * 10).all()
    shares = confusion_normalised(stats)
    np.testing.assert_allclose(shares.sum(axis=1), 1.0)
    assert shares[1, 3] == pytest.approx(stats.confusion[1, 3] / 250)


def test_confusion_rows_of_classes_without_queries_stay_zero():
    embeddings, labels, _ = _clusters(per_class=10, classes=3)
    evaluated = labels != 2  # class 2 exists but is never queried
    stats = compute_statistics(embeddings, labels, evaluated, k=3)
    assert stats.confusion.shape == (3, 3) and stats.confusion[2].sum() == 0
    shares = confusion_normalised(stats)
    assert (shares[2] == 0).all()
    np.testing.assert_allclose(shares[:2].sum(axis=1), 1.0)
    assert [row["class"] for row in stats.per_class] == [0, 1]


def test_neighbours_and_nn_correct_match_brute_force():
    embeddings, labels = _noisy(n=60, seed=11)
    labels[[5, 6]] = -1
    k = 5
    stats = compute_statistics(embeddings, labels, np.arange(60) < 20, k=k)
    distances = _distance_matrix(embeddings)
    np.fill_diagonal(distances, np.inf)
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    assert (stats.neighbours == order).all()
    np.testing.assert_allclose(stats.distances, np.take_along_axis(distances, order, axis=1), atol=1e-3)
    nearest_label = labels[order[:, 0]]
    expected = np.where(labels < 0, -1, (nearest_label == labels).astype(int))
    assert (stats.nn_correct == expected).all()
    assert (stats.nn_correct[[5, 6]] == -1).all()
    assert (stats.suspect_label[[5, 6]] == -1).all() and (stats.suspect_share[[5, 6]] == 0).all()
    for i in np.flatnonzero(labels >= 0):
        near = labels[order[i]]
        others = near[(near >= 0) & (near != labels[i])]
        if len(others):
            counts = np.bincount(others)
            assert counts[stats.suspect_label[i]] == counts.max()
            assert stats.suspect_share[i] == pytest.approx(counts.max() / k)
        else:
            assert stats.suspect_label[i] == -1


def test_progress_and_refusals():
    embeddings, labels = _noisy(n=40)
    fractions = []
    compute_statistics(embeddings, labels, np.ones(40, dtype=bool), on_progress=fractions.append)
    assert fractions[-1] == 1.0 and fractions == sorted(fractions) and len(fractions) >= 3
    broken = embeddings.copy()
    broken[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        compute_statistics(broken, labels, np.ones(40, dtype=bool))
    with pytest.raises(ValueError, match="labels"):
        compute_statistics(embeddings, labels[:-1], np.ones(40, dtype=bool))
    with pytest.raises(ValueError, match="evaluated"):
        compute_statistics(embeddings, labels, np.ones(39, dtype=bool))
    # positions work as well as a mask, and k shrinks on tiny runs
    small = compute_statistics(embeddings[:4], labels[:4], np.array([0, 1, 2, 3]), k=10)
    assert small.neighbours.shape == (4, 3) and small.evaluated.all()


def _assert_same(a: RunStatistics, b: RunStatistics):
    for name in ("labels", "evaluated", "ap", "neighbours", "distances", "nn_correct", "confusion",
                 "suspect_label", "suspect_share"):
        left, right = getattr(a, name), getattr(b, name)
        assert left.dtype == right.dtype and left.shape == right.shape, name
        np.testing.assert_array_equal(left, right, err_msg=name)
    assert a.per_class == b.per_class


def test_save_and_load_round_trip(tmp_path):
    embeddings, labels = _with_mislabelled()
    stats = compute_statistics(embeddings, labels, np.arange(len(labels)) % 2 == 0)
    path = tmp_path / "runs" / "stats.npz"
    save_statistics(stats, path)
    assert [p.name for p in path.parent.iterdir()] == ["stats.npz"]  # no temp file left behind
    _assert_same(load_statistics(path), stats)
    assert label_errors(load_statistics(path)) == label_errors(stats)


def test_a_corrupt_or_incomplete_file_is_refused_by_name(tmp_path):
    stats = compute_statistics(*_noisy(n=30), np.ones(30, dtype=bool))
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match="garbage.npz"):
        load_statistics(garbage)
    good = tmp_path / "good.npz"
    save_statistics(stats, good)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated.npz"):
        load_statistics(truncated)
    with np.load(good) as archive:
        fields = {name: archive[name] for name in archive.files if name != "ap"}
    lacking = tmp_path / "lacking.npz"
    np.savez(lacking, **fields)
    with pytest.raises(ValueError, match="lacking.npz.*ap"):
        load_statistics(lacking)
    with pytest.raises(LookupError, match="absent.npz"):
        load_statistics(tmp_path / "absent.npz")
