"""A worker stopped (SIGSTOP) inside an epoch's transaction freezes nobody: reads (the command
line's `runs`, the Runs page) never wait on it, a write that needs its lock gives up in bounded
time with a sentence, and PostgreSQL ends the stalled transaction itself."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import storage.db as db
from core.data.datasets import resolve_dataset
from core.runs.jobs import cancel_run, create_training_run, delete_run
from core.training.config import RunConfig
from storage.db import DatabaseBusy, make_engine, transaction
from storage.schema import Run

ROOT = Path(__file__).resolve().parent.parent

# a worker's epoch transaction (core.runs.worker's epoch_callback): the held run row updated and
# the epoch's row added, then the process stops before it commits; its last committed heartbeat is
# ten minutes old, as when it has been stopped that long
STALLED_WORKER = """
import os, signal, sys
from datetime import timedelta
from sqlalchemy import update
import storage.db as db
db.IDLE_IN_TRANSACTION_S = float(sys.argv[2])
from core.runs import lifecycle
from storage.schema import EpochRow, Run, utcnow
engine = db.make_engine(role="worker")
holder = lifecycle.claim(engine, Run, int(sys.argv[1]))
with db.transaction(engine) as session:
    session.execute(update(Run).where(Run.id == holder.row_id).values(heartbeat_at=utcnow() - timedelta(minutes=10)))
with db.transaction(engine) as session:
    lifecycle.hold(session, holder, epoch=1)
    session.add(EpochRow(run_id=holder.row_id, epoch=1, loss=1.0, easy=0, semi_hard=0, hard=0, seconds=1.0))
    session.flush()
    print("holding", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
"""


def stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()[0] == "T"


def test_a_worker_stopped_inside_a_transaction_freezes_nobody(any_home, monkeypatch):
    from streamlit.testing.v1 import AppTest
    import streamlit as st

    monkeypatch.setattr(db, "BUSY_TIMEOUT_MS", 1000)  # this process's writes give up after 1 s
    monkeypatch.setattr(db, "APP_LOCK_TIMEOUT_S", 1)
    engine = make_engine()
    postgres = engine.dialect.name == "postgresql"
    resolve_dataset(engine, "digits")  # imported now: queuing a run below writes only its row
    run_id = create_training_run(engine, RunConfig(dataset="digits", epochs=1, batch_size=128))
    # PostgreSQL ends the stalled session after this long idle in its transaction (the app's
    # default is IDLE_IN_TRANSACTION_S, 60 s); SQLite has no server to do it
    idle_s = 15 if postgres else 600
    worker = subprocess.Popen([sys.executable, "-c", STALLED_WORKER, str(run_id), str(idle_s)], cwd=ROOT,
                              env=dict(os.environ), stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline().strip() == "holding"
        while not stopped(worker.pid):
            time.sleep(0.05)

        # a write that needs the stalled worker's lock: a sentence, after the lock timeout
        with pytest.raises(DatabaseBusy, match=rf"^could not cancel run {run_id}: another process held a lock "
                                               r"on the database .* for 1 s \(a worker stopped"):
            cancel_run(engine, run_id)
        if postgres:  # a lock on one run's row: a new run's row is not held up
            assert create_training_run(engine, RunConfig(dataset="digits", epochs=1, batch_size=128)) > run_id
        else:  # SQLite's one write lock: every write waits, and says so
            with pytest.raises(DatabaseBusy, match="^could not queue the new run: another process held a lock"):
                create_training_run(engine, RunConfig(dataset="digits", epochs=1, batch_size=128))

        # reads never wait on the worker: the command line and the Runs page
        listed = subprocess.run([sys.executable, "-m", "core", "runs"], cwd=ROOT, env=dict(os.environ),
                                capture_output=True, text=True, timeout=300)
        assert listed.returncode == 0, listed.stderr[-2000:]
        assert re.search(rf"^\s*{run_id}\s+train\s+interrupted\b", listed.stdout, re.M), listed.stdout
        assert "Traceback" not in listed.stderr
        st.cache_resource.clear()
        page = AppTest.from_file("../pages/runs.py", default_timeout=120)
        page.run()
        assert not page.exception, [e.message for e in page.exception]
        table = page.dataframe[0].value
        assert table.loc[table["run"] == run_id, "status"].iloc[0] == "interrupted"  # silent for 10 minutes
        assert "no heartbeat" in table.loc[table["run"] == run_id, "reason"].iloc[0]

        if postgres:  # the server ends the stalled transaction; the delete then goes through
            deadline = time.monotonic() + idle_s + 60
            while True:
                try:
                    delete_run(engine, run_id)
                    break
                except DatabaseBusy:
                    assert time.monotonic() < deadline, "the stalled transaction was never ended"
            with transaction(engine) as session:
                assert session.get(Run, run_id) is None
    finally:
        st.cache_resource.clear()
        os.kill(worker.pid, signal.SIGCONT)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        engine.dispose()


def test_a_run_that_loses_its_database_says_so(any_engine, monkeypatch):
    """The database goes away in epoch 2 and comes back two seconds later: the worker ends the
    run interrupted, with a reason that names the database, and it resumes from epoch 1."""
    import threading

    from core.runs.jobs import prepare_resume
    from core.runs.worker import execute_run

    engine = any_engine  # on SQLite and on PostgreSQL
    run_id = create_training_run(engine, RunConfig(dataset="digits", epochs=2, batch_size=128))
    dbapi, real_connect, gone = engine.dialect.dbapi, engine.dialect.connect, threading.Event()

    def connect(*args, **kwargs):
        if gone.is_set():
            raise dbapi.OperationalError("connection refused: the server is down")
        return real_connect(*args, **kwargs)

    def lose_the_database(progress) -> None:
        if progress.epoch == 2 and not gone.is_set():
            gone.set()
            engine.dispose()  # every pooled connection goes: each next one must connect again
            threading.Timer(2.0, gone.clear).start()

    monkeypatch.setattr(engine.dialect, "connect", connect)
    summary = execute_run(engine, run_id, on_step=lose_the_database, project=False)
    assert summary["status"] == "interrupted", summary
    assert "could not be reached (connection refused: the server is down)" in summary["reason"]
    with transaction(engine) as session:
        run = session.get(Run, run_id)
        assert run.status == "interrupted" and run.reason.startswith("the database ")
    assert prepare_resume(engine, run_id) == 1


def test_a_worker_whose_stalled_transaction_the_server_ended_says_so(postgres_server, tmp_path, monkeypatch):
    """PostgreSQL only (SQLite has no server to end it): a worker that sits inside its epoch's
    transaction past the idle timeout loses its session; its run ends interrupted, saying so."""
    import core.runs.worker as worker
    from core.runs.worker import execute_run

    monkeypatch.setenv("EMBEDDING_LAB_HOME", str(tmp_path / "lab"))
    database = postgres_server.new_database()
    monkeypatch.setenv("EMBEDDING_LAB_DB", database)
    monkeypatch.setattr(db, "IDLE_IN_TRANSACTION_S", 1)
    monkeypatch.setattr(worker, "IDLE_IN_TRANSACTION_S", 1)
    engine = make_engine(role="worker")
    try:
        run_id = create_training_run(engine, RunConfig(dataset="digits", epochs=2, batch_size=128))
        real_row = worker.EpochRow

        def stall_then_row(**values):  # inside the epoch's transaction, after the run row was held
            time.sleep(3)
            return real_row(**values)

        monkeypatch.setattr(worker, "EpochRow", stall_then_row)
        summary = execute_run(engine, run_id, project=False)
        assert summary["status"] == "interrupted", summary
        assert "ended this worker's transaction after it sat idle for 1 s" in summary["reason"]
    finally:
        engine.dispose()
        postgres_server.drop_database(database)


def test_postgres_sessions_carry_their_lock_and_idle_timeouts(postgres_server, tmp_path, monkeypatch):
    from sqlalchemy import text

    monkeypatch.setenv("EMBEDDING_LAB_HOME", str(tmp_path / "lab"))
    database = postgres_server.new_database()
    monkeypatch.setenv("EMBEDDING_LAB_DB", database)
    engines = {role: make_engine(role=role) for role in ("app", "worker")}
    try:
        for role, engine in engines.items():
            with engine.connect() as connection:
                settings = [connection.execute(text(f"SHOW {name}")).scalar()
                            for name in ("lock_timeout", "idle_in_transaction_session_timeout")]
            assert settings == [{"app": "5s", "worker": "30s"}[role], "1min"], (role, settings)
    finally:
        for engine in engines.values():
            engine.dispose()
        postgres_server.drop_database(database)
