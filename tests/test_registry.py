"""One registry per objective and miner: a loss registered here, in a test module and nowhere
else, reaches the config checks, make_loss, the command line and the Train page."""
import json

import pytest
import torch
from streamlit.testing.v1 import AppTest

from core.metric import registry
from core.training.config import RunConfig
from core.metric.losses import make_loss
from core.metric.miners import BatchHardMiner
from core.metric.registry import MinedKind, Miner, Objective, Setting
from storage import queries
from storage.db import transaction
from storage.schema import Run


def build_scaled(settings: dict, miner) -> torch.nn.Module:
    """scale · the standard triplet loss over any triplet miner: a loss this module alone defines."""
    from core.metric.losses.triplet import TripletLoss
    from core.metric.mining import TripletSet

    class ScaledTriplet(TripletLoss):
        def per_triplet(self, d_ap, d_an):  # index triplets and the inspector's rows
            return settings["scale"] * super().per_triplet(d_ap, d_an)

        def loss_on(self, dist, labels, mined):  # whole categories are summed without per_triplet
            scale = settings["scale"] if isinstance(mined, TripletSet) else 1.0
            return scale * super().loss_on(dist, labels, mined)

    return ScaledTriplet(margin=settings["margin"], miner=miner)


SCALED = Objective(
    name="scaled-triplet", title="Scaled triplet", explanation="L = s·max(0, d(A,P) − d(A,N) + m), s a fixed scale.",
    settings=(Setting("margin", "Margin m", 0.3, low=0.01, high=10.0, step=0.05),
              Setting("scale", "Scale s", 2.0, "how much the loss is multiplied by", low=0.1, high=100.0, step=0.5)),
    accepts=(MinedKind.TRIPLET_SET, MinedKind.TRIPLETS), default_miner="hard", factory=build_scaled)


@pytest.fixture
def scaled_objective():
    registry.register_objective(SCALED)
    yield SCALED
    registry.unregister(SCALED.name)


def test_a_registered_loss_is_checked_and_built_from_its_entry(scaled_objective):
    cfg = RunConfig(dataset="digits", loss="scaled-triplet")
    assert (cfg.miner, cfg.margin, cfg.options) == ("hard", 0.3, {"scale": 2.0})
    with pytest.raises(ValueError, match=r"scale must be in \[0.1, 100\] for the scaled-triplet objective"):
        RunConfig(dataset="digits", loss="scaled-triplet", options={"scale": 0})
    with pytest.raises(ValueError, match="miner 'all-pairs' does not apply to the scaled-triplet loss"):
        RunConfig(dataset="digits", loss="scaled-triplet", miner="all-pairs")
    # every triplet miner serves it, because it accepts what they return
    assert {"semi-hard", "hard", "all", "easy", "batch-hard", "facenet"} <= set(scaled_objective.miners)
    assert "all-pairs" not in scaled_objective.miners

    x = torch.nn.functional.normalize(torch.randn(24, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    labels = torch.arange(24) % 3
    scaled = make_loss("scaled-triplet", "batch-hard", 0.3, scale=4.0)
    plain = make_loss("triplet", "batch-hard", 0.3)
    assert torch.allclose(scaled(x, labels), 4.0 * plain(x, labels))


def test_a_registered_miner_serves_every_objective_that_accepts_what_it_returns():
    miner = Miner("first-negative", "First negative", "per anchor, its first positive and first negative.",
                  MinedKind.TRIPLETS, BatchHardMiner)
    registry.register_miner(miner)
    try:
        assert "first-negative" in registry.objective("triplet").miners
        assert "first-negative" not in registry.objective("contrastive").miners
        assert RunConfig(dataset="digits", loss="triplet", miner="first-negative").miner == "first-negative"
        with pytest.raises(ValueError, match="already registered"):
            registry.register_miner(miner)
    finally:
        registry.unregister("first-negative")
    assert "first-negative" not in registry.objective("triplet").miners


def test_a_registered_loss_trains_from_the_command_line(scaled_objective, engine, capsys):
    from core.cli import _parser, main

    help_text = _parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "scaled-triplet" in help_text and "--scale" in help_text and "s·max(0" in help_text

    code = main(["train", "--dataset", "digits", "--loss", "scaled-triplet", "--scale", "3", "--miner", "batch-hard",
                 "--epochs", "1", "--batch-size", "256", "--no-projection"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with transaction(engine) as session:
        run = session.get(Run, summary["run_id"])
        assert run.status == "completed", run.reason
        assert run.config["loss"] == "scaled-triplet" and run.config["options"] == {"scale": 3.0}
        rows = queries.triplet_rows(session, run.id, 1)
        # batch-hard picks, and each row's loss is the scaled hinge of its own distances
        assert rows and all(r.loss == pytest.approx(3.0 * max(0.0, r.d_ap - r.d_an + 0.3), abs=1e-5) for r in rows)

    assert main(["train", "--dataset", "digits", "--loss", "triplet", "--scale", "3"]) == 2
    assert "neither the triplet loss nor the semi-hard miner has a setting scale" in capsys.readouterr().err


def test_a_registered_loss_appears_on_the_train_page(scaled_objective, engine, monkeypatch):
    import streamlit as st

    import core.runs.jobs

    st.cache_resource.clear()  # the page's engine is a cached resource: it must be this test's database
    monkeypatch.setattr(core.runs.jobs, "start_worker", lambda engine, run_id: None)  # its worker would not know the loss
    at = AppTest.from_file("../pages/train.py", default_timeout=120)
    at.run()
    objective = next(s for s in at.selectbox if s.label == "Objective")
    assert "Scaled triplet" in objective.options
    objective.select("scaled-triplet").run()
    assert not at.exception, [e.message for e in at.exception]
    assert next(s for s in at.selectbox if s.label == "Miner").value == "hard"
    scale = next(n for n in at.number_input if n.label == "Scale s")
    assert scale.value == 2.0 and next(n for n in at.number_input if n.label == "Margin m").value == 0.3
    assert "s·max(0, d(A,P) − d(A,N) + m)" in "\n".join(c.value for c in at.caption)
    scale.set_value(5.0).run()
    next(b for b in at.button if b.label == "Start training").click().run()
    assert not at.error, [e.value for e in at.error]
    with transaction(engine) as session:
        newest = queries.list_runs(session)[0]
        assert newest.config["loss"] == "scaled-triplet" and newest.config["options"] == {"scale": 5.0}


def test_the_builtins_are_read_and_a_mistake_refused_without_torch_and_each_factory_builds(tmp_path):
    """core.metric.builtins registers the built-in objectives and miners without torch, so the
    command line refuses a bad argument in about a second (3.7 s with torch); each factory it names
    still resolves to what builds that loss or miner."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import sys\n"
        "from core.metric import registry\n"
        "from core.training.config import RunConfig\n"
        "names = list(registry.objectives()), list(registry.miners())\n"
        "RunConfig(dataset='digits', loss='supcon', temperature=0.07)\n"
        "from core.cli import main\n"
        "try:\n"
        "    code = main(['train', '--dataset', 'digits', '--loss', 'triplet', '--margin', '-1'])\n"
        "except SystemExit as stop:\n"
        "    code = stop.code\n"
        "print(names, code, 'torch' in sys.modules)\n")
    env = dict(os.environ, EMBEDDING_LAB_HOME=str(tmp_path / "lab"))
    env.pop("EMBEDDING_LAB_DB", None)
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parent.parent,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    names, code, torch_imported = result.stdout.strip().rsplit(" ", 2)
    assert "'triplet'" in names and "'semi-hard'" in names and "'in-batch'" in names
    assert code != "0" and "margin must be in [0.01, 10]" in result.stderr  # refused, one line
    assert torch_imported == "False"

    for spec in registry.objectives().values():
        if isinstance(spec.factory, str):
            miner = spec.default_miner
            built = make_loss(spec.name, miner, **{s.name: s.default for s in spec.settings})
            assert isinstance(built, torch.nn.Module), spec.name
    for spec in registry.miners().values():
        assert callable(registry.resolve(spec.factory)), spec.name
    assert registry.resolve(registry.miner("batch-hard").factory) is BatchHardMiner
