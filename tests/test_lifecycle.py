"""A run's status has one owner: ids are never reused, a stalled worker that lost its run never
writes again, cancel and resume are compare-and-sets, and a run is completed before its map."""
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import delete, select

from core.runs import lifecycle
from core.training.config import RunConfig
from core.runs.jobs import (
    cancel_run, create_training_run, delete_run, prepare_resume, start_projection, start_worker,
)
from core.runs.worker import execute_run
from storage import artifacts, queries
from storage.db import transaction
from storage.run_files import RunFiles
from storage.schema import Dataset, EpochRow, ProjectionRow, Run
from tests.helpers import cancelled_in_epoch_two, reap, wait_for

ROOT = Path(__file__).resolve().parent.parent


def test_ids_of_deleted_runs_and_datasets_are_never_reused(any_engine):
    engine = any_engine  # on SQLite and on PostgreSQL
    cfg = RunConfig(dataset="digits", epochs=1, batch_size=128)
    first = create_training_run(engine, cfg)
    with transaction(engine) as session:
        first_key = session.get(Run, first).cache_key
    delete_run(engine, first)
    second = create_training_run(engine, cfg)
    assert second > first  # SQLite would hand out `first` again without AUTOINCREMENT
    with transaction(engine) as session:
        assert session.get(Run, second).cache_key != first_key
        newest = session.scalar(select(Dataset).order_by(Dataset.id.desc()))
        newest_id = newest.id
        session.execute(delete(Run))
        session.execute(delete(Dataset).where(Dataset.id == newest_id))
    with transaction(engine) as session:
        session.add(Dataset(name="again", source="upload", n_images=0, image_size=8, channels=1, folder="x"))
        session.flush()
        assert session.scalar(select(Dataset.id).where(Dataset.name == "again")) > newest_id


def test_a_stalled_worker_that_lost_its_run_never_writes_again(engine, monkeypatch):
    """SIGSTOP a worker past the heartbeat window: it is declared interrupted; a resume takes
    the run over and completes it; SIGCONT: the old worker wakes and leaves the run completed."""
    run_id = create_training_run(engine, RunConfig(dataset="digits", epochs=3, batch_size=64))
    old = start_worker(engine, run_id)
    wait_for(engine, run_id, lambda r: r.status == "running" and r.epoch >= 1 and r.step > 0)
    wait_for(engine, run_id, lambda r: r.step > r.total_steps // 3 + 2)  # in the middle of epoch 2
    os.killpg(old, signal.SIGSTOP)
    try:
        time.sleep(1.2)
        with transaction(engine) as session:
            stalled = session.get(Run, run_id)
            assert stalled.status == "running"
        # what 60 s of silence does, with a window this test can wait for: the run reads
        # interrupted (nothing is written), and the resume takes it over
        with monkeypatch.context() as patch:
            patch.setattr(lifecycle, "STALE_AFTER", timedelta(seconds=1))
            run = wait_for(engine, run_id, lambda r: True)
            assert run.status == "interrupted" and "no heartbeat" in run.reason
            with transaction(engine) as session:
                assert session.scalar(select(Run.status).where(Run.id == run_id)) == "running"
            epoch = prepare_resume(engine, run_id)
        assert epoch >= 1
        with pytest.raises(ValueError, match=f"run {run_id} is already queued"):
            prepare_resume(engine, run_id)  # a second resume gets a sentence, not a second worker
        new = start_worker(engine, run_id, resume=True, project=False)  # (its map job is none of this test's)
        wait_for(engine, run_id, lambda r: r.status == "completed", timeout=240)
        assert reap(new) == 0
    finally:
        os.killpg(old, signal.SIGCONT)
    reap(old)  # it wakes, finds the run is not its own, and leaves
    time.sleep(0.5)
    with transaction(engine) as session:
        run = session.get(Run, run_id)
        assert run.status == "completed" and run.reason is None, (run.status, run.reason)
        assert [e.epoch for e in queries.epoch_rows(session, [run_id])] == [1, 2, 3]
        assert run.pid == new
    from models.checkpoint import read_training_state_info
    from core.runs.jobs import training_state_path

    with transaction(engine) as session:
        assert read_training_state_info(training_state_path(session.get(Run, run_id)))["epoch"] == 3
    # neither worker leaves its staging behind
    assert not RunFiles(run_id).staging(old).exists() and not RunFiles(run_id).staging(new).exists()


def test_two_resumes_at_once_one_wins(any_engine):
    engine = any_engine  # on SQLite and on PostgreSQL
    run_id = cancelled_in_epoch_two(engine)
    barrier, outcomes = threading.Barrier(2), []

    def resume() -> None:
        barrier.wait()
        try:
            outcomes.append(("ok", prepare_resume(engine, run_id)))
        except ValueError as exc:
            outcomes.append(("refused", str(exc)))

    threads = [threading.Thread(target=resume) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(kind for kind, _ in outcomes) == ["ok", "refused"], outcomes
    with transaction(engine) as session:
        assert session.get(Run, run_id).status == "queued"


def test_cancelling_a_queued_run_cancels_it(any_engine):
    engine = any_engine  # on SQLite and on PostgreSQL
    idle = create_training_run(engine, RunConfig(dataset="digits", epochs=1, batch_size=128))
    assert cancel_run(engine, idle) == "cancelled"
    # a worker that is still starting when the run is cancelled must not run it, nor make it look failed
    starting = create_training_run(engine, RunConfig(dataset="digits", epochs=1, batch_size=128))
    pid = start_worker(engine, starting)
    assert cancel_run(engine, starting) == "cancelled"
    reap(pid)
    for run_id in (idle, starting):
        with transaction(engine) as session:
            run = session.get(Run, run_id)
            assert run.status == "cancelled" and run.reason == "cancelled before it started", run.reason
            assert not queries.epoch_rows(session, [run_id])
    # a finished run cannot be cancelled into another state
    assert cancel_run(engine, idle) == "cancelled" and cancel_run(engine, 10_000) is None


def test_a_command_line_run_is_cancelled_from_the_app(engine, lab_home):
    """`python -m core train` in a terminal shares its shell's process group: cancel signals the
    process alone (and not, say, the shell or this test) and the run ends cancelled."""
    env = dict(os.environ, EMBEDDING_LAB_HOME=str(lab_home))
    process = subprocess.Popen([sys.executable, "-m", "core", "train", "--dataset", "digits", "--epochs", "500",
                                "--batch-size", "64", "--no-projection"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        run_id = None
        while run_id is None and time.monotonic() < deadline:
            with transaction(engine) as session:
                runs = queries.list_runs(session)
                if runs and runs[0].status == "running" and runs[0].step > 0:
                    run_id = runs[0].id
            time.sleep(0.1)
        assert run_id is not None, process.stderr.read() if process.poll() is not None else "no run"
        assert os.getpgid(process.pid) != process.pid  # it leads no group of its own
        cancel_run(engine, run_id)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1, err[-2000:]
    assert '"status": "cancelled"' in out.splitlines()[-1]
    assert "Traceback" not in err
    with transaction(engine) as session:
        assert session.get(Run, run_id).status == "cancelled"


def test_a_run_is_completed_before_its_statistics_and_map(engine):
    """The run's JSON is ready once embeddings and metrics are stored; its statistics, its map and
    its map across epochs are jobs of their own (one process for all), never started twice."""
    run_id = create_training_run(engine, RunConfig(dataset="digits", epochs=1, batch_size=128))
    summary = execute_run(engine, run_id, project=True)
    try:
        assert summary["status"] == "completed" and summary["precision_at_1"] > 0.3
        with transaction(engine) as session:
            rows = session.scalars(select(ProjectionRow).where(ProjectionRow.run_id == run_id)).all()
            assert sorted(r.method for r in rows) == ["evolution", "statistics", "umap"]
            assert all(r.status in ("queued", "running", "done") for r in rows)
            assert len({r.pid for r in rows}) == 1  # one process does them all, one after the other
            assert session.get(Run, run_id).embeddings
        assert start_projection(engine, run_id) is None  # never two jobs for one map
    finally:
        with transaction(engine) as session:
            projection_ids = session.scalars(select(ProjectionRow.id).where(ProjectionRow.run_id == run_id)).all()
        for projection_id in projection_ids:
            lifecycle.cancel(engine, ProjectionRow, projection_id)
    for projection_id in projection_ids:
        row = wait_for(engine, projection_id, lambda r: r.status not in lifecycle.ACTIVE, table=ProjectionRow,
                       timeout=60)
        assert row.status in ("cancelled", "done"), (row.status, row.reason)


def test_nan_embeddings_fail_the_run_with_a_count(engine, monkeypatch):
    import core.runs.worker as worker

    real_embed = worker.embed

    def poisoned(model, pixels, device):
        out = real_embed(model, pixels, device)
        out[:7] = np.nan
        out[7] = np.inf
        return out

    monkeypatch.setattr(worker, "embed", poisoned)
    run_id = create_training_run(engine, RunConfig(dataset="digits", epochs=1, batch_size=128))
    summary = execute_run(engine, run_id, project=True)
    assert summary["status"] == "failed"
    assert "NaN or infinite embeddings for 8 of 1797 images" in summary["reason"]
    with transaction(engine) as session:
        run = session.get(Run, run_id)
        assert run.embeddings is None and run.metrics is None
        assert not session.scalars(select(ProjectionRow).where(ProjectionRow.run_id == run_id)).all()


def test_a_worker_whose_run_was_deleted_leaves_quietly(engine):
    run_id = create_training_run(engine, RunConfig(dataset="digits", epochs=500, batch_size=64))
    pid = start_worker(engine, run_id)
    wait_for(engine, run_id, lambda r: r.status == "running" and r.step > 0)
    delete_run(engine, run_id)
    reap(pid)
    with transaction(engine) as session:
        assert session.get(Run, run_id) is None
        assert not session.scalars(select(EpochRow).where(EpochRow.run_id == run_id)).all()
