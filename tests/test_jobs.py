"""Runs in worker processes: progress is stored, cancel works, a killed worker is not 'running' forever."""
import os
import signal
import time

import pytest
from sqlalchemy import select

from core.training.config import RunConfig
from core.runs.jobs import cancel_run, create_training_run, delete_run, start_worker
from core.runs.worker import execute_run
from storage import artifacts, queries
from storage.db import transaction
from storage.schema import Run
from tests.helpers import wait_for


def long_run(engine) -> int:
    return create_training_run(engine, RunConfig(dataset="digits", epochs=500, batch_size=64))


def test_worker_process_stores_progress_and_can_be_cancelled(engine):
    run_id = long_run(engine)
    pid = start_worker(engine, run_id)
    run = wait_for(engine, run_id, lambda r: r.status == "running" and r.step > 0)
    assert run.pid == pid and run.total_steps > run.step and run.last_loss is not None
    assert set(run.recent_counts) == {"easy", "semi-hard", "hard"}  # the categories' one spelling
    cancel_run(engine, run_id)
    run = wait_for(engine, run_id, lambda r: r.status != "running", timeout=60)
    assert run.status == "cancelled" and run.finished_at is not None


def test_a_killed_worker_is_marked_interrupted(engine):
    run_id = long_run(engine)
    pid = start_worker(engine, run_id)
    wait_for(engine, run_id, lambda r: r.status == "running" and r.step > 0)
    os.killpg(pid, signal.SIGKILL)
    time.sleep(0.5)
    with transaction(engine) as session:  # read, not written: liveness is derived on read
        run = session.get(Run, run_id)
        assert run.status == "interrupted"
        assert "ended without finishing" in run.reason
        assert session.scalar(select(Run.status).where(Run.id == run_id)) == "running"


def test_a_run_stores_epochs_triplets_checkpoint_and_embeddings(engine):
    cfg = RunConfig(dataset="digits", epochs=2, batch_size=128, loss="triplet", miner="semi-hard")
    run_id = create_training_run(engine, cfg)
    summary = execute_run(engine, run_id, project=False)
    assert summary["status"] == "completed", summary
    with transaction(engine) as session:
        run = session.get(Run, run_id)
        epochs = queries.epoch_rows(session, [run_id])
        assert [e.epoch for e in epochs] == [1, 2]
        assert all(e.easy + e.semi_hard + e.hard > 0 for e in epochs)
        assert sum(epochs[-1].gap_histogram["counts"]) > 0
        triplets = queries.triplet_rows(session, run_id, 2)
        assert {t.category for t in triplets} <= {"easy", "semi-hard", "hard"} and triplets
        margin = cfg.margin
        for t in triplets:  # the stored category agrees with DESIGN's definitions
            expected = "hard" if t.d_an <= t.d_ap else "semi-hard" if t.d_an <= t.d_ap + margin else "easy"
            assert t.category == expected
        assert artifacts.absolute(run.checkpoint).exists() and artifacts.absolute(run.embeddings).exists()
    delete_run(engine, run_id)
    with transaction(engine) as session:
        assert session.get(Run, run_id) is None
    assert not artifacts.absolute(f"runs/{run_id}").exists()


@pytest.mark.parametrize("loss,miner", [("contrastive", "all"), ("contrastive", "hard"), ("infonce", "all"),
                                        ("triplet", "hard"), ("triplet", "all")])
def test_every_objective_trains(engine, loss, miner):
    run_id = create_training_run(engine, RunConfig(dataset="digits", epochs=1, batch_size=64, loss=loss, miner=miner))
    summary = execute_run(engine, run_id, project=False)
    assert summary["status"] == "completed", summary
    assert summary["precision_at_1"] > 0.3  # far above chance (0.1) after one epoch
