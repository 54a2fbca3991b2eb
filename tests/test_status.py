"""A run's status has one writer (core.runs.lifecycle), each transition a compare-and-set, and
its liveness is derived on read: a dead worker's run reads interrupted, nothing is written until
someone claims the work (a resume, a map computed again)."""
import ast
import os
import re
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, event, select

from core.runs import lifecycle
from core.runs.lifecycle import LostRun
from storage.db import transaction
from storage.schema import Dataset, ProjectionRow, Run, utcnow
from storage.status import RunStatus

ROOT = Path(__file__).resolve().parent.parent
WRITER = ROOT / "core" / "runs" / "lifecycle.py"
STATUS_TARGETS = {"values", "Run", "ProjectionRow", "insert", "update"}  # what a status= keyword writes into


def status_writes(source: str) -> list[int]:
    """Lines of `source` that assign a status: a `status=` keyword to a row (Run, ProjectionRow)
    or to an UPDATE's values, an assignment to `.status`, or a {"status": ...} handed to
    `.values()`. (A plain object that copies a row's status, e.g. a page's snapshot, writes none.)"""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if called in STATUS_TARGETS and any(k.arg == "status" for k in node.keywords):
                lines.append(node.lineno)
            elif (isinstance(node.func, ast.Attribute) and node.func.attr == "values" and node.args
                  and isinstance(node.args[0], ast.Dict)
                  and any(isinstance(k, ast.Constant) and k.value == "status" for k in node.args[0].keys)):
                lines.append(node.lineno)
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Attribute) and t.attr == "status" for t in targets):
                lines.append(node.lineno)
    return lines


def test_the_check_finds_each_way_of_writing_a_status():
    assert status_writes("update(Run).values(status='failed')") == [1]
    assert status_writes("x = 1\nrow.status = 'done'") == [2]
    assert status_writes("session.add(Run(kind='train', status='queued'))") == [1]
    assert status_writes("update(Run).values({'status': 'failed'})") == [1]
    assert status_writes("print(run.status == 'done'); d = {'status': 1}") == []
    assert status_writes("RunSnapshot(id=1, status=run.status)") == []  # a copy for a page, not a write


def test_only_the_lifecycle_module_writes_a_status():
    files = [ROOT / "app.py", *(p for folder in ("core", "pages", "storage", "models", "bench")
                                for p in (ROOT / folder).rglob("*.py"))]
    found = {str(path.relative_to(ROOT)): lines for path in files if path != WRITER
             for lines in [status_writes(path.read_text())] if lines}
    assert found == {}, f"a status is written outside core/runs/lifecycle.py: {found}"
    assert status_writes(WRITER.read_text())  # the check sees the writer's own writes


def dead_pid() -> int:
    """The id of a process of this machine that has ended (and been reaped)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.fixture
def dataset_id(any_engine) -> int:
    with transaction(any_engine) as session:
        dataset = Dataset(name="rows", source="upload", n_images=0, image_size=8, channels=1, folder="x")
        session.add(dataset)
        session.flush()
        return dataset.id


def new_run(engine: Engine, dataset_id: int) -> int:
    with transaction(engine) as session:
        return lifecycle.create(session, Run(dataset_id=dataset_id, kind="train", config={})).id


def stored(engine: Engine, table, row_id: int) -> tuple:
    """What the database holds (a column read: no liveness derived)."""
    with transaction(engine) as session:
        return tuple(session.execute(select(table.status, table.reason).where(table.id == row_id)).one())


def test_claim_complete_and_a_lost_owner(any_engine, dataset_id):
    engine = any_engine  # on SQLite and on PostgreSQL
    run_id = new_run(engine, dataset_id)
    assert stored(engine, Run, run_id) == ("queued", None)
    holder = lifecycle.claim(engine, Run, run_id)
    with pytest.raises(LostRun, match=f"run {run_id} is running, not queued"):
        lifecycle.claim(engine, Run, run_id)  # a second worker for the same row leaves
    with pytest.raises(TypeError, match="not a status"):
        lifecycle.update_held(engine, holder, status="completed")
    lifecycle.update_held(engine, holder, epoch=3)
    with transaction(engine) as session:
        lifecycle.complete(session, holder, metrics={"precision_at_1": 0.5})
    assert stored(engine, Run, run_id) == ("completed", None)
    # once completed, the old owner's later writes change nothing
    assert lifecycle.fail(engine, holder, "late") is False
    assert lifecycle.end_cancelled(engine, holder) is False
    assert stored(engine, Run, run_id) == ("completed", None)


def test_a_projection_completes_as_done_and_fails_with_its_reason(any_engine, dataset_id):
    engine = any_engine
    run_id = new_run(engine, dataset_id)
    with transaction(engine) as session:
        ids = [lifecycle.create(session, ProjectionRow(run_id=run_id, method=m, params_key="k", params={},
                                                       heartbeat_at=utcnow())).id for m in ("umap", "statistics")]
    done, failed = (lifecycle.claim(engine, ProjectionRow, i) for i in ids)
    with transaction(engine) as session:
        lifecycle.complete(session, done, path="runs/1/umap.npy")
    assert lifecycle.fail(engine, failed, "the map broke") is True
    assert stored(engine, ProjectionRow, ids[0]) == ("done", None)
    assert stored(engine, ProjectionRow, ids[1]) == ("failed", "the map broke")


def test_cancel_requeue_and_fail_to_start(any_engine, dataset_id):
    engine = any_engine
    queued, started = new_run(engine, dataset_id), new_run(engine, dataset_id)
    assert lifecycle.cancel(engine, Run, queued) == "cancelled"
    assert stored(engine, Run, queued) == ("cancelled", "cancelled before it started")
    with transaction(engine) as session:
        assert lifecycle.requeue(session, Run, queued) is True
        assert lifecycle.requeue(session, Run, queued) is False  # queued already: the second resume loses
    assert stored(engine, Run, queued) == ("queued", None)
    holder = lifecycle.claim(engine, Run, started)
    with transaction(engine) as session:  # the cluster refused the job: only queued rows fail
        assert lifecycle.fail_to_start(session, Run, "no cluster", Run.id.in_([queued, started])) == 1
    assert stored(engine, Run, queued) == ("failed", "no cluster")
    assert stored(engine, Run, started) == ("running", None)
    assert lifecycle.cancel(engine, Run, started) == "running"  # its flag is set; its owner ends it
    assert lifecycle.still_held(engine, holder) is True
    assert lifecycle.end_cancelled(engine, holder) is True
    assert stored(engine, Run, started) == ("cancelled", "cancelled by the user")


def test_a_dead_workers_run_reads_interrupted_and_is_taken_over_where_it_is_claimed(any_engine, dataset_id,
                                                                                   monkeypatch):
    engine = any_engine
    dead, silent, alive = (new_run(engine, dataset_id) for _ in range(3))
    holders = {run_id: lifecycle.claim(engine, Run, run_id) for run_id in (dead, silent, alive)}
    with transaction(engine) as session:  # as a worker that died, and one that went silent, leave them
        session.get(Run, dead).pid = dead_pid()
        session.get(Run, silent).host = "another-machine"
    with transaction(engine) as session:
        assert session.get(Run, dead).status == "interrupted"
        assert session.get(Run, dead).reason == "the worker process ended without finishing the run"
        assert session.get(Run, silent).status == "running"  # its heartbeat is fresh
        assert session.get(Run, alive).status == "running"
    assert stored(engine, Run, dead) == ("running", None)  # reading wrote nothing

    with monkeypatch.context() as patch:  # past the heartbeat window, without waiting for it
        patch.setattr(lifecycle, "STALE_AFTER", timedelta(0))
        with transaction(engine) as session:
            assert session.get(Run, silent).status == "interrupted"
            assert "no heartbeat" in session.get(Run, silent).reason

    with transaction(engine) as session:  # the claim: recorded as interrupted, then queued again
        assert lifecycle.take_over(session, Run, dead) == "interrupted"
    assert stored(engine, Run, dead) == ("interrupted", "the worker process ended without finishing the run")
    with transaction(engine) as session:
        assert lifecycle.take_over(session, Run, alive) is None  # a live worker keeps its run
        assert lifecycle.requeue(session, Run, alive) is False
        assert lifecycle.requeue(session, Run, dead) is True
    assert stored(engine, Run, alive) == ("running", None)
    assert stored(engine, Run, dead) == ("queued", None)
    with pytest.raises(LostRun):  # the dead run's old token is worth nothing now
        lifecycle.update_held(engine, holders[dead], epoch=2)
    assert lifecycle.still_held(engine, holders[dead]) is None


def test_a_takeover_is_a_compare_and_set_on_what_was_read(any_engine, dataset_id, monkeypatch):
    """A worker that beats between the reader's look and its write keeps its run."""
    engine = any_engine
    run_id = new_run(engine, dataset_id)
    holder = lifecycle.claim(engine, Run, run_id)
    real = lifecycle.liveness

    def beat_in_between(*args, **kwargs):
        verdict = real(*args, **kwargs)
        lifecycle.update_held(engine, holder)  # another connection: the worker's heartbeat
        return verdict

    with transaction(engine) as session:
        session.get(Run, run_id).host = "another-machine"
    monkeypatch.setattr(lifecycle, "STALE_AFTER", timedelta(0))
    monkeypatch.setattr(lifecycle, "liveness", beat_in_between)
    with transaction(engine) as session:
        assert lifecycle.take_over(session, Run, run_id) is None
    assert stored(engine, Run, run_id) == ("running", None)


def test_statuses_read_as_the_strings_older_databases_hold():
    assert [s.value for s in RunStatus] == ["queued", "running", "completed", "done", "failed", "cancelled",
                                            "interrupted"]
    assert RunStatus.COMPLETED == "completed" and f"{RunStatus.INTERRUPTED}" == "interrupted"


PAGES = ("data", "train", "triplets", "explore", "runs")
WRITES = ("INSERT", "UPDATE", "DELETE", "CREATE", "ALTER", "DROP", "REPLACE")


def rows_as_stored(engine: Engine) -> list:
    """Every run and map row, every column, as the database holds them."""
    with transaction(engine) as session:
        return [session.execute(select(*table.__table__.columns).order_by(table.id)).all()
                for table in (Run, ProjectionRow)]


def test_rendering_every_page_writes_nothing_and_shows_a_dead_run_interrupted(any_engine, monkeypatch):
    """A worker died mid-run (its process is gone, its row still says running): every page
    renders without one write to the database, the Runs page (and `python -m core runs`) shows
    the run interrupted all the same, and the resume that follows takes it over."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from core.runs.jobs import prepare_resume
    from tests.helpers import cancelled_in_epoch_two, completed_digits_run

    engine = any_engine  # on SQLite and on PostgreSQL
    completed = completed_digits_run(engine, epochs=1)
    run_id = cancelled_in_epoch_two(engine)  # a checkpoint after epoch 1
    with transaction(engine) as session:  # what a worker killed in epoch 2 leaves
        run = session.get(Run, run_id)
        run.status, run.reason, run.finished_at = "running", None, None
        run.owner, run.pid, run.host, run.heartbeat_at = "gone", dead_pid(), socket.gethostname(), utcnow()
    before = rows_as_stored(engine)

    writes = []

    def count_writes(connection, cursor, statement, parameters, context, executemany) -> None:
        if statement.lstrip().split(None, 1)[0].upper() in WRITES:
            writes.append(statement)

    st.cache_resource.clear()
    st.cache_data.clear()
    event.listen(Engine, "before_cursor_execute", count_writes)
    try:
        shown = {}
        for name in PAGES:
            at = AppTest.from_file(f"../pages/{name}.py", default_timeout=120)
            at.run()
            assert not at.exception, (name, [e.message for e in at.exception])
            shown[name] = at
    finally:
        event.remove(Engine, "before_cursor_execute", count_writes)
        st.cache_resource.clear()
    assert writes == []
    assert rows_as_stored(engine) == before
    listed = subprocess.run([sys.executable, "-m", "core", "runs"], cwd=ROOT, env=dict(os.environ),
                            capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert re.search(rf"^\s*{run_id}\s+train\s+interrupted\b", listed.stdout, re.M), listed.stdout
    assert rows_as_stored(engine) == before  # the command line wrote nothing either

    table = shown["runs"].dataframe[0].value
    assert table.loc[table["run"] == run_id, "status"].iloc[0] == "interrupted"
    assert table.loc[table["run"] == run_id, "reason"].iloc[0] == "the worker process ended without finishing the run"
    assert table.loc[table["run"] == completed, "status"].iloc[0] == "completed"
    assert any(b.label == "Resume from epoch 1" for b in shown["runs"].button)  # the newest run is chosen

    assert prepare_resume(engine, run_id) == 1  # the next claim takes the run over
    assert stored(engine, Run, run_id) == ("queued", None)


def test_a_dead_worker_asked_to_stop_reads_cancelled():
    """The user cancelled and the worker died before saying so (a Ray job's stop kills it): the
    run reads cancelled, not interrupted; without the cancel it reads interrupted."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    now = utcnow()
    row = dict(heartbeat_at=now, created_at=now, pid=gone.pid, host=socket.gethostname(), job_id=None)
    status, reason = lifecycle.liveness(Run, "running", cancel_requested=True, **row)
    assert status is RunStatus.CANCELLED and reason.startswith("cancelled by the user; the worker process ended")
    status, reason = lifecycle.liveness(Run, "running", cancel_requested=False, **row)
    assert status is RunStatus.INTERRUPTED and reason.startswith("the worker process ended")
    assert lifecycle.liveness(Run, "completed", cancel_requested=True, **row) is None
