"""README's "Adding an objective or a miner", followed to the letter: a loss (its nn.Module and its
register_objective) and a miner with a setting of its own (its class and its register_miner) are
defined here and nowhere else, and they train from the command line and show on the Train page."""
import json

import pytest
import torch
import torch.nn.functional as F
from streamlit.testing.v1 import AppTest

from core.metric import registry
from core.metric.distances import pairwise_distances
from core.metric.miners import BaseMiner, MiningBatch, Triplets
from core.metric.registry import MinedKind, Objective, Setting
from core.training.config import RunConfig
from storage import queries
from storage.db import transaction
from storage.schema import Run


class SquaredHinge(torch.nn.Module):
    """L = mean over the miner's triplets of max(0, d(A,P) − d(A,N) + m)², those with a non-zero term."""

    def __init__(self, margin: float, miner) -> None:
        super().__init__()
        self.margin, self.miner = margin, miner

    def distances(self, embeddings: torch.Tensor) -> torch.Tensor:
        return pairwise_distances(embeddings)

    def loss_on(self, dist: torch.Tensor, labels: torch.Tensor, mined: Triplets) -> torch.Tensor:
        terms = F.relu(dist[mined.anchor, mined.positive] - dist[mined.anchor, mined.negative] + self.margin).pow(2)
        used = terms > 0
        return torch.where(used, terms, 0).sum() / used.sum().clamp_min(1)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        dist = self.distances(embeddings)
        return self.loss_on(dist, labels, self.miner(dist, labels))


class KthNegativeMiner(BaseMiner):
    """Per anchor, its farthest positive and its k-th closest negative (k = 1: batch-hard)."""

    def __init__(self, margin: float, rank: float) -> None:
        self.margin, self.rank = margin, int(rank)

    @torch.no_grad()
    def mine(self, batch: MiningBatch) -> Triplets:
        negatives = batch.negatives  # the step's one sort of each anchor's negatives
        usable = negatives.positive.any(dim=1) & (negatives.count >= self.rank)
        anchor = torch.nonzero(usable).squeeze(1)
        positive = batch.dist.masked_fill(~negatives.positive, float("-inf")).argmax(dim=1)[anchor]
        negative = negatives.order[anchor, self.rank - 1]
        return Triplets(anchor, positive, negative, batch.dist[anchor, positive], batch.dist[anchor, negative], [])


SQUARED_HINGE = Objective(
    name="squared-hinge", title="Squared hinge", explanation="L = max(0, d(A,P) − d(A,N) + m)² over the picked triplets.",
    settings=(Setting("margin", "Margin m", 0.25, low=0.01, high=10.0, step=0.05),),
    accepts=(MinedKind.TRIPLETS,), default_miner="kth-negative",
    factory=lambda settings, miner: SquaredHinge(settings["margin"], miner))
KTH_NEGATIVE = registry.Miner(
    name="kth-negative", title="k-th negative", explanation="per anchor, its farthest positive and its k-th closest "
    "negative.", returns=MinedKind.TRIPLETS, factory=KthNegativeMiner, uses_margin=False,
    settings=(Setting("rank", "Rank k", 2.0, "which closest negative: 1 is the closest", low=1, high=16, step=1),))


@pytest.fixture
def added():
    registry.register_objective(SQUARED_HINGE)
    registry.register_miner(KTH_NEGATIVE)
    yield
    registry.unregister(SQUARED_HINGE.name)
    registry.unregister(KTH_NEGATIVE.name)


def test_the_miners_setting_is_checked_and_reaches_the_miner(added):
    cfg = RunConfig(dataset="digits", loss="squared-hinge")
    assert (cfg.miner, cfg.margin, cfg.options) == ("kth-negative", 0.25, {"rank": 2.0})
    assert "kth-negative" in registry.objective("triplet").miners  # it returns triplets: the triplet loss takes it
    assert RunConfig(dataset="digits", loss="triplet", miner="kth-negative", options={"rank": 3}).miner_settings() == {"rank": 3.0}
    with pytest.raises(ValueError, match=r"rank must be in \[1, 16\] for the kth-negative miner, got 40"):
        RunConfig(dataset="digits", loss="squared-hinge", options={"rank": 40})
    with pytest.raises(ValueError, match="neither the squared-hinge loss nor the kth-negative miner has a setting scale"):
        RunConfig(dataset="digits", loss="squared-hinge", options={"scale": 2})
    with pytest.raises(ValueError, match="neither the triplet loss nor the semi-hard miner has a setting rank"):
        RunConfig(dataset="digits", loss="triplet", options={"rank": 2})

    from core.training.loop import miner_for

    miner = miner_for(RunConfig(dataset="digits", loss="squared-hinge", options={"rank": 3}))
    dist = torch.tensor([[0.0, 0.1, 0.5, 0.3, 0.9], [0.1, 0.0, 0.2, 0.6, 0.4], [0.5, 0.2, 0.0, 0.7, 0.8],
                         [0.3, 0.6, 0.7, 0.0, 0.35], [0.9, 0.4, 0.8, 0.35, 0.0]])
    picked = miner(dist, torch.tensor([0, 0, 1, 1, 1]))
    assert picked.anchor.tolist() == [0, 1] and picked.negative.tolist() == [4, 3]  # each one's third closest


def test_they_train_from_the_command_line(added, engine, capsys):
    from core.cli import _parser, main

    help_text = _parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "squared-hinge" in help_text and "kth-negative" in help_text and "--rank" in help_text

    code = main(["train", "--dataset", "digits", "--loss", "squared-hinge", "--rank", "3", "--epochs", "1",
                 "--batch-size", "256", "--no-projection"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with transaction(engine) as session:
        run = session.get(Run, summary["run_id"])
        assert run.status == "completed", run.reason
        assert (run.config["loss"], run.config["miner"], run.config["options"]) == ("squared-hinge", "kth-negative",
                                                                                   {"rank": 3.0})
        assert [e.hard + e.semi_hard + e.easy > 0 for e in queries.epoch_rows(session, [run.id])] == [True]


def test_they_appear_on_the_train_page(added, engine, monkeypatch):
    import streamlit as st

    import core.runs.jobs

    st.cache_resource.clear()  # the page's engine is a cached resource: it must be this test's database
    monkeypatch.setattr(core.runs.jobs, "start_worker", lambda engine, run_id: None)
    at = AppTest.from_file("../pages/train.py", default_timeout=120)
    at.run()
    next(s for s in at.selectbox if s.label == "Objective").select("squared-hinge").run()
    assert not at.exception, [e.message for e in at.exception]
    assert next(s for s in at.selectbox if s.label == "Miner").value == "kth-negative"
    rank = next(n for n in at.number_input if n.label == "Rank k")
    assert rank.value == 2.0
    rank.set_value(4.0).run()
    next(b for b in at.button if b.label == "Start training").click().run()
    assert not at.error, [e.value for e in at.error]
    with transaction(engine) as session:
        newest = queries.list_runs(session)[0]
        assert newest.config["miner"] == "kth-negative" and newest.config["options"] == {"rank": 4.0}
