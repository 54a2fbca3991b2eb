"""The cross-batch memory (core.metric.memory; issue 19, point 3): its ring fills and wraps as
pytorch-metric-learning's CrossBatchMemory's does, a training step's one route against it equals
pml's CrossBatchMemory(loss, miner) over a seeded sequence of batches (value and gradient), the
queries × references MiningBatch agrees with the square one where both apply, and a digits run
trains with --memory-size from the command line."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.metric.losses import ContrastiveLoss, TripletLoss
from core.metric.memory import CrossBatchMemory
from core.metric.miners import AllPairsMiner, BatchHardMiner, CategoryMiner, FaceNetMiner, build_miner
from core.metric.mining import MiningBatch, batch_image_counts, set_triplet_loss
from core.metric.distances import pairwise_distances
from core.training.config import RunConfig
from core.training.loop import TrainingStep

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
from pytorch_metric_learning import distances as pml_distances  # noqa: E402
from pytorch_metric_learning import miners as pml_miners  # noqa: E402
from pytorch_metric_learning import reducers as pml_reducers  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DIM, MEMORY, BATCH, STEPS = 16, 80, 32, 7  # the ring is full after 3 batches and wraps mid-batch
TOLERANCE = 1e-12  # float64: both sides sum the same terms in another order (cdist vs the Gram form)


def batches(seed: int, classes: int = 6):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(STEPS):
        raw = torch.randn(BATCH, DIM, generator=generator, dtype=torch.float64).requires_grad_()
        yield raw, torch.randint(classes, (BATCH,), generator=generator)


def step_of(loss_fn, miner) -> TrainingStep:
    """A TrainingStep for its route alone (mined_loss): the model and optimizer are never used."""
    model = torch.nn.Linear(1, 1)
    return TrainingStep(model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.1), torch.device("cpu"),
                        miner=miner, margin=miner.margin)


def pml_distance(distance: str):
    return pml_distances.CosineSimilarity() if distance == "cosine" else pml_distances.LpDistance()


def test_the_ring_fills_and_wraps_as_pml_fills_it():
    theirs = pml_losses.CrossBatchMemory(pml_losses.ContrastiveLoss(), DIM, memory_size=MEMORY)
    ours = CrossBatchMemory(MEMORY, DIM, dtype=torch.float64)
    for raw, labels in batches(0):
        x = F.normalize(raw, dim=1)
        references = ours.enqueue(x, labels)
        theirs(x, labels)
        assert (ours.queue_idx, ours.filled) == (theirs.queue_idx, theirs.has_been_filled)
        assert torch.equal(references.own, theirs.curr_batch_idx)
        used = MEMORY if theirs.has_been_filled else theirs.queue_idx
        assert torch.equal(references.embeddings, theirs.embedding_memory[:used])
        assert torch.equal(references.labels, theirs.label_memory[:used])
        assert references.embeddings.requires_grad is False
        # a query's own copy is in the references, at its own column; the rest came from memory
        assert torch.equal(references.embeddings[references.own], x.detach())
        assert int(references.fresh.sum()) == BATCH and references.fresh[references.own].all()
    assert ours.filled and len(ours) == MEMORY
    with pytest.raises(ValueError, match="at least the batch size"):
        CrossBatchMemory(16, DIM).enqueue(torch.zeros(17, DIM), torch.zeros(17, dtype=torch.long))


def worst(differences: list[float]) -> float:
    return max(differences) if differences else 0.0


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("kind", ["semi-hard", "hard", "all"])
def test_triplet_loss_against_memory_equals_pml_cross_batch_memory(kind, distance, record_property):
    margin = 0.2 if distance == "euclidean" else 0.1
    theirs_fn = pml_losses.CrossBatchMemory(
        pml_losses.TripletMarginLoss(margin, distance=pml_distance(distance)), DIM, memory_size=MEMORY,
        miner=pml_miners.TripletMarginMiner(margin, type_of_triplets=kind.replace("-", ""),
                                            distance=pml_distance(distance)))
    step = step_of(TripletLoss(margin, distance=distance, miner=kind), build_miner(kind, margin, memory_size=MEMORY))
    values, grads, used = [], [], 0
    for raw, labels in batches(1):
        x = F.normalize(raw, dim=1)
        ours, batch, mined, references = step.mined_loss(x, labels)
        theirs = theirs_fn(x, labels)
        assert not batch.square and batch.dist.shape == (BATCH, len(references.labels))
        values.append(abs(float(ours) - float(theirs)))
        (our_grad,) = torch.autograd.grad(ours, raw, retain_graph=True)
        (their_grad,) = torch.autograd.grad(theirs, raw)
        grads.append(float((our_grad - their_grad).abs().max()))
        used += len(mined.nonzero())
    record_property("max_abs_loss_difference", worst(values))
    record_property("max_abs_grad_difference", worst(grads))
    print(f"xbm triplet {kind} {distance}: loss {worst(values):.2e}, grad {worst(grads):.2e}")
    assert used > 1000  # the comparison saw many triplets
    assert worst(values) <= TOLERANCE and worst(grads) <= TOLERANCE


def test_semi_hard_triplets_against_memory_are_pmls_triplets():
    # the same (anchor, positive, negative) set, not only the same mean
    margin = 0.2
    miner = pml_miners.TripletMarginMiner(margin, type_of_triplets="semihard")
    theirs_fn = pml_losses.CrossBatchMemory(pml_losses.TripletMarginLoss(margin), DIM, memory_size=MEMORY, miner=miner)
    step = step_of(TripletLoss(margin), build_miner("semi-hard", margin, memory_size=MEMORY))
    captured = []
    original = theirs_fn.loss.forward
    theirs_fn.loss.forward = lambda e, l, indices, *refs: captured.append(indices) or original(e, l, indices, *refs)
    for raw, labels in batches(2):
        x = F.normalize(raw, dim=1).detach()
        _, _, mined, _ = step.mined_loss(x, labels)
        theirs_fn(x, labels)
        a, p, n = mined.indices()
        ours = sorted(zip(a.tolist(), p.tolist(), n.tolist()))
        assert ours == sorted(zip(*(t.tolist() for t in captured[-1])))


def test_contrastive_loss_against_memory_equals_pml_cross_batch_memory(record_property):
    # pml's ContrastiveLoss has no squared hinge (tests/test_pml_parity.py): take its per-pair
    # losses over the memory's pairs, square them and reduce as ours does.
    margin = 0.9
    theirs_fn = pml_losses.CrossBatchMemory(
        pml_losses.ContrastiveLoss(pos_margin=0, neg_margin=margin, reducer=pml_reducers.DoNothingReducer()),
        DIM, memory_size=MEMORY)
    step = step_of(ContrastiveLoss(margin), build_miner("all-pairs", margin, memory_size=MEMORY))
    values, grads = [], []
    for raw, labels in batches(3):
        x = F.normalize(raw, dim=1)
        ours, batch, mined, _ = step.mined_loss(x, labels)
        per_pair = theirs_fn(x, labels)
        positive, negative = per_pair["pos_loss"]["losses"].pow(2), per_pair["neg_loss"]["losses"].pow(2)
        theirs = positive.mean() + negative[negative > 0].mean()
        assert int(mined.similar.sum()) == len(positive) and int(mined.dissimilar.sum()) == len(negative)
        values.append(abs(float(ours) - float(theirs)))
        (our_grad,) = torch.autograd.grad(ours, raw, retain_graph=True)
        (their_grad,) = torch.autograd.grad(theirs, raw)
        grads.append(float((our_grad - their_grad).abs().max()))
    record_property("max_abs_loss_difference", worst(values))
    record_property("max_abs_grad_difference", worst(grads))
    print(f"xbm contrastive: loss {worst(values):.2e}, grad {worst(grads):.2e}")
    assert worst(values) <= TOLERANCE and worst(grads) <= TOLERANCE


def test_batch_hard_against_memory_equals_pml_batch_hard_miner():
    theirs_fn = pml_losses.CrossBatchMemory(pml_losses.TripletMarginLoss(0.2), DIM, memory_size=MEMORY,
                                            miner=pml_miners.BatchHardMiner())
    step = step_of(TripletLoss(0.2, miner="batch-hard"), BatchHardMiner(0.2, memory_size=MEMORY))
    for raw, labels in batches(4):
        x = F.normalize(raw, dim=1)
        ours, *_ = step.mined_loss(x, labels)
        theirs = theirs_fn(x, labels)
        assert abs(float(ours) - float(theirs)) <= TOLERANCE
        (our_grad,) = torch.autograd.grad(ours, raw, retain_graph=True)
        (their_grad,) = torch.autograd.grad(theirs, raw)
        assert float((our_grad - their_grad).abs().max()) <= TOLERANCE


@pytest.mark.parametrize("seed", [0, 1])
def test_references_that_are_the_batch_itself_read_as_the_square_batch(seed):
    # the square batch is the case references = queries, own = the diagonal: both code paths
    # give the same triplets, loss, counts and per-image tally
    generator = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(48, 8, generator=generator, dtype=torch.float64), dim=1).requires_grad_()
    labels = torch.randint(5, (48,), generator=generator)
    dist = pairwise_distances(x)
    square = MiningBatch(dist, labels, 0.3)
    crossed = MiningBatch(dist, labels, 0.3, labels, torch.arange(48))
    assert square.square and not crossed.square
    for kind in ("semi-hard", "hard", "all", "easy"):
        ours, theirs = crossed.triplet_set(kind), square.triplet_set(kind)
        assert sorted(zip(*(t.tolist() for t in ours.indices()))) == sorted(zip(*(t.tolist() for t in theirs.indices())))
        loss_crossed, count_crossed = set_triplet_loss(dist, ours)
        loss_square, count_square = set_triplet_loss(dist, theirs)
        assert count_crossed == count_square and abs(float(loss_crossed) - float(loss_square)) <= 1e-14
    assert crossed.counts() == square.counts()
    square_counts, crossed_counts = batch_image_counts(square, True), batch_image_counts(crossed, True)
    assert torch.equal(crossed_counts.per_image[:, 2], square_counts.per_image[:, 2])
    assert torch.equal(crossed_counts.per_reference[:, :2], square_counts.per_image[:, :2])
    assert torch.equal(crossed_counts.negative_uses, square_counts.negative_uses)
    for miner in (FaceNetMiner(0.3), BatchHardMiner(0.3)):
        ours, theirs = miner.mine(crossed), miner.mine(square)
        assert torch.equal(ours.anchor, theirs.anchor) and torch.equal(ours.d_an, theirs.d_an)
    pairs_crossed, pairs_square = AllPairsMiner(0.3).mine(crossed), AllPairsMiner(0.3).mine(square)
    assert torch.equal(pairs_crossed.similar, pairs_square.similar | pairs_square.similar.T)


def test_the_memory_size_is_a_miner_setting_that_is_off_by_default():
    cfg = RunConfig(dataset="digits")
    assert "memory_size" not in cfg.options  # stored configs of runs without it read the same
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    on = RunConfig(dataset="digits", loss="triplet", batch_size=64, options={"memory_size": 512})
    assert on.options == {"memory_size": 512.0} and on.miner_settings() == {"memory_size": 512.0}
    assert RunConfig(dataset="digits", loss="triplet", options={"memory_size": 0}).options == {}
    with pytest.raises(ValueError, match="at least the batch size"):
        RunConfig(dataset="digits", loss="triplet", batch_size=256, options={"memory_size": 128})
    with pytest.raises(ValueError, match="memory_size"):
        RunConfig(dataset="digits", loss="infonce", options={"memory_size": 512})
    with pytest.raises(ValueError, match="soft-margin"):
        RunConfig(dataset="digits", loss="triplet", triplet_variant="soft-margin", options={"memory_size": 512})
    assert RunConfig(dataset="digits", loss="triplet", triplet_variant="soft-margin", miner="batch-hard",
                     options={"memory_size": 512}).options == {"memory_size": 512.0}
    off = step_of(TripletLoss(0.2), CategoryMiner("semi-hard", 0.2))
    x = F.normalize(torch.randn(16, 4), dim=1)
    _, batch, _, references = off.mined_loss(x, torch.arange(16) % 4)
    assert batch.square and references is None and off.memory is None


def test_a_digits_run_trains_with_a_memory_from_the_command_line(engine, capsys, monkeypatch):
    from core.cli import _parser, main
    from storage import queries
    from storage.db import transaction
    from storage.schema import Run

    help_text = _parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "--memory-size" in help_text
    written = []
    enqueue = CrossBatchMemory.enqueue
    monkeypatch.setattr(CrossBatchMemory, "enqueue", lambda self, e, l: written.append(len(self)) or enqueue(self, e, l))
    code = main(["train", "--dataset", "digits", "--loss", "triplet", "--epochs", "2", "--batch-size", "64",
                 "--memory-size", "256", "--no-projection"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with transaction(engine) as session:
        run = session.get(Run, summary["run_id"])
        assert run.status == "completed", run.reason
        assert run.config["options"] == {"memory_size": 256.0} and run.config["miner"] == "semi-hard"
        assert queries.triplet_rows(session, run.id, 2)
    # every step mined against the memory, which filled up to its size and stayed there
    full = written.index(256)  # P×K batches of 64: 16 classes × 4 rows, or 15 × 4 = 60
    assert written[0] == 0 and full >= 4 and all(b - a in (60, 64) for a, b in zip(written[:full], written[1:full]))
    assert set(written[full:]) == {256} and len(written) > full + 10
    assert summary["precision_at_1"] > 0.5


def test_the_train_page_offers_the_memory_under_the_miner(engine, monkeypatch):
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    import core.runs.jobs
    from storage import queries
    from storage.db import transaction

    st.cache_resource.clear()  # the page's engine is a cached resource: it must be this test's database
    monkeypatch.setattr(core.runs.jobs, "start_worker", lambda engine, run_id: None)
    at = AppTest.from_file("../pages/train.py", default_timeout=120)
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    assert not any(n.label == "Cross-batch memory M" for n in at.number_input)  # supcon's in-batch miner has none
    next(s for s in at.selectbox if s.label == "Objective").set_value("triplet").run()
    memory = next(n for n in at.number_input if n.label == "Cross-batch memory M")
    assert memory.value == 0.0
    memory.set_value(1024.0).run()
    next(b for b in at.button if b.label == "Start training").click().run()
    assert not at.error, [e.value for e in at.error]
    with transaction(engine) as session:
        newest = queries.list_runs(session)[0]
        assert newest.config["loss"] == "triplet" and newest.config["options"] == {"memory_size": 1024.0}


def brute_counts(dist, labels, ref_labels, own, margin, negatives_from):
    """(hard, semi-hard, easy) triplets by a loop, with the negative's column in `negatives_from`."""
    found = [0, 0, 0]
    for a in range(len(labels)):
        for p in range(len(ref_labels)):
            if p == own[a] or ref_labels[p] != labels[a]:
                continue
            for n in range(len(ref_labels)):
                if ref_labels[n] == labels[a] or not negatives_from[n]:
                    continue
                d_ap, d_an = dist[a][p], dist[a][n]
                found[0 if d_an <= d_ap else 1 if d_an <= d_ap + margin else 2] += 1
    return found


def test_the_counts_and_the_inspector_mark_the_memorys_negatives():
    from core.training.loop import inspect_batch

    margin, size, memory = 0.3, 12, 30
    step = step_of(TripletLoss(margin), build_miner("semi-hard", margin, memory_size=memory))
    generator = torch.Generator().manual_seed(5)
    saw_memory = False
    for k in range(5):
        x = F.normalize(torch.randn(size, 6, generator=generator, dtype=torch.float64), dim=1)
        labels = torch.randint(3, (size,), generator=generator)
        _, batch, mined, references = step.mined_loss(x, labels)
        step.memory.positions[references.own.numpy()] = np.arange(size) + 100 * k  # batch k: positions 100k..
        counted = batch_image_counts(batch, negative_uses=True)
        dist, own = batch.dist.tolist(), references.own.tolist()
        ref_labels = references.labels.tolist()
        every = brute_counts(dist, labels.tolist(), ref_labels, own, margin, [True] * len(ref_labels))
        remembered = brute_counts(dist, labels.tolist(), ref_labels, own, margin, batch.from_memory.tolist())
        assert [counted.batch.hard, counted.batch.semi_hard, counted.batch.easy] == every
        mem = counted.batch.from_memory
        assert [mem.hard, mem.semi_hard, mem.easy] == remembered
        assert (k == 0) == (sum(remembered) == 0)  # the first batch has no memory yet
        # the per-reference tally counts each reference as the negative of its triplets
        assert int(counted.per_reference[:, 0].sum()) == every[0]
        assert int(counted.per_reference[:, 1].sum()) == every[1]
        ref_positions = step.memory.positions[:len(ref_labels)].copy()
        rows, _ = inspect_batch(step.loss_fn, batch, mined, np.arange(size) + 100 * k,
                                torch.Generator().manual_seed(0), ref_positions)
        assert rows
        for row in rows:  # a negative from the memory is an image of an earlier batch
            assert row["anchor"] // 100 == k
            assert row["from_memory"] == (row["negative"] // 100 < k)
            saw_memory |= row["from_memory"]
    assert saw_memory


def test_a_run_with_a_memory_reports_its_negatives_from_memory(digits_small):
    from core.training.loop import fit

    steps, epochs = [], []
    fit(RunConfig(dataset="digits", loss="triplet", epochs=1, batch_size=32, options={"memory_size": 128}), digits_small,
        on_step=steps.append, on_epoch=lambda stats, state: epochs.append(stats))
    stats = epochs[0]
    assert steps[0].memory_counts == dict.fromkeys(("easy", "semi-hard", "hard"), 0)  # nothing remembered yet
    assert sum(steps[-1].memory_counts.values()) > 0
    assert all(stats.memory_counts[k] <= stats.counts[k] for k in stats.counts)
    assert stats.memory_counts == {k: sum(s.memory_counts[k] for s in steps) for k in stats.counts}
    assert sum(stats.memory_counts.values()) > sum(stats.counts.values()) / 2  # 3/4 of the references are memory
    assert any(row["from_memory"] for row in stats.triplets)
    assert stats.image_counts.sum() > 0


@pytest.fixture(scope="module")
def digits_small():
    from core.data.datasets import DatasetArrays, load_builtin

    pixels, labels, split, classes = load_builtin("digits")
    return DatasetArrays(pixels[:300], labels[:300], split[:300], classes)


def test_self_supervised_rows_against_a_memory_are_labelled_by_their_image(digits_small, monkeypatch):
    # two views of an image are its positives; with a memory the row index of a batch would make
    # image i of one batch a positive of image i of every other, so the label is the image's own
    from core.training.loop import fit

    seen = []
    original = TrainingStep.mined_loss
    monkeypatch.setattr(TrainingStep, "mined_loss",
                        lambda self, e, labels: seen.append(labels.clone()) or original(self, e, labels))
    fit(RunConfig(dataset="digits", loss="triplet", epochs=1, batch_size=16, supervision="self", sampler="random",
                  options={"memory_size": 64}), digits_small)
    assert len(seen) > 2
    for labels in seen:
        half = len(labels) // 2
        assert torch.equal(labels[:half], labels[half:]) and len(set(labels[:half].tolist())) == half
    assert len(set(torch.cat(seen).tolist())) > len(seen[0])  # not the same row numbers batch after batch
    with pytest.raises(ValueError, match="two views"):
        fit(RunConfig(dataset="digits", loss="triplet", epochs=1, batch_size=40, supervision="self", options={"memory_size": 64}),
            digits_small)


def test_a_resumed_run_continues_with_the_memory_it_stopped_with(digits_small, tmp_path, monkeypatch):
    from core.training.loop import Cancelled, fit

    cfg = RunConfig(dataset="digits", loss="triplet", epochs=2, batch_size=32, options={"memory_size": 128})
    uninterrupted: list[float] = []
    full = fit(cfg, digits_small, on_epoch=lambda stats, state: uninterrupted.append(stats.loss))
    path = tmp_path / "state.safetensors"
    saved = []

    def save_then_stop(stats, state):
        state.save(path)
        saved.append(stats.epoch)

    with pytest.raises(Cancelled):
        fit(cfg, digits_small, on_epoch=save_then_stop, should_stop=lambda: bool(saved))
    resumed_losses: list[float] = []
    first_references = []
    original = TrainingStep.enqueue

    def noting(self, embeddings, labels):
        if not first_references:
            first_references.append(len(self.memory) if self.memory is not None else 0)
        return original(self, embeddings, labels)

    monkeypatch.setattr(TrainingStep, "enqueue", noting)
    resumed = fit(cfg, digits_small, on_epoch=lambda stats, state: resumed_losses.append(stats.loss), resume_from=path)
    assert first_references == [128]  # the resumed run's first step already had a full memory
    np.testing.assert_allclose(resumed_losses, uninterrupted[1:], rtol=1e-4)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=name)


def test_a_step_with_a_memory_computes_one_distance_matrix_and_sorts_it_once(digits_small, monkeypatch):
    """The memory's route is the square one's: one (B, R) matrix, one sort of it, read by the
    miner, the loss, the tally, the counts and the inspector; no (B, B) matrix besides."""
    from core.metric import mining
    from core.training.loop import fit

    crossed, squares, sorts = [], [], []
    cross = TripletLoss.cross_distances
    monkeypatch.setattr(TripletLoss, "cross_distances",
                        lambda self, q, r: crossed.append((len(q), len(r))) or cross(self, q, r))
    square = TripletLoss.distances
    monkeypatch.setattr(TripletLoss, "distances", lambda self, x: squares.append(len(x)) or square(self, x))
    sort_rows = mining.sort_rows
    monkeypatch.setattr(mining, "sort_rows", lambda matrix: sorts.append(tuple(matrix.shape)) or sort_rows(matrix))
    steps, epochs = [], []
    fit(RunConfig(dataset="digits", loss="triplet", epochs=1, batch_size=32, options={"memory_size": 96}), digits_small,
        on_step=steps.append, on_epoch=lambda stats, state: epochs.append(stats))
    assert len(steps) > 4 and squares == [] and len(crossed) == len(steps)
    assert sorts == crossed  # one sort per step, of that step's (B, R) matrix
    assert [r for _, r in crossed[:3]] == [32, 64, 96] and {r for _, r in crossed[3:]} == {96}
    assert epochs[0].triplets and epochs[0].gap_histogram is not None and epochs[0].image_counts.sum() > 0
