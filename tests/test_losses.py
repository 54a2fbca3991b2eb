"""Each loss against a hand-written loop over its pairs or triplets, values and gradients
(float64, distances computed directly as norms of differences)."""

import math

import pytest
import torch
import torch.nn.functional as F

from core.metric import registry
from core.metric.losses import (
    ContrastiveLoss,
    InfoNCELoss,
    SupConLoss,
    TripletLoss,
    make_loss,
)

TRIPLET_MINERS = registry.objective("triplet").miners


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_batch(seed: int, size: int = 14, dim: int = 4, classes: int = 3, scale: float = 0.4):
    generator = torch.Generator().manual_seed(seed)
    embeddings = scale * torch.randn(size, dim, generator=generator, dtype=torch.float64)
    labels = torch.randint(classes, (size,), generator=generator)
    return embeddings.requires_grad_(), labels


def distance(x, i, j, kind):
    if kind == "cosine":
        return 1 - F.cosine_similarity(x[i], x[j], dim=0)
    return (x[i] - x[j]).norm()


def loop_distances(x, kind):
    """d[i][j] for every pair, one differentiable scalar each; 0 on the diagonal."""
    zero = torch.zeros((), dtype=x.dtype)
    return [[distance(x, i, j, kind) if i != j else zero for j in range(len(x))] for i in range(len(x))]


def mean_or_zero(terms):
    return torch.stack(terms).mean() if terms else torch.zeros((), dtype=torch.float64)


def loop_contrastive(x, labels, margin, kind, miner):
    size = len(labels)
    d = loop_distances(x, kind)
    value = [[d[i][j].item() for j in range(size)] for i in range(size)]
    same = [[labels[i] == labels[j] for j in range(size)] for i in range(size)]
    closest_negative = [
        min([value[i][n] for n in range(size) if not same[i][n]], default=math.inf) for i in range(size)
    ]
    farthest_positive = [
        max([value[i][p] for p in range(size) if p != i and same[i][p]], default=-math.inf)
        for i in range(size)
    ]

    positive, negative = [], []
    for i in range(size):
        for j in range(i + 1, size):
            dij = d[i][j]
            if same[i][j]:
                if miner == "all" or value[i][j] > min(closest_negative[i], closest_negative[j]):
                    positive.append(dij**2)  # Y = 0: a similar pair
            elif miner == "all" or value[i][j] < max(farthest_positive[i], farthest_positive[j]):
                loss = torch.clamp(margin - dij, min=0) ** 2  # Y = 1: a dissimilar pair
                if loss.item() > 0:
                    negative.append(loss)
    return mean_or_zero(positive) + mean_or_zero(negative)


def loop_selected(value, labels, margin, miner):
    """The (a, p, n) triplets a miner picks, from plain nested loops over the distances."""
    size = len(labels)
    positives = {a: [p for p in range(size) if p != a and labels[p] == labels[a]] for a in range(size)}
    negatives = {a: [n for n in range(size) if labels[n] != labels[a]] for a in range(size)}
    if miner == "batch-hard":
        return [
            (a, max(positives[a], key=lambda p: value[a][p]), min(negatives[a], key=lambda n: value[a][n]))
            for a in range(size)
            if positives[a] and negatives[a]
        ]
    chosen = []
    for a in range(size):
        for p in positives[a]:
            d_ap = value[a][p]
            in_category = {
                "all": lambda d_an: True,
                "hard": lambda d_an: d_an <= d_ap,
                "semi-hard": lambda d_an: d_ap < d_an <= d_ap + margin,
                "easy": lambda d_an: d_an > d_ap + margin,
                "facenet": lambda d_an: d_ap < d_an <= d_ap + margin,
            }[miner]
            found = [n for n in negatives[a] if in_category(value[a][n])]
            if miner == "facenet":
                found = [min(found, key=lambda n: value[a][n])] if found else []
            chosen += [(a, p, n) for n in found]
    return chosen


def loop_triplet(x, labels, margin, kind, miner, variant="standard"):
    """Triplet loss over the miner's triplets: mean of the non-zero losses."""
    power = 2 if variant == "squared" else 1
    d = [[dij**power for dij in row] for row in loop_distances(x, kind)]
    value = [[dij.item() for dij in row] for row in d]
    losses = []
    for a, p, n in loop_selected(value, labels, margin, miner):
        if variant == "soft-margin":
            losses.append(torch.log(1 + torch.exp(d[a][p] - d[a][n])))
        elif value[a][p] - value[a][n] + margin > 0:
            losses.append(d[a][p] - d[a][n] + margin)
    return mean_or_zero(losses)


def loop_infonce(x, temperature):
    size = len(x)
    total = 0
    for i in range(size):
        other = (i + size // 2) % size
        logits = {k: F.cosine_similarity(x[i], x[k], dim=0) / temperature for k in range(size) if k != i}
        total = total - torch.log(torch.exp(logits[other]) / sum(torch.exp(v) for v in logits.values()))
    return total / size


def loop_supcon(x, labels, temperature):
    size, per_anchor = len(x), []
    for i in range(size):
        logits = {k: F.cosine_similarity(x[i], x[k], dim=0) / temperature for k in range(size) if k != i}
        denominator = sum(torch.exp(v) for v in logits.values())
        positives = [k for k in logits if labels[k] == labels[i]]
        if positives:
            per_anchor.append(-sum(torch.log(torch.exp(logits[k]) / denominator) for k in positives) / len(positives))
    return mean_or_zero(per_anchor)


def assert_same_value_and_grad(loss_module, expected_fn, x, labels, **forward):
    value = loss_module(x, labels, **forward)
    (grad,) = torch.autograd.grad(value, x)
    expected = expected_fn()
    expected_grad = None
    if expected.requires_grad:  # an empty loop gives a constant zero
        (expected_grad,) = torch.autograd.grad(expected, x, allow_unused=True)
    expected_grad = torch.zeros_like(x) if expected_grad is None else expected_grad
    assert torch.allclose(value, expected, atol=1e-10), (value.item(), expected.item())
    assert torch.allclose(grad, expected_grad, atol=1e-9)


@pytest.mark.parametrize("miner", ["all", "hard"])
@pytest.mark.parametrize("kind", ["euclidean", "cosine"])
@pytest.mark.parametrize("seed", [0, 1])
def test_contrastive_matches_a_loop_over_pairs(seed, kind, miner):
    x, labels = random_batch(seed)
    margin = 0.5 if kind == "euclidean" else 0.3
    loss = ContrastiveLoss(margin=margin, distance=kind, miner=f"{miner}-pairs")
    assert_same_value_and_grad(loss, lambda: loop_contrastive(x, labels, margin, kind, miner), x, labels)


def test_contrastive_hard_miner_drops_well_ordered_pairs():
    # Two tight, far-apart classes: every positive is closer than every negative, nothing is hard.
    x = torch.tensor([[0.0], [0.1], [5.0], [5.1]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    assert ContrastiveLoss(margin=0.5, miner="hard-pairs")(x, labels).item() == 0
    assert ContrastiveLoss(margin=0.5, miner="all-pairs")(x, labels).item() == pytest.approx(0.01)


def test_contrastive_on_given_pairs_and_triplets():
    x, labels = random_batch(2)
    loss = ContrastiveLoss(margin=0.6)
    a1, p = torch.tensor([0, 1]), torch.tensor([2, 3])
    a2, n = torch.tensor([4, 5, 6]), torch.tensor([7, 8, 9])

    def expected():
        positive = [distance(x, i, j, "euclidean") ** 2 for i, j in zip(a1.tolist(), p.tolist())]
        negative = [
            torch.clamp(0.6 - distance(x, i, j, "euclidean"), min=0) ** 2
            for i, j in zip(a2.tolist(), n.tolist())
        ]
        return mean_or_zero(positive) + mean_or_zero([v for v in negative if v.item() > 0])

    assert_same_value_and_grad(loss, expected, x, labels, indices_tuple=(a1, p, a2, n))
    as_triplets = loss(x, labels, (a1, p, torch.tensor([7, 8])))
    as_pairs = loss(x, labels, (a1, p, a1, torch.tensor([7, 8])))
    assert torch.equal(as_triplets, as_pairs)


@pytest.mark.parametrize("miner", TRIPLET_MINERS)
@pytest.mark.parametrize("kind", ["euclidean", "cosine"])
@pytest.mark.parametrize("seed", [0, 1])
def test_triplet_matches_a_loop_over_triplets(seed, kind, miner):
    x, labels = random_batch(seed, size=12)
    margin = 0.2 if kind == "cosine" else 0.4
    loss = TripletLoss(margin=margin, distance=kind, miner=miner)
    assert_same_value_and_grad(loss, lambda: loop_triplet(x, labels, margin, kind, miner), x, labels)


@pytest.mark.parametrize("miner", TRIPLET_MINERS)
def test_squared_triplet_matches_a_loop(miner):
    x, labels = random_batch(3, size=12)
    loss = TripletLoss(margin=0.3, miner=miner, variant="squared")
    expected = lambda: loop_triplet(x, labels, 0.3, "euclidean", miner, "squared")  # noqa: E731
    assert_same_value_and_grad(loss, expected, x, labels)


@pytest.mark.parametrize("miner", TRIPLET_MINERS)
@pytest.mark.parametrize("kind", ["euclidean", "cosine"])
def test_soft_margin_triplet_matches_a_loop(kind, miner):
    # The margin only draws the categories here; the loss itself is log(1 + exp(d_ap - d_an)).
    x, labels = random_batch(6, size=12)
    margin = 0.2 if kind == "cosine" else 0.4
    loss = TripletLoss(margin=margin, distance=kind, miner=miner, variant="soft-margin")
    expected = lambda: loop_triplet(x, labels, margin, kind, miner, "soft-margin")  # noqa: E731
    assert_same_value_and_grad(loss, expected, x, labels)


def test_easy_triplets_give_zero_and_soft_margin_still_learns_from_them():
    x, labels = random_batch(7, size=12)
    assert TripletLoss(margin=0.2, miner="easy")(x, labels).item() == 0
    assert TripletLoss(margin=0.2, miner="easy", variant="soft-margin")(x, labels).item() > 0


def test_triplet_on_given_indices_averages_the_non_zero_losses():
    x, labels = random_batch(4)
    a, p, n = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7]), torch.tensor([8, 9, 10, 11])

    def expected():
        terms = [
            distance(x, i, j, "euclidean") - distance(x, i, k, "euclidean") + 0.3
            for i, j, k in zip(a.tolist(), p.tolist(), n.tolist())
        ]
        return mean_or_zero([t for t in terms if t.item() > 0])

    assert_same_value_and_grad(TripletLoss(margin=0.3), expected, x, None, indices_tuple=(a, p, n))
    empty = torch.tensor([], dtype=torch.long)
    for variant in ("standard", "soft-margin"):
        assert TripletLoss(variant=variant)(x, labels, (empty, empty, empty)).item() == 0


@pytest.mark.parametrize("temperature", [0.1, 0.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_supcon_matches_a_loop(seed, temperature):
    x, labels = random_batch(seed, size=10)
    labels[0] = 99  # an anchor without a positive is left out of the mean
    expected = lambda: loop_supcon(x, labels, temperature)  # noqa: E731
    assert_same_value_and_grad(SupConLoss(temperature), expected, x, labels)


def test_supcon_on_given_pairs_uses_only_those_pairs():
    x, labels = random_batch(8, size=6)
    a1, p = torch.tensor([0, 0, 3]), torch.tensor([1, 2, 4])
    a2, n = torch.tensor([0, 3]), torch.tensor([5, 0])

    def expected():
        def log_ratio(i, k, candidates):
            s = {j: torch.exp(F.cosine_similarity(x[i], x[j], dim=0) / 0.2) for j in candidates}
            return torch.log(s[k] / sum(s.values()))

        anchor_0 = -(log_ratio(0, 1, [1, 2, 5]) + log_ratio(0, 2, [1, 2, 5])) / 2
        anchor_3 = -log_ratio(3, 4, [4, 0])
        return (anchor_0 + anchor_3) / 2

    assert_same_value_and_grad(SupConLoss(0.2), expected, x, None, indices_tuple=(a1, p, a2, n))


def test_supcon_and_infonce_stay_within_b_squared_memory():
    from tests.test_mining import LargestStorage

    size = 128
    x = torch.randn(size, 32, requires_grad=True)
    labels = torch.arange(size) % 10
    with LargestStorage() as largest:
        (SupConLoss(0.1)(x, labels) + InfoNCELoss(0.1)(x)).backward()
    assert 0 < largest.bytes <= 8 * size * size  # a B×B×B bool would be 2 MB


def test_supcon_pulls_same_labels_together():
    labels = torch.tensor([0, 0, 1, 1])
    grouped = torch.tensor([[1.0, 0], [1, 0.1], [0, 1], [0.1, 1]])
    mixed = grouped[[0, 2, 1, 3]]
    assert SupConLoss(0.1)(grouped, labels).item() < SupConLoss(0.1)(mixed, labels).item()
    assert SupConLoss(0.1)(grouped, torch.arange(4)).item() == 0  # no anchor has a positive


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_infonce_matches_a_loop(temperature):
    x, _ = random_batch(5, size=10)
    assert_same_value_and_grad(InfoNCELoss(temperature), lambda: loop_infonce(x, temperature), x, None)


def test_infonce_ignores_labels_and_rewards_matching_views():
    views = torch.eye(4, dtype=torch.float64).repeat(2, 1)  # row i and i + 4 identical
    aligned = InfoNCELoss(0.1)(views, torch.arange(8))
    shuffled = InfoNCELoss(0.1)(views[[0, 1, 2, 3, 5, 6, 7, 4]], None)
    assert aligned.item() < 1e-3 < shuffled.item()


def test_infonce_refuses_an_odd_batch():
    with pytest.raises(ValueError, match="even batch"):
        InfoNCELoss()(torch.randn(5, 3))


@pytest.mark.parametrize(
    "build",
    [
        lambda: ContrastiveLoss(margin=0.5, miner="all-pairs"),
        lambda: ContrastiveLoss(margin=0.5, miner="hard-pairs"),
        lambda: TripletLoss(miner="semi-hard"),
        lambda: TripletLoss(miner="hard"),
        lambda: TripletLoss(miner="all"),
        lambda: TripletLoss(miner="easy"),
        lambda: TripletLoss(miner="batch-hard"),
        lambda: TripletLoss(miner="facenet"),
        lambda: TripletLoss(miner="all", variant="squared"),
        lambda: TripletLoss(miner="batch-hard", variant="squared"),
        lambda: TripletLoss(miner="all", variant="soft-margin"),
        lambda: TripletLoss(miner="semi-hard", variant="soft-margin"),
        lambda: TripletLoss(miner="batch-hard", variant="soft-margin"),
        lambda: SupConLoss(0.1),
    ],
)
@pytest.mark.parametrize("batch", ["single label", "identical embeddings", "distinct labels", "zero embeddings"])
def test_degenerate_batches_give_finite_losses_and_gradients(build, batch):
    if batch == "single label":
        x, labels = torch.randn(8, 3, requires_grad=True), torch.zeros(8, dtype=torch.long)
    elif batch == "identical embeddings":
        x, labels = torch.ones(8, 3, requires_grad=True), torch.arange(8) % 2
    elif batch == "distinct labels":
        x, labels = torch.randn(8, 3, requires_grad=True), torch.arange(8)
    else:
        x, labels = torch.zeros(8, 3, requires_grad=True), torch.arange(8) % 2
    loss = build()(x, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_infonce_on_identical_and_zero_embeddings_is_finite():
    for x in (torch.ones(6, 3, requires_grad=True), torch.zeros(6, 3, requires_grad=True)):
        loss = InfoNCELoss(0.1)(x, None)
        loss.backward()
        assert loss.item() == pytest.approx(math.log(5)) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: ContrastiveLoss(margin=0), "margin must be > 0, got 0"),
        (lambda: TripletLoss(margin=-0.1), "margin must be > 0, got -0.1"),
        (lambda: TripletLoss(margin=float("nan")), "margin must be > 0, got nan"),
        (lambda: InfoNCELoss(temperature=0), "temperature must be > 0, got 0"),
        (lambda: ContrastiveLoss(distance="l1"), "distance must be one of euclidean, cosine; got 'l1'"),
        (lambda: ContrastiveLoss(miner="semi-hard"), "miner must be one of all-pairs, hard-pairs; got 'semi-hard'"),
        (
            lambda: TripletLoss(miner="random"),
            "miner must be one of semi-hard, hard, all, easy, batch-hard, facenet; got 'random'",
        ),
        (lambda: TripletLoss(variant="smooth"), "variant must be one of standard, squared, soft-margin; got 'smooth'"),
        (lambda: TripletLoss(distance="cosine", variant="squared"), "the squared variant needs the euclidean distance"),
        (lambda: SupConLoss(temperature=-1), "temperature must be > 0, got -1"),
    ],
)
def test_bad_arguments_fail_in_init_with_a_sentence(build, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        build()


def test_make_loss_builds_each_loss_with_its_settings_and_miner_object():
    contrastive = make_loss("contrastive", "hard-pairs", 0.7, distance="cosine")
    assert isinstance(contrastive, ContrastiveLoss)
    assert (contrastive.margin, type(contrastive.miner).__name__, contrastive.distance) == (0.7, "HardPairsMiner", "cosine")
    triplet = make_loss("triplet", "all", 0.3)
    assert isinstance(triplet, TripletLoss) and (triplet.margin, triplet.miner.kind) == (0.3, "all")
    infonce = make_loss("infonce", temperature=0.2)
    assert isinstance(infonce, InfoNCELoss) and infonce.temperature == 0.2
    supcon = make_loss("supcon", "in-batch", temperature=0.05)
    assert isinstance(supcon, SupConLoss) and supcon.temperature == 0.05
    soft = make_loss("triplet", "batch-hard", 0.3, distance="cosine", triplet_variant="soft-margin")
    assert (soft.variant, type(soft.miner).__name__, soft.distance) == ("soft-margin", "BatchHardMiner", "cosine")
    # every objective's own defaults, from the registry, with the margin also on its miner
    assert make_loss("contrastive").margin == registry.objective("contrastive").setting("margin").default == 0.5
    assert make_loss("triplet").miner.margin == make_loss("triplet").margin == 0.2
    for name, spec in registry.objectives().items():
        assert spec.default_miner == spec.miners[0]
        for miner in spec.miners:
            make_loss(name, miner)
    for miner in TRIPLET_MINERS:
        for variant in ("standard", "squared", "soft-margin"):
            assert make_loss("triplet", miner, 0.2, 0.1, "euclidean", variant).variant == variant


def test_make_loss_refuses_what_does_not_apply():
    cases = [
        (("contrastive", "semi-hard"),
         "miner 'semi-hard' does not apply to the contrastive loss; choose one of: .*hard-pairs"),
        (("infonce", "hard"), "miner 'hard' does not apply to the infonce loss; choose one of: .*in-batch"),
        (("supcon", "semi-hard"), "miner 'semi-hard' does not apply to the supcon loss; choose one of: .*in-batch"),
        (("arcface", "all"), "loss must be one of: .*supcon.*; got 'arcface'$"),
    ]
    for (loss, miner), message in cases:
        with pytest.raises(ValueError, match=message):
            make_loss(loss, miner, 0.2, 0.1, "euclidean")
    with pytest.raises(ValueError, match="triplet_variant applies to the triplet loss, not supcon"):
        make_loss("supcon", "in-batch", 0.2, 0.1, "euclidean", triplet_variant="soft-margin")
    with pytest.raises(ValueError, match="temperature applies to the .*infonce.* loss, not triplet"):
        make_loss("triplet", temperature=0.5)
    message = "triplet_variant must be one of: standard, squared, soft-margin; got 'cube'"
    with pytest.raises(ValueError, match=message):
        make_loss("triplet", "all", 0.2, 0.1, "euclidean", triplet_variant="cube")
