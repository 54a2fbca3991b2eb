"""Comparing two runs (core.explore.compare): every figure against a brute-force computation on
small runs, the bootstrap interval's coverage in a seeded simulation, stored runs matched by
position and by content, and the command line's figures and refusals."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.explore.compare import ComparedRun, compare, compare_runs, comparison_text, jaccard, paired_bootstrap
from core.explore.failures import compute_statistics
from core.explore.metrics import retrieval_metrics

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ brute force, by the definitions


def unit(vectors):
    vectors = np.asarray(vectors, dtype=np.float64)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def nearest_sets(embeddings, members, k):
    """For each of `members` (rows of embeddings), the set of its k nearest other members, as
    indices into `members`."""
    vectors = unit(embeddings[members])
    distance = np.linalg.norm(vectors[:, None, :] - vectors[None, :, :], axis=2)
    np.fill_diagonal(distance, np.inf)
    return [set(np.argsort(row, kind="stable")[:k].tolist()) for row in distance]


def brute_query(embeddings, labels, evaluated, q):
    """(AP as MAP@R defines it, nearest other evaluated image carries the label) of query q, or
    None when q is no query (unlabelled, not evaluated, or alone in its class)."""
    others = [i for i in np.flatnonzero(evaluated) if i != q]
    if labels[q] < 0 or not evaluated[q]:
        return None
    vectors = unit(embeddings)
    order = sorted(others, key=lambda i: np.linalg.norm(vectors[i] - vectors[q]))
    relevant = [labels[i] == labels[q] for i in order]
    r = sum(relevant)
    if r == 0:
        return None
    hits, total = 0, 0.0
    for rank, hit in enumerate(relevant[:r], start=1):
        if hit:
            hits += 1
            total += hits / rank
    return total / r, bool(relevant[0])


# ------------------------------------------------------------------ small runs


def clustered(rng, n, classes, dim, spread):
    labels = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, dim)) * 2
    return labels, centres[labels] + rng.normal(size=(n, dim)) * spread


def compared_run(run_id, embeddings, labels, evaluated, classes, settings=None):
    stats = compute_statistics(embeddings, labels, evaluated, k=10)
    return ComparedRun(run_id, embeddings.astype(np.float32), stats, classes, settings or {})


@pytest.fixture(scope="module")
def pair():
    """Runs A and B of one dataset of 90 images (4 classes, 36 evaluated): B is A moved by noise."""
    rng = np.random.default_rng(0)
    labels, a = clustered(rng, 90, 4, 6, 1.2)
    b = a + rng.normal(size=a.shape) * 0.9
    evaluated = np.zeros(90, dtype=bool)
    evaluated[rng.choice(90, 36, replace=False)] = True
    classes = ["w", "x", "y", "z"]
    return {"labels": labels, "a": a, "b": b, "evaluated": evaluated, "classes": classes,
            "run_a": compared_run(1, a, labels, evaluated, classes, {"loss": "triplet", "seed": 0}),
            "run_b": compared_run(2, b, labels, evaluated, classes, {"loss": "infonce", "seed": 0})}


@pytest.mark.parametrize("k", [5, 10, 15])  # within the stored neighbours, all of them, past them (searched)
def test_agreement_is_the_jaccard_of_the_nearest_sets(pair, k):
    everything = np.arange(90)
    c = compare(pair["run_a"], pair["run_b"], everything, everything, k=k, resamples=50)
    near_a, near_b = nearest_sets(pair["a"], everything, k), nearest_sets(pair["b"], everything, k)
    expected = [len(x & y) / len(x | y) for x, y in zip(near_a, near_b)]
    np.testing.assert_allclose(c.agreement, expected, atol=1e-6)
    assert [set(row) for row in c.neighbours_a] == near_a
    assert 0.05 < c.mean_agreement < 0.95  # the runs differ, but not entirely: the test can tell
    assert c.k == k


def test_agreement_over_a_shared_subset_in_another_order():
    """B's dataset holds 50 of A's 70 images, shuffled, and 20 of its own: neighbours are taken
    among the 50 shared images only, matched through the positions given."""
    rng = np.random.default_rng(1)
    labels, a = clustered(rng, 70, 3, 5, 1.0)
    shared = np.sort(rng.choice(70, 50, replace=False))
    extra_labels, extra = clustered(rng, 20, 3, 5, 1.0)
    order = rng.permutation(70)  # B's rows: 50 shared images then 20 of its own, shuffled
    b_source = np.concatenate([a[shared] + rng.normal(size=(50, 5)) * 0.7, extra])[order]
    b_labels = np.concatenate([labels[shared], extra_labels])[order]
    positions_b = np.argsort(order)[:50]  # where shared image i went in B
    everything = np.ones(70, dtype=bool)
    run_a = compared_run(1, a, labels, everything, ["p", "q", "r"])
    run_b = compared_run(2, b_source, b_labels, everything, ["p", "q", "r"])
    for k in (3, 10):
        c = compare(run_a, run_b, shared, positions_b, k=k, resamples=50)
        near_a = nearest_sets(a, shared, k)
        near_b = nearest_sets(b_source, positions_b, k)
        np.testing.assert_allclose(c.agreement, [len(x & y) / len(x | y) for x, y in zip(near_a, near_b)], atol=1e-6)
        # the query figures too, each against its own run's whole evaluated set
        for j, i in enumerate(c.queries):
            assert c.ap_a[j] == pytest.approx(brute_query(a, labels, everything, shared[i])[0], abs=1e-5)
            assert c.ap_b[j] == pytest.approx(brute_query(b_source, b_labels, everything, positions_b[i])[0], abs=1e-5)
        assert len(c.queries) == 50


def test_query_changes_and_per_class_differences_equal_brute_force(pair):
    everything = np.arange(90)
    c = compare(pair["run_a"], pair["run_b"], everything, everything, resamples=200)
    labels, evaluated = pair["labels"], pair["evaluated"]
    expected = {}
    for q in range(90):
        in_a, in_b = brute_query(pair["a"], labels, evaluated, q), brute_query(pair["b"], labels, evaluated, q)
        if in_a is not None and in_b is not None:
            expected[q] = (in_a, in_b)
    assert c.queries.tolist() == sorted(expected)
    truth = np.array([[*expected[q][0], *expected[q][1]] for q in c.queries], dtype=np.float64)
    np.testing.assert_allclose(c.ap_a, truth[:, 0], atol=1e-5)
    np.testing.assert_allclose(c.ap_b, truth[:, 2], atol=1e-5)
    np.testing.assert_allclose(c.ap_change, truth[:, 2] - truth[:, 0], atol=1e-5)
    assert c.correct_a.tolist() == truth[:, 1].astype(bool).tolist()
    assert c.correct_b.tolist() == truth[:, 3].astype(bool).tolist()
    assert c.flip.tolist() == (truth[:, 3] - truth[:, 1]).astype(int).tolist()
    counts = c.counts()
    assert counts["better"] == int((truth[:, 2] > truth[:, 0] + 1e-6).sum())
    assert counts["worse"] == int((truth[:, 2] < truth[:, 0] - 1e-6).sum())
    assert counts["wrong_to_right"] + counts["right_to_wrong"] == int((truth[:, 1] != truth[:, 3]).sum())

    # overall: A's and B's figures are retrieval_metrics of their evaluated sets
    rows = {row["metric"]: row for row in c.overall}
    for side, embeddings in (("a", pair["a"]), ("b", pair["b"])):
        metrics = retrieval_metrics(embeddings[evaluated], labels[evaluated])
        assert rows["precision_at_1"][side] == pytest.approx(metrics["precision_at_1"], abs=1e-9)
        assert rows["map_at_r"][side] == pytest.approx(metrics["map_at_r"], abs=1e-5)
    for row in rows.values():
        assert row["low"] <= row["difference"] <= row["high"]

    # per class: the brute means of the queries of each class, and an interval around each difference
    query_labels = labels[c.queries]
    assert [row["class"] for row in c.per_class] == sorted(set(query_labels.tolist()))
    for row in c.per_class:
        members = query_labels == row["class"]
        assert row["n_queries"] == int(members.sum()) and row["name"] == pair["classes"][row["class"]]
        assert row["precision_at_1_a"] == pytest.approx(truth[members, 1].mean())
        assert row["precision_at_1_difference"] == pytest.approx(truth[members, 3].mean() - truth[members, 1].mean())
        assert row["map_at_r_difference"] == pytest.approx(truth[members, 2].mean() - truth[members, 0].mean(), abs=1e-5)
        assert row["map_at_r_low"] <= row["map_at_r_difference"] <= row["map_at_r_high"]

    # confusion difference: per query class, the shares of nearest results' classes, B minus A
    nearest_label = {}
    vectors = {"a": unit(pair["a"]), "b": unit(pair["b"])}
    for side in ("a", "b"):
        rows_e = np.flatnonzero(evaluated)
        table = np.zeros((4, 4))
        for q in c.queries:
            others = rows_e[rows_e != q]
            nearest = others[np.argmin(np.linalg.norm(vectors[side][others] - vectors[side][q], axis=1))]
            table[labels[q], labels[nearest]] += 1
        nearest_label[side] = table / np.maximum(table.sum(axis=1, keepdims=True), 1)
    np.testing.assert_allclose(c.confusion_difference, nearest_label["b"] - nearest_label["a"], atol=1e-12)
    per_class_p1 = {row["class"]: row["precision_at_1_difference"] for row in c.per_class}
    for cls, difference in per_class_p1.items():
        assert c.confusion_difference[cls, cls] == pytest.approx(difference)


def test_tables_for_a_page(pair):
    everything = np.arange(90)
    c = compare(pair["run_a"], pair["run_b"], everything, everything, resamples=50, rows=5, top=3)
    # the images that moved most: lowest agreement first, with both runs' neighbours
    assert [row["agreement"] for row in c.moved] == sorted(c.agreement.tolist())[:5]
    first = c.moved[0]
    assert len(first["neighbours_a"]) == len(first["neighbours_b"]) == 10
    # the queries that got worse and better, most first, each with both runs' top results
    changes = [row["ap_change"] for row in c.worse]
    assert changes == sorted(changes) and all(change < 0 for change in changes)
    assert changes[0] == pytest.approx(c.ap_change.min())
    assert all(row["ap_change"] > 0 for row in c.better) and c.better[0]["ap_change"] == pytest.approx(c.ap_change.max())
    row = c.worse[0]
    assert len(row["results_a"]) == len(row["results_b"]) == 3
    assert row["correct_a"] == row["results_a"][0]["correct"] and row["correct_b"] == row["results_b"][0]["correct"]
    assert all(pair["evaluated"][hit["position"]] for hit in row["results_a"] + row["results_b"])
    # settings with the differences marked
    assert {r["setting"]: r["differs"] for r in c.settings} == {"loss": True, "seed": False}
    # colour columns for either map
    agreement = c.image_values("agreement", "b")
    assert agreement.shape == (90,) and np.allclose(agreement, c.agreement)
    flip = c.image_values("flip", "a")
    assert np.isnan(flip[~pair["evaluated"]]).all() and np.isfinite(flip[c.queries]).all()
    document = c.to_dict()
    json.dumps(document, allow_nan=False)
    assert document["queries"] == len(c.queries) and len(document["confusion_difference"]) == 4


def test_the_same_run_agrees_with_itself(pair):
    everything = np.arange(90)
    c = compare(pair["run_a"], pair["run_a"], everything, everything, resamples=50)
    assert (c.agreement == 1).all() and (c.ap_change == 0).all()
    assert all(row["low"] == row["high"] == 0 for row in c.overall)


# ------------------------------------------------------------------ the bootstrap interval


def test_the_bootstrap_interval_covers_the_true_difference():
    """Queries drawn from a known population (per class: B's AP is A's plus a known shift plus
    noise; Precision@1 terms right with known probabilities in each run): the 95% interval of
    the overall and of one class's difference covers the true difference in at least 90% of 300
    repetitions (about 95% expected)."""
    rng = np.random.default_rng(7)
    sizes = np.array([60, 80, 60])  # queries per class, fixed as a test split fixes them
    shift = np.array([0.05, -0.02, 0.0])  # true mean AP change per class
    p1_a, p1_b = np.array([0.7, 0.8, 0.6]), np.array([0.75, 0.78, 0.6])
    true = {"map": (sizes * shift).sum() / sizes.sum(), "p1": (sizes * (p1_b - p1_a)).sum() / sizes.sum(),
            "class 0": shift[0]}
    groups = np.repeat(np.arange(3), sizes)
    covered = dict.fromkeys(true, 0)
    repetitions = 300
    for repetition in range(repetitions):
        ap_a = rng.beta(2, 2, len(groups))
        ap_b = ap_a + shift[groups] + rng.normal(0, 0.1, len(groups))
        a = np.stack([rng.random(len(groups)) < p1_a[groups], ap_a], axis=1).astype(float)
        b = np.stack([rng.random(len(groups)) < p1_b[groups], ap_b], axis=1).astype(float)
        overall, per_class = paired_bootstrap(a, b, groups, 3, resamples=400, seed=repetition)
        covered["p1"] += overall[0, 0] <= true["p1"] <= overall[0, 1]
        covered["map"] += overall[1, 0] <= true["map"] <= overall[1, 1]
        covered["class 0"] += per_class[0, 1, 0] <= true["class 0"] <= per_class[0, 1, 1]
    for name, count in covered.items():
        assert 0.90 <= count / repetitions <= 0.99, (name, count / repetitions)  # neither too narrow nor too wide


def test_a_real_difference_is_told_from_noise():
    """Intervals exclude zero for a clear change and include it for none."""
    rng = np.random.default_rng(3)
    a = rng.random((500, 1))
    _, per_class = paired_bootstrap(np.concatenate([a, a]), np.concatenate([a + 0.05 + rng.normal(0, 0.05, a.shape),
                                                                            a + rng.normal(0, 0.05, a.shape)]),
                                    np.repeat([0, 1], 500), 2, resamples=1000)
    assert per_class[0, 0, 0] > 0  # class 0 moved by +0.05
    assert per_class[1, 0, 0] < 0 < per_class[1, 0, 1]  # class 1 did not


def test_jaccard():
    a = np.array([[1, 2, 3], [1, 2, 3]])
    b = np.array([[3, 2, 1], [4, 5, 1]])
    np.testing.assert_allclose(jaccard(a, b), [1.0, 1 / 5])


# ------------------------------------------------------------------ stored runs and the command line


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A data folder with two labelled datasets sharing 60 images (B's in another order, with
    10 of its own), an unlabelled dataset, and runs: A and A2 of dataset one, B of dataset two,
    U1 and U2 of the unlabelled one, and a run queued but never run."""
    from core.data.datasets import save_dataset
    from storage.db import make_engine, transaction
    from storage.schema import Run
    from tests.helpers import stored_run

    home = tmp_path_factory.mktemp("compare")
    rng = np.random.default_rng(5)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EMBEDDING_LAB_HOME", str(home))
        patch.delenv("EMBEDDING_LAB_DB", raising=False)
        engine = make_engine()
        labels, embeddings = clustered(rng, 80, 3, 6, 1.0)
        pixels = rng.integers(0, 255, (80, 8, 8, 1), dtype=np.uint8)
        hashes = [f"{i:064x}" for i in range(80)]
        split = np.where(np.arange(80) % 3 == 0, "test", "train")
        names = ["cat", "dog", "owl"]
        one = save_dataset(engine, "one", "upload", pixels, labels, [f"{i}.png" for i in range(80)], hashes,
                           classes=names, split=split)
        # two: 60 of one's images in reverse order, then 10 new ones; its classes in another order
        take = np.arange(79, 19, -1)
        new_labels = rng.integers(0, 3, 10)
        reorder = {0: 2, 1: 0, 2: 1}  # one's class index → two's
        two_labels = np.array([reorder[int(x)] for x in labels[take]] + [reorder[int(x)] for x in new_labels])
        two = save_dataset(engine, "two", "upload",
                           np.concatenate([pixels[take], rng.integers(0, 255, (10, 8, 8, 1), dtype=np.uint8)]),
                           two_labels, [f"{i}.png" for i in range(70)],
                           [hashes[i] for i in take] + [f"{1000 + i:064x}" for i in range(10)],
                           classes=["dog", "owl", "cat"], split=np.concatenate([split[take], ["test"] * 10]))
        plain = save_dataset(engine, "plain", "upload", pixels[:30], None, [f"{i}.png" for i in range(30)],
                             [f"{2000 + i:064x}" for i in range(30)])
        b_embeddings = embeddings + rng.normal(size=embeddings.shape) * 0.8
        runs = {
            "a": stored_run(engine, one, embeddings, {"encoder": "stored", "options": {"margin": 0.2}}),
            "a2": stored_run(engine, one, b_embeddings, {"encoder": "stored", "options": {"margin": 0.3}}),
            "b": stored_run(engine, two, np.concatenate([b_embeddings[take], rng.normal(size=(10, 6))])),
            "u1": stored_run(engine, plain, rng.normal(size=(30, 4))),
            "u2": stored_run(engine, plain, rng.normal(size=(30, 4))),
            "no statistics": stored_run(engine, one, embeddings, statistics=False),
        }
        with transaction(engine) as session:
            from core.runs import lifecycle

            runs["queued"] = lifecycle.create(session, Run(dataset_id=one, kind="embed", config={})).id
        engine.dispose()
    return {"home": home, "runs": runs, "take": take, "labels": labels, "embeddings": embeddings,
            "b_embeddings": b_embeddings}


@pytest.fixture
def store_env(store, monkeypatch):
    monkeypatch.setenv("EMBEDDING_LAB_HOME", str(store["home"]))
    monkeypatch.delenv("EMBEDDING_LAB_DB", raising=False)
    from storage.db import make_engine

    engine = make_engine()
    yield engine
    engine.dispose()


def test_stored_runs_of_one_dataset_and_of_two_sharing_images(store, store_env):
    runs = store["runs"]
    same = compare_runs(store_env, runs["a"], runs["a2"], resamples=100)
    assert same.aligned_by == "position" and len(same.positions_a) == 80
    assert {r["setting"]: (r["a"], r["b"]) for r in same.settings if r["differs"]} == {"options.margin": (0.2, 0.3)}
    titles = {r["setting"]: r["title"] for r in same.settings}
    assert titles["options.margin"] == "Margin m"  # as the Train form says, not the stored key

    across = compare_runs(store_env, runs["a"], runs["b"], resamples=100)
    assert across.aligned_by == "sha256"
    take = store["take"]
    assert across.positions_a.tolist() == list(range(20, 80))  # A's positions, in order
    assert across.positions_b.tolist() == [79 - p for p in range(20, 80)]  # where each sits in B
    # B's embeddings of the shared images are A2's: neighbourhoods among the 60 shared images agree
    # by the brute force over those images, and B's class names are matched by name, not index
    near_a = nearest_sets(store["embeddings"], across.positions_a, 10)
    near_b = nearest_sets(store["b_embeddings"], across.positions_a, 10)
    np.testing.assert_allclose(across.agreement, [len(x & y) / len(x | y) for x, y in zip(near_a, near_b)], atol=1e-6)
    assert across.classes == ["cat", "dog", "owl"]
    labels = store["labels"]
    query_positions = across.positions_a[across.queries]
    assert across.labels[across.queries].tolist() == labels[query_positions].tolist()
    for row in across.worse + across.better:
        assert row["label"] == row["label_b"] == ["cat", "dog", "owl"][labels[row["position_a"]]]
    assert len(take) == 60


@pytest.mark.parametrize("which, fragments", [
    (("a", "a"), ["compared with itself"]),
    ((999, "a"), ["run 999 does not exist"]),
    (("a", "queued"), ["is queued, not completed"]),
    (("a", "no statistics"), ["statistics were never computed", "python -m core project --run"]),
    (("a", "u1"), ["share no images"]),
    (("u1", "u2"), ["unlabelled", "--agreement-only"]),
])
def test_what_cannot_be_compared_is_said_in_a_sentence(store, store_env, which, fragments):
    ids = [store["runs"].get(w, w) for w in which]
    with pytest.raises(ValueError) as caught:
        compare_runs(store_env, *ids, resamples=10)
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_unlabelled_runs_compare_their_neighbourhoods(store, store_env):
    c = compare_runs(store_env, store["runs"]["u1"], store["runs"]["u2"], metrics=False)
    assert len(c.agreement) == 30 and not c.has_metrics and c.per_class == []
    assert "no retrieval metrics" in comparison_text(c)


def run_cli(*args):
    from core.cli import main

    return main(["compare", *args])


def test_the_command_prints_the_figures(store, store_env, capsys):
    runs = store["runs"]
    assert run_cli("--runs", str(runs["a"]), str(runs["a2"])) == 0
    text = capsys.readouterr().out
    for fragment in ("neighbourhood agreement", "Precision@1", "MAP@R", "95% interval", "cat", "owl",
                     "settings that differ", "Margin m"):
        assert fragment in text, fragment
    assert run_cli("--runs", str(runs["a"]), str(runs["a2"]), "--k", "5", "--json") == 0
    document = json.loads(capsys.readouterr().out)
    expected = compare_runs(store_env, runs["a"], runs["a2"], k=5)
    assert document["k"] == 5 and document["mean_agreement"] == pytest.approx(expected.mean_agreement)
    assert document["overall"] == expected.overall
    assert [row["name"] for row in document["per_class"]] == ["cat", "dog", "owl"]


@pytest.mark.parametrize("args, fragment", [
    (["--runs", "1"], "two run ids"),
    (["--runs", "1", "x"], "'x'"),
    (["--runs", "1", "1"], "compared with itself"),
    (["--runs", "1", "424242"], "run 424242 does not exist"),
    (["--runs", "1", "2", "--k", "ten"], "--k must be a whole number"),
    (["--runs", "1", "2", "--k", "0"], "--k must be a whole number"),
])
def test_the_command_refuses_bad_input_in_one_line(store, store_env, capsys, args, fragment):
    assert run_cli(*args) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], captured.err
    assert captured.out == ""


def test_the_command_refuses_in_a_process_of_its_own(store):
    env = dict(os.environ, EMBEDDING_LAB_HOME=str(store["home"]))
    env.pop("EMBEDDING_LAB_DB", None)
    result = subprocess.run([sys.executable, "-m", "core", "compare", "--runs", "3", "three"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == ["error: a run is named by its id, a whole number; got 'three'"]
