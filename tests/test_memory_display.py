"""The cross-batch memory's negatives kept and shown (issue 19, point 3): a digits run trained with
a memory stores, per epoch, how many counted triplets took their negative from the memory, and
marks the inspected rows whose negative came from it; the Triplets page shows both, and nothing
of them for a run without a memory."""
import pytest
from streamlit.testing.v1 import AppTest

from core.training.config import RunConfig
from core.runs.jobs import create_training_run
from core.runs.worker import execute_run
from storage import queries
from storage.db import make_engine, transaction
from storage.schema import EpochRow

pytestmark = pytest.mark.usefixtures("fresh_caches")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One data folder with a two-epoch digits run whose semi-hard miner mines against a memory of
    256 (four batches of 64), trained in this process; yields (engine, run id)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EMBEDDING_LAB_HOME", str(tmp_path_factory.mktemp("lab")))
        patch.delenv("EMBEDDING_LAB_DB", raising=False)
        engine = make_engine()
        run_id = create_training_run(engine, RunConfig(dataset="digits", loss="triplet", epochs=2, batch_size=64,
                                                       options={"memory_size": 256}))
        assert execute_run(engine, run_id, project=False)["status"] == "completed"
        yield engine, run_id
        engine.dispose()


def test_a_run_with_a_memory_stores_its_negatives_from_the_memory(store):
    engine, run_id = store
    with transaction(engine) as session:
        epochs = list(queries.epoch_rows(session, [run_id]))
        rows = list(queries.triplet_rows(session, run_id, 2))
    assert [e.epoch for e in epochs] == [1, 2]
    for epoch in epochs:
        counts = {"easy": epoch.easy, "semi-hard": epoch.semi_hard, "hard": epoch.hard}
        assert set(epoch.memory_counts) == set(counts)
        assert all(0 <= epoch.memory_counts[c] <= counts[c] for c in counts)
        # three quarters of a full memory are earlier batches: most negatives come from there
        assert sum(epoch.memory_counts.values()) > sum(counts.values()) / 2
    assert rows and all(isinstance(r.from_memory, bool) for r in rows if r.negative is not None)
    assert any(r.from_memory for r in rows)


def test_the_triplets_page_shows_the_memorys_negatives(store):
    from pages.triplets_views import FROM_MEMORY

    engine, run_id = store
    at = AppTest.from_file("../pages/triplets.py", default_timeout=120)
    at.query_params["run"] = str(run_id)
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    body = "\n".join(str(x.value) for x in [*at.markdown, *at.caption, *at.subheader])
    with transaction(engine) as session:
        last = session.query(EpochRow).filter_by(run_id=run_id, epoch=2).one()
        remembered = sum(last.memory_counts.values())
        total = last.easy + last.semi_hard + last.hard
        marked = sum(bool(r.from_memory) for r in queries.triplet_rows(session, run_id, 2))
    assert "Negatives from the cross-batch memory per epoch" in body
    assert f"Epoch 2: {remembered:,} of {total:,}" in body
    assert len(at.get("vega_lite_chart")) >= 3  # categories, the memory's negatives, the gap histogram
    assert marked and body.count(FROM_MEMORY) == marked  # each row whose negative came from the memory
    captions = [c for image in at.get("image") for c in (i.caption for i in image.proto.imgs)]
    assert sum(c.startswith("N #") and c.endswith(" · from memory") for c in captions) == marked


def test_the_train_pages_live_counts_say_how_many_negatives_came_from_the_memory(store):
    engine, run_id = store
    with transaction(engine) as session:
        from storage.schema import Run

        live = dict(session.get(Run, run_id).recent_counts)
    memory = live.pop("from_memory")
    assert set(live) == set(memory) == {"easy", "semi-hard", "hard"}
    assert all(0 <= memory[c] <= live[c] for c in live) and sum(memory.values()) > 0
    at = AppTest.from_file("../pages/train.py", default_timeout=120)
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    shown = {m.label: (m.value, m.delta) for m in at.metric}
    for category in live:
        assert shown[category] == (f"{live[category]:,}", f"{memory[category]:,} from memory")


def test_without_a_memory_the_live_counts_have_no_memory_share(tmp_path, monkeypatch):
    from core.runs.worker import live_counts
    from core.training.loop import StepProgress

    plain = StepProgress(1, 5, 10, 0.3, {"easy": 4, "semi-hard": 2, "hard": 1})
    assert live_counts(plain) == {"easy": 4, "semi-hard": 2, "hard": 1}
    remembered = StepProgress(1, 5, 10, 0.3, {"easy": 4, "semi-hard": 2, "hard": 1}, {"hard": 1})
    assert live_counts(remembered)["from_memory"] == {"easy": 0, "semi-hard": 0, "hard": 1}
