import numpy as np
import pytest

from core.explore.metrics import knn_accuracy, retrieval_metrics


def _brute_force(embeddings, labels, queries=None):
    """Precision@1, R-Precision, MAP@R and Recall@k by a plain loop over queries (all, or those given)."""
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    out = {"precision_at_1": [], "r_precision": [], "map_at_r": [], "recall_at_1": [], "recall_at_5": [],
           "recall_at_10": []}
    for q in range(len(labels)) if queries is None else queries:
        others = [i for i in range(len(labels)) if i != q]
        order = sorted(others, key=lambda i: -float(unit[q] @ unit[i]))
        relevant = [labels[i] == labels[q] for i in order]
        r = sum(relevant)
        if r == 0:
            continue
        out["precision_at_1"].append(relevant[0])
        out["r_precision"].append(sum(relevant[:r]) / r)
        hits, precision_sum = 0, 0.0
        for i in range(r):
            if relevant[i]:
                hits += 1
                precision_sum += hits / (i + 1)
        out["map_at_r"].append(precision_sum / r)
        for k in (1, 5, 10):
            out[f"recall_at_{k}"].append(any(relevant[:k]))
    return {key: float(np.mean(values)) for key, values in out.items()}


def test_retrieval_metrics_match_a_plain_loop():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, size=60)
    centres = rng.normal(size=(4, 8))
    embeddings = centres[labels] + rng.normal(scale=1.2, size=(60, 8))
    ours = retrieval_metrics(embeddings.astype(np.float32), labels)
    expected = _brute_force(embeddings, labels)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key
    assert 0.0 < ours["map_at_r"] < 1.0  # neither trivial end: the loop really was compared


def test_queries_go_in_blocks_and_past_the_limit_a_seeded_sample_is_exact_per_query(monkeypatch):
    """A million-image run's 200,000 test images in ten classes would need (200,000 × 20,000)
    neighbour ids at once (30 GB): blocks bound that, and past EXACT_UP_TO a sample of queries
    stands for the rest, each of them ranked against the whole set."""
    import core.explore.metrics as metrics

    rng = np.random.default_rng(5)
    labels = rng.integers(0, 3, size=120)
    embeddings = (rng.normal(size=(3, 6))[labels] + rng.normal(scale=1.5, size=(120, 6))).astype(np.float32)
    expected = _brute_force(embeddings, labels)
    monkeypatch.setattr(metrics, "BLOCK_BYTES", 32 * 120 * 3)  # about three queries a block
    blocked = retrieval_metrics(embeddings, labels)
    assert "sampled_queries" not in blocked
    for key, value in expected.items():
        assert blocked[key] == pytest.approx(value, abs=1e-6), key
    monkeypatch.setattr(metrics, "EXACT_UP_TO", 100)
    monkeypatch.setattr(metrics, "SAMPLE", 40)
    sampled = retrieval_metrics(embeddings, labels, seed=7)
    assert sampled["sampled_queries"] == 40
    chosen = np.sort(np.random.default_rng(7).choice(np.arange(120), 40, replace=False))
    for key, value in _brute_force(embeddings, labels, chosen).items():
        assert sampled[key] == pytest.approx(value, abs=1e-6), key
    assert sampled["map_at_r"] != pytest.approx(expected["map_at_r"], abs=1e-6)  # really a sample, not the whole
    assert "sampled_queries" not in retrieval_metrics(embeddings, labels, sample=500)  # a sample of everything is exact


def test_perfect_and_singleton_classes():
    embeddings = np.array([[1, 0], [0.99, 0.1], [0, 1], [0.1, 0.99], [-1, 0]], dtype=np.float32)
    labels = np.array([0, 0, 1, 1, 2])  # class 2 has one member: no query for it
    metrics = retrieval_metrics(embeddings, labels)
    assert metrics["precision_at_1"] == 1.0 and metrics["map_at_r"] == 1.0


def test_metrics_that_would_mean_nothing_are_refused():
    rng = np.random.default_rng(5)
    embeddings = rng.normal(size=(6, 4)).astype(np.float32)
    # one class: every neighbour is relevant, so every metric would be a meaningless 1.0
    with pytest.raises(ValueError, match="^metrics need at least two classes in the test set; this one has 1$"):
        retrieval_metrics(embeddings, np.zeros(6, dtype=np.int64))
    with pytest.raises(ValueError, match="this one has 0$"):
        retrieval_metrics(embeddings[:0], np.zeros(0, dtype=np.int64))
    # six classes of one image each: no query has a relevant item
    with pytest.raises(ValueError, match="at least two images of some class"):
        retrieval_metrics(embeddings, np.arange(6))
    # two classes with two images each is the smallest set that is measured
    labels = np.array([0, 0, 1, 1, 2, 3])
    assert 0.0 <= retrieval_metrics(embeddings, labels)["precision_at_1"] <= 1.0


def test_nan_embeddings_are_refused_with_a_count():
    rng = np.random.default_rng(6)
    embeddings = rng.normal(size=(8, 4)).astype(np.float32)
    embeddings[2, 1] = np.nan
    embeddings[5] = np.inf
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="^embeddings of 2 of 8 images are NaN or infinite$"):
        retrieval_metrics(embeddings, labels)
    with pytest.raises(ValueError, match="^embeddings of 2 of 8 images are NaN or infinite$"):
        knn_accuracy(embeddings, labels)


def test_knn_accuracy_on_a_set_smaller_than_k():
    embeddings = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32)
    assert knn_accuracy(embeddings, np.array([0, 0, 1, 1]), k=1) == 1.0
    # k = 10 on four images votes with the three others: the majority of each is the other class
    assert knn_accuracy(embeddings, np.array([0, 0, 1, 1]), k=10) == 0.0


def test_knn_accuracy_separates_clusters_from_noise():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 30)
    clustered = np.eye(3)[labels] * 5 + rng.normal(size=(90, 3))
    noise = rng.normal(size=(90, 3))
    assert knn_accuracy(clustered, labels) > 0.9
    assert knn_accuracy(noise, labels) < 0.6
