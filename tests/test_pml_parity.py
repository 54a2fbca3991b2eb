"""Our losses and miners against pytorch-metric-learning (pml) on random float32 batches:
values, triplet counts and gradients.

pml is a test and benchmark dependency only. Its distances: LpDistance (normalize_embeddings
True by default) equals our euclidean distance on the L2-normalised embeddings our encoders give;
CosineSimilarity is a similarity, so its comparisons run the other way, but the triplet losses
agree because d_ap - d_an = s_an - s_ap for our cosine distance 1 - s. Gradients are taken with
respect to raw embeddings that both sides see through F.normalize (pml normalises again, which
changes nothing: the projection onto unit vectors is idempotent).

Known differences, tested as such: our contrastive loss squares both terms (DESIGN.md) and pml's
ContrastiveLoss has no squared hinge, so it is compared per pair (see below); pml's SupConLoss
returns 0 for a batch without any negative pair, while ours follows Khosla et al.'s formula there.
"""

import pytest
import torch
import torch.nn.functional as F

pml_distances = pytest.importorskip("pytorch_metric_learning.distances")
from pytorch_metric_learning import losses as pml_losses  # noqa: E402
from pytorch_metric_learning import miners as pml_miners  # noqa: E402
from pytorch_metric_learning import reducers as pml_reducers  # noqa: E402

from core.metric.losses import ContrastiveLoss, InfoNCELoss, SupConLoss, TripletLoss  # noqa: E402
from core.metric.distances import pairwise_distances  # noqa: E402
from core.metric.mining import batch_hard_triplets, range_triplet_loss  # noqa: E402

RELATIVE = 1e-5
KINDS = ["semi-hard", "hard", "all", "easy"]
# Triplets whose d_an - d_ap lies this close to 0 or to the margin may fall in another category
# on the two sides, which round the distances differently (cdist vs the Gram matrix).
TIE_WIDTH = {torch.float32: 1e-6, torch.float64: 1e-12}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def raw_batch(seed: int, size: int = 96, dim: int = 16, classes: int = 6, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randn(size, dim, generator=generator, dtype=dtype).requires_grad_()
    labels = torch.randint(classes, (size,), generator=generator)
    return raw, labels


def pml_distance(distance: str, power: int = 1):
    if distance == "cosine":
        return pml_distances.CosineSimilarity()
    return pml_distances.LpDistance(power=power)


def grad_of(loss, raw):
    (grad,) = torch.autograd.grad(loss, raw, retain_graph=True)  # x = normalize(raw) is shared
    return grad


def assert_close(ours, theirs, what):
    ours, theirs = float(ours.detach()), float(theirs.detach())
    assert abs(ours - theirs) <= RELATIVE * max(abs(theirs), 1e-12) or ours == theirs, (what, ours, theirs)


def assert_grads_close(ours, theirs):
    scale = theirs.abs().max().clamp_min(1e-12)
    assert (ours - theirs).abs().max() <= 1e-4 * scale


def ties(dist, labels, margin):
    """Valid triplets whose category could flip with rounding: d_an - d_ap near 0 or m."""
    width = TIE_WIDTH[dist.dtype]
    dist = dist.detach().double()
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(len(labels), dtype=torch.bool)
    valid = positive[:, :, None] & ~same[:, None, :]
    gap = dist[:, None, :] - dist[:, :, None]  # [a, p, n] = d_an - d_ap; fine at this size
    near = ((gap.abs() < width) | ((gap - margin).abs() < width)) & valid
    return int(near.sum())


def pml_triplet(x, labels, distance, margin, kind, power=1, smooth=False):
    """pml TripletMarginMiner + TripletMarginLoss; returns (loss, number of non-zero losses).
    pml's "all" miner keeps the triplets with d_an - d_ap <= m; every triplet has a non-zero
    soft-margin loss, so there our "all" is pml's loss without a miner (every triplet)."""
    miner = pml_miners.TripletMarginMiner(margin=margin, type_of_triplets=kind.replace("-", ""), distance=pml_distance(distance, power))
    indices = None if smooth and kind == "all" else miner(x, labels)

    def loss_fn(**reducer):
        margin_of_loss = 0 if smooth else margin
        distance_of_loss = pml_distance(distance, power)
        return pml_losses.TripletMarginLoss(margin_of_loss, smooth_loss=smooth, distance=distance_of_loss, **reducer)

    per_triplet = loss_fn(reducer=pml_reducers.DoNothingReducer())(x, labels, indices)["loss"]["losses"]
    if not torch.is_tensor(per_triplet) or per_triplet.numel() == 0:
        return x.sum() * 0, 0
    loss = loss_fn()(x, labels, indices)
    return loss, int((per_triplet > 0).sum())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("dtype, seed", [(torch.float32, 0), (torch.float32, 1), (torch.float64, 2)])
def test_range_triplet_loss_equals_pml_miner_and_loss(dtype, seed, distance, kind):
    raw, labels = raw_batch(seed, dtype=dtype)
    margin = 0.2 if distance == "euclidean" else 0.1
    x = F.normalize(raw, dim=1)
    dist = pairwise_distances(x, distance)
    ours, ours_count = range_triplet_loss(dist, labels, margin, kind)
    theirs, their_count = pml_triplet(x, labels, distance, margin, kind)
    assert kind == "easy" or their_count > 1000
    flips = ties(dist, labels, margin)
    assert abs(ours_count - their_count) <= flips
    if ours_count == their_count:
        assert_close(ours, theirs, kind)
        if kind != "easy":
            assert_grads_close(grad_of(ours, raw), grad_of(theirs, raw))
    else:
        # A triplet that changed category moves the mean by at most (its loss) / count.
        bound = flips * (2 + margin) / min(ours_count, their_count)
        assert abs(float(ours) - float(theirs)) <= bound


@pytest.mark.parametrize("kind", ["semi-hard", "hard", "all"])
def test_range_triplet_loss_equals_pml_on_class_balanced_batches(kind):
    # P = 32 classes x K = 4 images, as the training sampler draws them: 3 positives per anchor.
    raw, _ = raw_batch(7, size=128)
    labels = torch.arange(32).repeat_interleave(4)[torch.randperm(128, generator=torch.Generator().manual_seed(7))]
    x = F.normalize(raw, dim=1)
    dist = pairwise_distances(x)
    ours, ours_count = range_triplet_loss(dist, labels, 0.2, kind)
    theirs, their_count = pml_triplet(x, labels, "euclidean", 0.2, kind)
    assert ours_count == their_count > 100
    assert_close(ours, theirs, kind)
    assert_grads_close(grad_of(ours, raw), grad_of(theirs, raw))


@pytest.mark.parametrize("variant", ["squared", "soft-margin"])
@pytest.mark.parametrize("kind", KINDS)
def test_triplet_variants_equal_pml(kind, variant):
    # squared: pml LpDistance(power=2); soft-margin: pml's smooth_loss with margin 0 after a
    # TripletMarginMiner that uses the margin to draw the category.
    raw, labels = raw_batch(2, size=64)
    x = F.normalize(raw, dim=1)
    ours = TripletLoss(margin=0.3, miner=kind, variant=variant)(x, labels)
    if variant == "squared":
        theirs, _ = pml_triplet(x, labels, "euclidean", 0.3, kind, power=2)
    else:
        theirs, _ = pml_triplet(x, labels, "euclidean", 0.3, kind, smooth=True)
    assert_close(ours, theirs, (kind, variant))
    if theirs.requires_grad and float(theirs.detach()) > 0:
        assert_grads_close(grad_of(ours, raw), grad_of(theirs, raw))


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("seed", [0, 1])
def test_batch_hard_equals_pml_batch_hard_miner(seed, distance):
    raw, labels = raw_batch(seed)
    x = F.normalize(raw, dim=1)
    dist = pairwise_distances(x, distance).detach()
    a, p, n = batch_hard_triplets(dist, labels)
    their_a, their_p, their_n = pml_miners.BatchHardMiner(distance=pml_distance(distance))(x, labels)
    assert torch.equal(a, their_a)
    # Compare the distances picked, so an index tie could not fail the test.
    assert torch.allclose(dist[a, p], dist[their_a, their_p], atol=1e-6)
    assert torch.allclose(dist[a, n], dist[their_a, their_n], atol=1e-6)

    ours = TripletLoss(margin=0.2, distance=distance, miner="batch-hard")(x, labels)
    theirs = pml_losses.TripletMarginLoss(margin=0.2, distance=pml_distance(distance))(
        x, labels, (their_a, their_p, their_n)
    )
    assert_close(ours, theirs, "batch-hard")
    assert_grads_close(grad_of(ours, raw), grad_of(theirs, raw))


@pytest.mark.parametrize("miner", ["all-pairs", "hard-pairs"])
def test_contrastive_equals_pml_pair_losses_squared(miner):
    # pml's ContrastiveLoss(pos_margin=0, neg_margin=m) on LpDistance gives, per ordered pair,
    # D for a positive and max(0, m - D) for a negative; with power=2 its negative hinge would be
    # max(0, m - D²), not our max(0, m - D)². So we take pml's per-pair losses (DoNothingReducer)
    # on the pairs our miner keeps, square them and reduce as ours does (mean over positive pairs,
    # mean over non-zero negative ones). Ordered pairs count each unordered pair twice, which
    # leaves both means unchanged.
    raw, labels = raw_batch(3, size=48)
    x = F.normalize(raw, dim=1)
    ours_module = ContrastiveLoss(margin=0.9, miner=miner)
    ours = ours_module(x, labels)
    mined = ours_module.miner(pairwise_distances(x).detach(), labels)
    positive, negative = mined.similar, mined.dissimilar
    positive, negative = positive | positive.T, negative | negative.T
    pairs = (*torch.nonzero(positive, as_tuple=True), *torch.nonzero(negative, as_tuple=True))
    per_pair = pml_losses.ContrastiveLoss(
        pos_margin=0, neg_margin=0.9, distance=pml_distance("euclidean"), reducer=pml_reducers.DoNothingReducer()
    )(x, labels, pairs)
    positive_losses = per_pair["pos_loss"]["losses"].pow(2)
    negative_losses = per_pair["neg_loss"]["losses"].pow(2)
    theirs = positive_losses.mean() + negative_losses[negative_losses > 0].mean()
    assert_close(ours, theirs, miner)
    assert_grads_close(grad_of(ours, raw), grad_of(theirs, raw))
    # pml's own reduction of the same pairs with power=2 matches our positive term exactly.
    positive_term = pml_losses.ContrastiveLoss(pos_margin=0, neg_margin=0, distance=pml_distance("euclidean", 2))(
        x, labels, pairs
    )
    assert_close(positive_term, positive_losses.mean(), "positive term")


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_supcon_equals_pml_supcon(temperature):
    raw, labels = raw_batch(4, size=64, classes=20)  # some anchors have no positive
    ours = SupConLoss(temperature)(raw, labels)
    theirs = pml_losses.SupConLoss(temperature=temperature)(raw, labels)
    assert_close(ours, theirs, "supcon")
    assert_grads_close(grad_of(ours, raw), grad_of(theirs, raw))


def test_supcon_without_negatives_follows_the_paper_where_pml_returns_zero():
    raw, _ = raw_batch(5, size=16)
    one_label = torch.zeros(16, dtype=torch.long)
    assert float(pml_losses.SupConLoss(0.1)(raw, one_label).detach()) == 0
    assert float(SupConLoss(0.1)(raw, one_label).detach()) > 0


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_infonce_equals_pml_ntxent(temperature):
    raw, _ = raw_batch(6, size=64)
    views = torch.arange(32).repeat(2)  # rows i and i + 32 are the two views of image i
    ours = InfoNCELoss(temperature)(raw)
    theirs = pml_losses.NTXentLoss(temperature=temperature)(raw, views)
    assert_close(ours, theirs, "infonce")
    assert_grads_close(grad_of(ours, raw), grad_of(theirs, raw))
