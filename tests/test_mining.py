"""Mining against brute-force loops over every triplet of small batches (float64, so a
comparison like d_an <= d_ap + m is the same IEEE operation in the loop and in the code)."""

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from core.metric.losses import soft_margin_triplet_loss
from core.metric.losses import triplet as triplet_module
from core.metric.categories import CATEGORIES
from core.metric.distances import pairwise_distances
from core.metric.mining import (
    batch_hard_triplets,
    count_triplets,
    image_mining_counts,
    range_triplet_loss,
    sample_triplets,
    semi_hard_facenet_triplets,
    sort_rows,
)

KINDS_TO_CATEGORIES = {
    "semi-hard": {"semi-hard"},
    "hard": {"hard"},
    "easy": {"easy"},
    "all": set(CATEGORIES),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_batch(seed: int, size: int = 16, dim: int = 3, classes: int = 4):
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(size, dim, generator=generator, dtype=torch.float64)
    labels = torch.randint(classes, (size,), generator=generator)
    return embeddings, labels


def integer_distances(seed: int, size: int = 14, classes: int = 3):
    """Symmetric distances in {0, ..., 4}: full of exact ties with d_ap and d_ap + m."""
    generator = torch.Generator().manual_seed(seed)
    upper = torch.randint(5, (size, size), generator=generator).triu(diagonal=1)
    labels = torch.randint(classes, (size,), generator=generator)
    return (upper + upper.T).double(), labels


def distance_cases():
    """(dist, labels) pairs: real euclidean and cosine distances and tie-ridden integer ones."""
    cases = []
    for seed in range(2):
        embeddings, labels = random_batch(seed)
        cases.append((pairwise_distances(embeddings), labels))
        cases.append((pairwise_distances(embeddings, "cosine"), labels))
        cases.append(integer_distances(seed))
    return cases


def category(d_ap: float, d_an: float, margin: float) -> str:
    if d_an <= d_ap:
        return "hard"
    if d_an <= d_ap + margin:
        return "semi-hard"
    return "easy"


def all_triplets(labels):
    labels = labels.tolist()
    for a, label in enumerate(labels):
        for p, other in enumerate(labels):
            if p == a or other != label:
                continue
            for n, negative in enumerate(labels):
                if negative != label:
                    yield a, p, n


def loop_triplet_loss(dist, labels, margin, kind):
    """Loss of TripletMarginMiner(kind) + TripletMarginLoss (AvgNonZero), by listing triplets."""
    chosen, d = [], dist.tolist()
    for a, p, n in all_triplets(labels):
        d_ap, d_an = d[a][p], d[a][n]
        if category(d_ap, d_an, margin) in KINDS_TO_CATEGORIES[kind] and d_ap - d_an + margin > 0:
            chosen.append((a, p, n))
    if not chosen:
        return dist.sum() * 0, 0
    a, p, n = torch.tensor(chosen).T
    return (dist[a, p] - dist[a, n] + margin).mean(), len(chosen)


def loop_soft_margin_loss(dist, labels, margin, kind):
    """Mean of softplus(d_ap - d_an) over every triplet of the category, by listing them."""
    chosen, d = [], dist.tolist()
    for a, p, n in all_triplets(labels):
        if category(d[a][p], d[a][n], margin) in KINDS_TO_CATEGORIES[kind]:
            chosen.append((a, p, n))
    if not chosen:
        return dist.sum() * 0, 0
    a, p, n = torch.tensor(chosen).T
    return torch.nn.functional.softplus(dist[a, p] - dist[a, n]).mean(), len(chosen)


def test_euclidean_distances_match_cdist():
    embeddings, _ = random_batch(0)
    assert torch.allclose(pairwise_distances(embeddings), torch.cdist(embeddings, embeddings))
    assert torch.all(pairwise_distances(embeddings).diagonal() == 0)


def test_cosine_distances_are_one_minus_cosine_similarity():
    embeddings, _ = random_batch(1)
    expected = 1 - torch.nn.functional.cosine_similarity(
        embeddings[:, None, :], embeddings[None, :, :], dim=2
    )
    expected.fill_diagonal_(0)
    assert torch.allclose(pairwise_distances(embeddings, "cosine"), expected)


def test_unknown_distance_is_refused():
    with pytest.raises(ValueError, match="distance must be one of euclidean, cosine"):
        pairwise_distances(torch.zeros(3, 2), "manhattan")


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_distance_gradient_is_finite_for_identical_rows(distance):
    embeddings = torch.ones(5, 4, dtype=torch.float64).requires_grad_()
    dist = pairwise_distances(embeddings, distance)
    assert torch.all(dist == 0)
    dist.sum().backward()
    assert torch.isfinite(embeddings.grad).all()


@pytest.mark.parametrize("margin", [0.0, 0.2, 1.0, 2.0])
@pytest.mark.parametrize("case", range(6))
def test_count_triplets_matches_brute_force(case, margin):
    dist, labels = distance_cases()[case]
    expected, d = {name: 0 for name in CATEGORIES}, dist.tolist()
    for a, p, n in all_triplets(labels):
        expected[category(d[a][p], d[a][n], margin)] += 1
    counts = count_triplets(dist, labels, margin)
    assert (counts.easy, counts.semi_hard, counts.hard) == (
        expected["easy"],
        expected["semi-hard"],
        expected["hard"],
    )
    assert counts.total == sum(expected.values())


# Anchor at 0 and positive at 1 (label 0), one negative at x (label 1), margin 0.5: the two
# triplets (A, P, N) and (P, A, N) have d_ap = 1 and d_an = |x|, |x - 1|. Values are exact in
# binary, so x = -0.5 puts d(P, N) = 1.5 exactly on d_ap + m, and x = 0 puts d(P, N) on d_ap.
ONE_DIMENSIONAL = {
    # x: ((easy, semi-hard, hard), {kind: (loss, non-zero triplets)})
    -2.0: ((2, 0, 0), {"semi-hard": (0.0, 0), "hard": (0.0, 0), "all": (0.0, 0)}),
    -0.25: ((0, 1, 1), {"semi-hard": (0.25, 1), "hard": (1.25, 1), "all": (0.75, 2)}),
    -0.5: ((0, 1, 1), {"semi-hard": (0.0, 0), "hard": (1.0, 1), "all": (1.0, 1)}),
    0.0: ((0, 0, 2), {"semi-hard": (0.0, 0), "hard": (1.0, 2), "all": (1.0, 2)}),
    0.5: ((0, 0, 2), {"semi-hard": (0.0, 0), "hard": (1.0, 2), "all": (1.0, 2)}),
}


@pytest.mark.parametrize("x", sorted(ONE_DIMENSIONAL))
def test_hand_placed_points_fall_in_the_expected_categories(x):
    counts, losses = ONE_DIMENSIONAL[x]
    dist = pairwise_distances(torch.tensor([[0.0], [1.0], [x]], dtype=torch.float64))
    labels = torch.tensor([0, 0, 1])
    found = count_triplets(dist, labels, 0.5)
    assert (found.easy, found.semi_hard, found.hard) == counts
    for kind, (loss, nonzero) in losses.items():
        value, active = range_triplet_loss(dist, labels, 0.5, kind)
        assert (value.item(), active) == (loss, nonzero), kind
    sample = sample_triplets(dist, labels, 0.5, per_category=10)
    claimed = sorted(sample.category)
    assert claimed == sorted(["easy"] * counts[0] + ["semi-hard"] * counts[1] + ["hard"] * counts[2])


@pytest.mark.parametrize("kind", ["semi-hard", "hard", "all", "easy"])
@pytest.mark.parametrize("margin", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("case", range(6))
@pytest.mark.parametrize("ours,loop", [(range_triplet_loss, loop_triplet_loss),
                                       (soft_margin_triplet_loss, loop_soft_margin_loss)],
                         ids=["margin", "soft-margin"])
def test_category_losses_and_gradients_match_a_loop(ours, loop, case, margin, kind):
    # The integer cases put many d_an exactly on d_ap and d_ap + m: the categories must agree.
    dist, labels = distance_cases()[case]
    dist = dist.detach().requires_grad_()
    loss, active = ours(dist, labels, margin, kind)
    (grad,) = torch.autograd.grad(loss, dist)
    expected, expected_active = loop(dist, labels, margin, kind)
    (expected_grad,) = torch.autograd.grad(expected, dist)
    assert active == expected_active
    assert torch.allclose(loss, expected, atol=1e-12)
    assert torch.allclose(grad, expected_grad, atol=1e-12)


@pytest.mark.parametrize("kind", ["semi-hard", "all"])
def test_soft_margin_loss_in_small_blocks_is_the_same_and_stays_small(monkeypatch, kind):
    size, positives_at_most = 64, 16
    generator = torch.Generator().manual_seed(5)
    embeddings = torch.randn(size, 8, generator=generator, dtype=torch.float64).requires_grad_()
    labels = torch.arange(size) % 4  # 16 per label: 15 positives per anchor
    dist = pairwise_distances(embeddings)
    whole, _ = soft_margin_triplet_loss(dist, labels, 0.5, kind)
    (whole_grad,) = torch.autograd.grad(whole, embeddings, retain_graph=True)
    # Two anchors per block: a block holds 2 x 16 x 64 values, far below the B³ = 262k.
    monkeypatch.setattr(triplet_module, "SOFT_MARGIN_CHUNK_ELEMENTS", 2 * positives_at_most * size)
    with LargestStorage() as largest:
        blocked, _ = soft_margin_triplet_loss(dist, labels, 0.5, kind)
        (blocked_grad,) = torch.autograd.grad(blocked, embeddings)
    assert torch.allclose(whole, blocked, atol=1e-12)
    assert torch.allclose(whole_grad, blocked_grad, atol=1e-12)
    assert 0 < largest.bytes <= 8 * size * size


def test_range_triplet_loss_gradient_reaches_the_embeddings():
    embeddings, labels = random_batch(3)
    embeddings.requires_grad_()
    loss, _ = range_triplet_loss(pairwise_distances(embeddings), labels, 0.5, "all")
    (grad,) = torch.autograd.grad(loss, embeddings)
    expected, _ = loop_triplet_loss(torch.cdist(embeddings, embeddings), labels, 0.5, "all")
    (expected_grad,) = torch.autograd.grad(expected, embeddings)
    assert torch.allclose(grad, expected_grad, atol=1e-10)


@pytest.mark.parametrize("soft_margin", [False, True])
@pytest.mark.parametrize("kind", ["semi-hard", "hard", "all", "easy"])
def test_a_single_label_gives_a_zero_loss_with_a_gradient(kind, soft_margin):
    embeddings = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.zeros(8, dtype=torch.long)
    whole_category_loss = soft_margin_triplet_loss if soft_margin else range_triplet_loss
    loss, active = whole_category_loss(pairwise_distances(embeddings), labels, 0.2, kind)
    loss.backward()
    assert (loss.item(), active) == (0.0, 0)
    assert torch.all(embeddings.grad == 0)


def test_identical_embeddings_are_all_hard_with_finite_gradients():
    embeddings = torch.ones(6, 3, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    dist = pairwise_distances(embeddings)
    assert count_triplets(dist, labels, 0.2).hard == 6 * 4
    loss, active = range_triplet_loss(dist, labels, 0.2, "hard")
    loss.backward()
    assert active == 24 and loss.item() == pytest.approx(0.2)
    assert torch.isfinite(embeddings.grad).all()


@pytest.mark.parametrize("case", range(6))
def test_batch_hard_picks_the_farthest_positive_and_closest_negative(case):
    dist, labels = distance_cases()[case]
    expected, d = {}, dist.tolist()
    for a in range(len(labels)):
        positives = [d[a][p] for p in range(len(labels)) if p != a and labels[p] == labels[a]]
        negatives = [d[a][n] for n in range(len(labels)) if labels[n] != labels[a]]
        if positives and negatives:
            expected[a] = (max(positives), min(negatives))
    anchor, positive, negative = batch_hard_triplets(dist, labels)
    assert sorted(anchor.tolist()) == sorted(expected)
    for a, p, n in zip(anchor.tolist(), positive.tolist(), negative.tolist()):
        assert p != a and labels[p] == labels[a] and labels[n] != labels[a]
        assert (d[a][p], d[a][n]) == expected[a]


@pytest.mark.parametrize("margin", [0.0, 0.3, 1.0, 2.0])
@pytest.mark.parametrize("case", range(6))
def test_facenet_semi_hard_picks_the_closest_semi_hard_negative(case, margin):
    dist, labels = distance_cases()[case]
    expected, d = {}, dist.tolist()
    for a, p, n in all_triplets(labels):
        d_ap, d_an = d[a][p], d[a][n]
        if d_ap < d_an <= d_ap + margin:
            expected[a, p] = min(expected.get((a, p), float("inf")), d_an)
    anchor, positive, negative = semi_hard_facenet_triplets(dist, labels, margin)
    found = {}
    for a, p, n in zip(anchor.tolist(), positive.tolist(), negative.tolist()):
        assert labels[n] != labels[a]
        found[a, p] = d[a][n]
    assert found == expected


@pytest.mark.parametrize("per_category", [0, 1, 5, 1000])
@pytest.mark.parametrize("case", range(6))
def test_sample_triplets_claims_true_categories_and_respects_the_limit(case, per_category):
    dist, labels = distance_cases()[case]
    margin = 0.3 if case % 3 != 2 else 1.0
    pairs, d = {name: set() for name in CATEGORIES}, dist.tolist()
    for a, p, n in all_triplets(labels):
        pairs[category(d[a][p], d[a][n], margin)].add((a, p))
    sample = sample_triplets(dist, labels, margin, per_category, torch.Generator().manual_seed(0))
    assert len(sample.anchor) == len(sample.positive) == len(sample.negative) == len(sample.category)
    assert torch.equal(sample.d_ap, dist[sample.anchor, sample.positive])
    assert torch.equal(sample.d_an, dist[sample.anchor, sample.negative])
    seen = {name: set() for name in CATEGORIES}
    rows = zip(sample.anchor.tolist(), sample.positive.tolist(), sample.negative.tolist(), sample.category)
    for a, p, n, claimed in rows:
        assert a != p and labels[a] == labels[p] and labels[n] != labels[a]
        assert category(d[a][p], d[a][n], margin) == claimed
        seen[claimed].add((a, p))
    for name in CATEGORIES:
        # Distinct (a, p) pairs, as many as asked for or as exist.
        assert len(seen[name]) == sample.category.count(name) == min(per_category, len(pairs[name]))


def test_sample_triplets_is_reproducible_with_a_seeded_generator():
    dist, labels = distance_cases()[0]
    first = sample_triplets(dist, labels, 0.3, 4, torch.Generator().manual_seed(7))
    second = sample_triplets(dist, labels, 0.3, 4, torch.Generator().manual_seed(7))
    assert torch.equal(first.anchor, second.anchor) and torch.equal(first.negative, second.negative)


def test_bad_arguments_are_refused():
    dist, labels = distance_cases()[0]
    with pytest.raises(ValueError, match="kind must be one of semi-hard, hard, all, easy; got 'batch-hard'"):
        range_triplet_loss(dist, labels, 0.2, "batch-hard")
    with pytest.raises(ValueError, match="kind must be one of semi-hard, hard, all, easy"):
        soft_margin_triplet_loss(dist, labels, 0.2, "facenet")
    with pytest.raises(ValueError, match="margin must be >= 0"):
        soft_margin_triplet_loss(dist, labels, -1.0, "all")
    with pytest.raises(ValueError, match="margin must be >= 0"):
        count_triplets(dist, labels, -0.1)
    with pytest.raises(ValueError, match="labels must have shape"):
        count_triplets(dist, labels[:-1], 0.2)
    with pytest.raises(ValueError, match="square"):
        batch_hard_triplets(dist[:-1], labels)


class LargestStorage(TorchFunctionMode):
    """Records the largest storage any torch function returns. Exact and machine-independent,
    unlike running a big batch and hoping it would not fit. A backward pass only allocates
    shapes its forward made, so watching the forward calls is enough."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.bytes = max(self.bytes, leaf.untyped_storage().nbytes())
        return out


def test_no_step_allocates_a_cube_of_the_batch():
    # A B×B×B bool tensor alone is B³ bytes (2 MB here); every step must stay O(B²) (0.25 MB).
    size = 128
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(size, 32, generator=generator).requires_grad_()
    labels = torch.randint(10, (size,), generator=generator)
    with LargestStorage() as largest:
        dist = pairwise_distances(embeddings)
        for kind in ("semi-hard", "hard", "all", "easy"):
            loss, _ = range_triplet_loss(dist, labels, 0.2, kind)
            loss.backward(retain_graph=True)
        count_triplets(dist, labels, 0.2)
        sample_triplets(dist, labels, 0.2, 50)
        batch_hard_triplets(dist, labels)
        semi_hard_facenet_triplets(dist, labels, 0.2)
        image_mining_counts(dist, labels, 0.2, negative_uses=True)  # the tally's, from the same sort
    assert embeddings.grad is not None
    assert 0 < largest.bytes <= 16 * size * size


def test_the_storage_probe_sees_a_cube():
    dist = torch.rand(64, 64)
    with LargestStorage() as largest:
        (dist[:, :, None] < dist[:, None, :]).sum()
    assert largest.bytes >= 64**3


@pytest.mark.parametrize("size", [1, 7, 256])
def test_sort_rows_matches_torch_sort_and_breaks_ties_by_column(size):
    """The CPU float32 fast path (one packed int64 key per entry) gives torch.sort's values and an
    order that indexes them, with ties (0s, repeated values, +inf fill, -0.0, negatives) in column order."""
    generator = torch.Generator().manual_seed(size)
    matrix = torch.randint(-3, 4, (size, size), generator=generator).float() / 2  # many ties
    matrix[torch.rand(size, size, generator=generator) < 0.2] = float("inf")
    matrix[0, 0] = -0.0
    matrix[-1, -1] = -1e-30
    values, order = sort_rows(matrix)
    expected, _ = matrix.sort(dim=1)
    assert values.dtype == torch.float32 and order.dtype == torch.long
    assert torch.equal(values, expected)
    assert torch.equal(matrix.gather(1, order), values)
    assert all(sorted(row) == list(range(size)) for row in order.tolist())
    for row_values, row_order in zip(values.tolist(), order.tolist()):
        for j in range(size - 1):  # among equal values, columns ascend
            if row_values[j] == row_values[j + 1]:
                assert row_order[j] < row_order[j + 1]
    # float64 (the parity tests' precision) and empty rows take torch.sort unchanged
    as_double = matrix.double()
    assert torch.equal(sort_rows(as_double)[0], as_double.sort(dim=1)[0])
    assert sort_rows(torch.zeros(0, 0))[0].shape == (0, 0)
