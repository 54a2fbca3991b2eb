"""Per-image mining counts: equal to a loop over every triplet, summed over an epoch's batches,
stored per epoch by a training run, and shown on the map, in the parquet export and the
Triplets page's gallery of the most mined negatives."""
import itertools

import numpy as np
import pytest
import torch

from core.metric.distances import pairwise_distances
from core.metric.mining import count_triplets, image_mining_counts
from core.training.tally import MiningTally


def brute_force(dist: torch.Tensor, labels: torch.Tensor, margin: float):
    """Loop over every (a, p, n): per-image (hard negative, semi-hard negative, violated anchor)
    uses, (easy, semi-hard, hard) totals, and [a, n] hard-or-semi-hard uses."""
    size = len(labels)
    per_image = np.zeros((size, 3), dtype=np.int64)
    uses = np.zeros((size, size), dtype=np.int64)
    totals = {"easy": 0, "semi_hard": 0, "hard": 0}
    for a, p, n in itertools.product(range(size), repeat=3):
        if a == p or labels[a] != labels[p] or labels[n] == labels[a]:
            continue
        d_ap, d_an = dist[a, p], dist[a, n]  # tensors: the same float arithmetic as the ranges
        if d_an <= d_ap:
            per_image[n, 0] += 1
            totals["hard"] += 1
            uses[a, n] += 1
        elif d_an <= d_ap + margin:
            per_image[n, 1] += 1
            totals["semi_hard"] += 1
            uses[a, n] += 1
        else:
            totals["easy"] += 1
        if d_an < d_ap + margin:
            per_image[a, 2] += 1
    return per_image, totals, uses


def random_batch(generator: torch.Generator, size: int, classes: int, ties: bool):
    labels = torch.randint(0, classes, (size,), generator=generator)
    if ties:  # a few distinct values: d_an = d_ap and d_an = d_ap + m happen often
        dist = torch.randint(0, 5, (size, size), generator=generator).float() * 0.25
        dist = (dist + dist.T) / 2
        dist.fill_diagonal_(0)
    else:
        dist = pairwise_distances(torch.randn(size, 4, generator=generator))
    return dist, labels


@pytest.mark.parametrize("ties", [True, False])
def test_image_counts_equal_a_loop_over_every_triplet(ties):
    generator = torch.Generator().manual_seed(7 if ties else 8)
    checked = 0
    for trial in range(120):
        size = int(torch.randint(0, 11, (), generator=generator))
        classes = int(torch.randint(1, 6, (), generator=generator))  # many classes: some of one image
        margin = [0.0, 0.25, 0.5, 1.3][trial % 4]
        dist, labels = random_batch(generator, size, classes, ties)
        got = image_mining_counts(dist, labels, margin, negative_uses=True)
        per_image, totals, uses = brute_force(dist, labels, margin)
        np.testing.assert_array_equal(got.per_image.numpy(), per_image)
        np.testing.assert_array_equal(got.negative_uses.numpy(), uses)
        assert (got.batch.easy, got.batch.semi_hard, got.batch.hard) == (totals["easy"], totals["semi_hard"], totals["hard"])
        counted = count_triplets(dist, labels, margin)
        assert (counted.easy, counted.semi_hard, counted.hard) == (totals["easy"], totals["semi_hard"], totals["hard"])
        checked += totals["hard"] + totals["semi_hard"]
    assert checked > 1000  # the batches did hold hard and semi-hard triplets to count


def test_two_images_and_singleton_classes():
    dist = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    same = image_mining_counts(dist, torch.tensor([3, 3]), 0.5)  # a positive, no negative
    other = image_mining_counts(dist, torch.tensor([1, 2]), 0.5)  # a negative, no positive
    for result in (same, other):
        assert result.per_image.tolist() == [[0, 0, 0], [0, 0, 0]] and result.batch.total == 0
    # one anchor pair (0, 1) at distance 1 and the lone negative 2 at distance 1: a tie, hard
    dist = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 3.0], [1.0, 3.0, 0.0]])
    result = image_mining_counts(dist, torch.tensor([0, 0, 1]), 0.5)
    assert result.per_image.tolist() == [[0, 0, 1], [0, 0, 0], [1, 0, 0]]  # (1, 0, 2) is easy: 3 > 1 + 0.5


def test_tally_sums_batches_with_repeated_positions(monkeypatch):
    import core.training.tally

    rng = np.random.default_rng(3)
    generator = torch.Generator().manual_seed(3)
    n_images, n_classes = 12, 4
    image_classes = rng.integers(0, n_classes, n_images)
    batches = []
    for _ in range(15):
        half = rng.integers(0, n_images, 5)
        positions = np.concatenate([half, half])  # two views of each image, as self-supervised runs do
        dist, _ = random_batch(generator, 10, 2, ties=True)
        batches.append((positions, dist, torch.arange(5).repeat(2)))
    expected = np.zeros((n_images, 3), dtype=np.int64)
    by_class = np.zeros((n_images, n_classes), dtype=np.int64)
    for positions, dist, labels in batches:
        per_image, _, uses = brute_force(dist, labels, 0.25)
        for row in range(len(positions)):
            expected[positions[row]] += per_image[row]
            for anchor in range(len(positions)):
                by_class[positions[row], image_classes[positions[anchor]]] += uses[anchor, row]
    for dense in (True, False):  # the dense class table and the sparse triples agree
        monkeypatch.setattr(core.training.tally, "DENSE_CELLS", 10**9 if dense else 0)
        tally = MiningTally(n_images, image_classes, n_classes)
        assert tally.dense == dense
        hard = 0
        for positions, dist, labels in batches:
            hard += tally.add(positions, dist, labels, 0.25).hard
        np.testing.assert_array_equal(tally.counts, expected)
        assert tally.counts[:, 0].sum() == hard
        table = tally.negative_classes(top=5)
        assert len(table.positions) == 5
        for position in table.positions:
            assert dict(table.of(int(position))) == {c: int(v) for c, v in enumerate(by_class[position]) if v}
        rest = np.setdiff1d(np.arange(n_images), table.positions)
        weakest = min((tuple(expected[p, :2]) for p in table.positions))
        assert all(tuple(expected[p, :2]) <= weakest for p in rest)  # the top ones are the most used
    tally.reset()
    assert tally.counts.sum() == 0 and tally.negative_classes().positions.size == 0
    with pytest.raises(ValueError, match="positions"):
        tally.add(np.array([0, n_images]), batches[0][1][:2, :2], torch.tensor([0, 1]), 0.25)


# ---------------------------------------------------------------- a training run end to end


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from tests.helpers import digits_store

    yield from digits_store(tmp_path_factory, epochs=1)


def dataset_split(engine, run_id):
    from storage.db import transaction
    from storage.queries import dataset_image_table
    from storage.schema import Run

    with transaction(engine) as session:
        rows = dataset_image_table(session, session.get(Run, run_id).dataset_id)
    return np.array([image.split for image in rows]), [image.label for image in rows]


def test_a_training_run_stores_counts_that_match_its_epoch_totals(store):
    from sqlalchemy import select

    from core.training.tally_files import load_mining_counts, load_negative_classes, mining_epochs, most_mined
    from storage import artifacts
    from storage.db import transaction
    from storage.schema import EpochRow

    engine, run_id = store
    assert mining_epochs(run_id) == [1]
    stored = np.load(artifacts.absolute(f"runs/{run_id}/mining/epoch-1.npy"))
    assert stored.dtype == np.uint32
    counts = load_mining_counts(run_id, 1)
    with transaction(engine) as session:
        row = session.scalars(select(EpochRow).where(EpochRow.run_id == run_id, EpochRow.epoch == 1)).one()
        hard, semi_hard = row.hard, row.semi_hard
    # each hard (semi-hard) triplet has exactly one negative: the tally and the loop's counts agree
    assert counts[:, 0].sum() == hard > 0
    assert counts[:, 1].sum() == semi_hard > 0
    assert hard <= counts[:, 2].sum() <= hard + semi_hard  # violated: hard with d_an < d_ap, and semi-hard
    split, labels = dataset_split(engine, run_id)
    assert counts[split != "train"].sum() == 0  # the test images were never in a batch
    np.testing.assert_array_equal(load_mining_counts(run_id), counts)  # one epoch: the total is it
    assert load_mining_counts(run_id, 2) is None

    rows = most_mined(run_id, 1, top=10)
    table = load_negative_classes(run_id, 1)
    assert len(rows) == 10
    assert [(r["hard_negative"], r["semi_hard_negative"]) for r in rows] == \
        sorted(((r["hard_negative"], r["semi_hard_negative"]) for r in rows), reverse=True)
    assert rows[0]["hard_negative"] == counts[:, 0].max()
    for r in rows:
        assert sum(n for _, n in r["confused_with"]) == r["hard_negative"] + r["semi_hard_negative"]
        assert labels[r["position"]] not in [c for c, _ in table.of(r["position"])]  # anchors of other classes


def test_map_colours_by_the_counts(store):
    from core.explore.service import map_payload, run_embeddings
    from core.explore.map_files import MINING_COLOURINGS
    from core.explore.projection import project_pca
    from core.training.tally_files import load_mining_counts

    engine, run_id = store
    counts = load_mining_counts(run_id)
    split, _ = dataset_split(engine, run_id)
    coords = project_pca(run_embeddings(engine, run_id))
    for column, name in enumerate(MINING_COLOURINGS):
        legend = map_payload(engine, run_id, "pca", coords, name)["legend"]
        by_name = {entry["name"]: entry["count"] for entry in legend}
        trained = counts[split == "train", column]
        assert by_name["not a training image"] == (split != "train").sum()
        assert by_name["0"] == (trained == 0).sum()
        assert sum(by_name.values()) == len(counts)
        assert 2 <= len(legend) - 2 <= 6  # a handful of bins of the used images
        for entry in legend[1:-1]:  # "3–5": exactly the trained images with counts in that range
            low, _, high = entry["name"].partition("–")
            inside = (trained >= int(low)) & (trained <= int(high or low))
            assert entry["count"] == inside.sum() > 0


def test_parquet_export_has_the_counts(store, tmp_path):
    import pyarrow.parquet as pq

    from core.explore.export import MINING_COLUMNS, export_run
    from core.training.tally_files import load_mining_counts

    engine, run_id = store
    table = pq.read_table(export_run(engine, run_id, "parquet", tmp_path / "run.parquet"))
    counts = load_mining_counts(run_id)
    positions = table.column("position").to_numpy()
    for column, name in enumerate(MINING_COLUMNS):
        np.testing.assert_array_equal(table.column(name).to_numpy(), counts[positions, column])


def test_triplets_gallery_shows_the_most_mined_negatives(store):
    from streamlit.testing.v1 import AppTest

    engine, run_id = store

    def script(run_id):
        from core.explore.service import dataset_pixels
        from pages.common import engine
        from pages.triplets_views import most_mined_negatives
        from storage.db import transaction
        from storage.queries import dataset_image_table
        from storage.schema import Run

        with transaction(engine()) as session:
            run = session.get(Run, run_id)
            classes = list(run.dataset.classes)
            labels = [image.label for image in dataset_image_table(session, run.dataset_id)]
        pixels = dataset_pixels(engine(), run.dataset_id)
        labels_of = lambda positions: {p: labels[p] for p in positions}  # noqa: E731 (what the page reads)
        most_mined_negatives(run_id, 1, pixels, labels_of, classes, top=6)
        most_mined_negatives(run_id, 5, pixels, labels_of, classes, top=6)

    at = AppTest.from_function(script, args=(run_id,), default_timeout=60)
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    from core.training.tally_files import most_mined

    expected = most_mined(run_id, 1, top=6)
    captions = at.get("image")[0].proto.imgs
    assert [c.caption.split(" · ")[0] for c in captions] == [f"#{r['position']}" for r in expected]
    assert all("hard ×" in c.caption and " vs " in c.caption for c in captions)
    assert "No mining counts stored for epoch 5" in at.info[0].value


def test_deleting_a_run_removes_its_counts(store, tmp_path):
    from core.runs.jobs import delete_run
    from core.training.tally_files import mining_epochs, move_into_place, stage_epoch
    from tests.helpers import clustered_run

    engine, run_id = store
    other = clustered_run(engine, 40, umap=False)["run_id"]  # an embed run: no counts of its own
    assert mining_epochs(other) == []
    move_into_place(stage_epoch(tmp_path, other, 3, np.ones((40, 3), dtype=np.int64), None))
    assert mining_epochs(other) == [3]
    delete_run(engine, other)
    assert mining_epochs(other) == [] and mining_epochs(run_id) == [1]


def test_resuming_removes_the_counts_of_the_epochs_trained_again(lab_home, tmp_path):
    from core.training.tally_files import load_mining_counts, mining_epochs, move_into_place, remove_epochs_after, stage_epoch

    for epoch in (1, 2, 3):
        move_into_place(stage_epoch(tmp_path, 9, epoch, np.full((4, 3), epoch), None))
    assert mining_epochs(9) == [1, 2, 3]
    assert load_mining_counts(9).tolist() == [[6, 6, 6]] * 4
    remove_epochs_after(9, 1)
    assert mining_epochs(9) == [1] and load_mining_counts(9).tolist() == [[1, 1, 1]] * 4
