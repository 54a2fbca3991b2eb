"""The triplet inspector shows what the run's miner returned and its loss used: each row is one of
the miner's picks, satisfies the miner's definition, and carries the loss the run's own loss
function gives that triplet (or pair, or anchor)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from core.metric import registry
from core.metric.losses import make_loss
from core.metric.distances import pairwise_distances, squared_euclidean_distances
from core.metric.mining import TripletSet

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRIPLET_MINERS = registry.objective("triplet").miners
VARIANTS = ("standard", "squared", "soft-margin")


def batch(seed: int, size: int = 30, classes: int = 3, dim: int = 4):
    generator = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(size, dim, generator=generator, dtype=torch.float64), dim=1)
    return x, torch.randint(classes, (size,), generator=generator)


def category(d_ap: float, d_an: float, margin: float) -> str:
    """DESIGN.md's definitions, written out."""
    if d_an <= d_ap:
        return "hard"
    return "semi-hard" if d_an <= d_ap + margin else "easy"


def mined_triplets(loss_fn, x, labels) -> set[tuple[int, int, int]]:
    """Every triplet the loss's miner returned on this batch, listed (small batches only)."""
    mined = loss_fn.miner(loss_fn.distances(x), labels)
    if isinstance(mined, TripletSet):
        return set(zip(*(t.tolist() for t in mined.indices())))
    return set(zip(mined.anchor.tolist(), mined.positive.tolist(), mined.negative.tolist()))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("miner", TRIPLET_MINERS)
@pytest.mark.parametrize("seed", [0, 1])
def test_triplet_rows_are_the_miner_s_picks_with_the_run_s_loss(miner, variant, seed):
    x, labels = batch(seed)
    margin = 0.3
    loss_fn = make_loss("triplet", miner, margin, triplet_variant=variant)
    rows = loss_fn.inspect(x, labels, per_category=5, generator=torch.Generator().manual_seed(seed))
    picks = mined_triplets(loss_fn, x, labels)
    dist = squared_euclidean_distances(x) if variant == "squared" else pairwise_distances(x)
    assert rows, "a random batch has triplets of every kind this miner returns"
    for row in rows:
        a, p, n = row["anchor"], row["positive"], row["negative"]
        assert (a, p, n) in picks  # returned by the run's miner on this batch
        assert labels[a] == labels[p] and a != p and labels[n] != labels[a]
        # the distances the loss compares: squared ones for the squared variant
        assert row["d_ap"] == pytest.approx(dist[a, p].item()) and row["d_an"] == pytest.approx(dist[a, n].item())
        assert row["category"] == category(row["d_ap"], row["d_an"], margin)
        if miner in ("semi-hard", "hard", "easy"):
            assert row["category"] == miner
        if miner == "facenet":
            assert row["category"] == "semi-hard"
        # its loss is the run's loss function on that one triplet
        one = loss_fn(x, labels, indices_tuple=(torch.tensor([a]), torch.tensor([p]), torch.tensor([n]))).item()
        assert row["loss"] == pytest.approx(one, abs=1e-9)
        if variant != "soft-margin" and miner != "easy":
            assert row["loss"] > 0  # only what the loss averaged over: non-zero hinges
    per_category = {}
    for row in rows:
        per_category[row["category"]] = per_category.get(row["category"], 0) + 1
    assert max(per_category.values()) <= 5  # a bounded sample, stratified by category


def test_batch_hard_rows_are_one_per_anchor_with_its_hardest_pair():
    x, labels = batch(3, size=40)
    loss_fn = make_loss("triplet", "batch-hard", 0.2)
    rows = loss_fn.inspect(x, labels, per_category=40)
    dist = pairwise_distances(x)
    anchors = [row["anchor"] for row in rows]
    assert len(anchors) == len(set(anchors))
    for row in rows:
        a = row["anchor"]
        same = labels == labels[a]
        same[a] = False
        assert row["d_ap"] == pytest.approx(dist[a][same].max().item())
        assert row["d_an"] == pytest.approx(dist[a][labels != labels[a]].min().item())


def test_whole_category_rows_come_from_exactly_the_set_the_loss_averaged_over():
    # a semi-hard triplet exactly at d_an = d_ap + m has a zero loss: the loss leaves it out, so
    # the inspector must never show it, however many rows it may show
    x = torch.tensor([[0.0], [0.5], [1.0], [0.9]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    loss_fn = make_loss("triplet", "semi-hard", 0.5, distance="euclidean")
    mined = loss_fn.miner(loss_fn.distances(x), labels)
    assert (0, 1, 2) in set(zip(*(t.tolist() for t in mined.indices())))  # semi-hard, at the boundary
    rows = loss_fn.inspect(x, labels, per_category=50)
    assert (0, 1, 2) not in {(r["anchor"], r["positive"], r["negative"]) for r in rows}
    used = {(r["anchor"], r["positive"], r["negative"]) for r in rows}
    assert used == set(zip(*(t.tolist() for t in mined.nonzero().indices())))


@pytest.mark.parametrize("miner", ["all-pairs", "hard-pairs"])
def test_contrastive_rows_are_the_miner_s_pairs_with_their_term(miner):
    x, labels = batch(4)
    loss_fn = make_loss("contrastive", miner, 0.8)
    rows = loss_fn.inspect(x, labels, per_category=6)
    pairs = loss_fn.miner(pairwise_distances(x), labels)
    dist = pairwise_distances(x)
    assert {r["category"] for r in rows} <= {"similar", "dissimilar"} and rows
    for row in rows:
        a = row["anchor"]
        if row["category"] == "similar":
            b, d = row["positive"], row["d_ap"]
            assert row["negative"] is None and row["d_an"] is None and pairs.similar[a, b]
            expected = d ** 2
        else:
            b, d = row["negative"], row["d_an"]
            assert row["positive"] is None and row["d_ap"] is None and pairs.dissimilar[a, b]
            expected = max(0.0, 0.8 - d) ** 2
            assert expected > 0  # the loss averages the dissimilar pairs with a non-zero term only
        assert d == pytest.approx(dist[a, b].item()) and row["loss"] == pytest.approx(expected)
        as_pair = (torch.tensor([a]), torch.tensor([b]), torch.tensor([a]), torch.tensor([b]))
        if row["category"] == "similar":  # ContrastiveLoss on that one pair alone gives its term
            assert loss_fn(x, labels, indices_tuple=as_pair[:2] + (torch.tensor([], dtype=torch.long),) * 2).item() \
                == pytest.approx(expected)


@pytest.mark.parametrize("loss", ["infonce", "supcon"])
def test_softmax_rows_are_an_anchor_s_hardest_negatives_with_their_weight(loss):
    x, labels = batch(5, size=24, classes=4)
    views = loss == "infonce"
    if views:
        labels = torch.arange(12).repeat(2)
    loss_fn = make_loss(loss, temperature=0.2)
    rows = loss_fn.inspect(x, labels, per_category=4, generator=torch.Generator().manual_seed(0))
    cosine = x @ x.T / 0.2
    cosine.fill_diagonal_(float("-inf"))
    probability = cosine.softmax(dim=1)
    log_probability = cosine.log_softmax(dim=1)
    anchors = {r["anchor"] for r in rows}
    assert 1 <= len(anchors) <= 4
    per_anchor_terms = []
    for a in range(len(x)):
        if views:
            positives = [(a + 12) % 24]
        else:
            positives = [j for j in range(len(x)) if j != a and labels[j] == labels[a]]
        per_anchor_terms.append(-sum(log_probability[a, j].item() for j in positives) / len(positives))
    # the anchors' terms are what the loss averages: their mean is the loss
    assert sum(per_anchor_terms) / len(x) == pytest.approx(loss_fn(x, labels).item())
    for row in rows:
        a, n = row["anchor"], row["negative"]
        assert labels[n] != labels[a]
        assert row["weight"] == pytest.approx(probability[a, n].item())
        assert row["loss"] == pytest.approx(per_anchor_terms[a])
        negatives = [j for j in range(len(x)) if j != a and labels[j] != labels[a]]
        top = sorted(negatives, key=lambda j: -probability[a, j].item())[:3]
        assert n in top  # the hardest in-batch negatives: the highest softmax weight
        assert row["d_an"] == pytest.approx(1 - (x[a] @ x[n]).item())


def test_the_cli_prints_a_run_s_inspected_rows_as_json_lines(tmp_path):
    from tests.test_cli import core, last_json

    home = tmp_path / "lab"
    trained = last_json(core("train", "--dataset", "digits", "--loss", "triplet", "--epochs", "2", "--batch-size", "128",
                             "--miner", "batch-hard", "--margin", "0.3", "--no-projection", home=home))
    run_id = trained["run_id"]
    lines = core("triplets", "--run", str(run_id), home=home).stdout.strip().splitlines()
    rows = [json.loads(line) for line in lines]
    assert rows and {r["epoch"] for r in rows} == {2}  # the last epoch unless asked
    first = [json.loads(line) for line in core("triplets", "--run", str(run_id), "--epoch", "1",
                                               home=home).stdout.splitlines()]
    assert first and {r["epoch"] for r in first} == {1}
    for row in rows + first:
        assert set(row) == {"epoch", "anchor", "positive", "negative", "d_ap", "d_an", "margin", "category", "loss",
                            "weight", "from_memory"}
        assert row["from_memory"] is None  # a run without a cross-batch memory
        assert row["margin"] == 0.3 and row["category"] == category(row["d_ap"], row["d_an"], 0.3)
        assert row["loss"] == pytest.approx(max(0.0, row["d_ap"] - row["d_an"] + 0.3), abs=1e-6) and row["loss"] > 0
        assert all(isinstance(row[k], int) and row[k] >= 0 for k in ("anchor", "positive", "negative"))
    assert len({r["anchor"] for r in rows}) == len(rows)  # batch-hard: one triplet per anchor
    for args, message in ((("--run", "999"), "there is no run 999"),
                          (("--run", str(run_id), "--epoch", "7"), "has no epoch 7; its stored epochs are 1 to 2")):
        failed = core("triplets", *args, home=home, check=False)
        assert failed.returncode == 2 and message in failed.stderr and "Traceback" not in failed.stderr
        assert len(failed.stderr.strip().splitlines()) == 1
    assert not math.isnan(rows[0]["d_ap"])
