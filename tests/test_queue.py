"""One queue for the machine's jobs (core.runs.queue): with one slot, runs started together run
one after another in the order they were started, each completing; a queued run cancelled before
its turn never starts; a killed worker frees its slot; waiting processes need no app: the queue
survives the app killed while runs wait, and the app started again reads them completed."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.runs.jobs import cancel_run, create_training_run, start_worker
from core.runs.queue import MAX_JOBS_ENV, max_jobs, places
from core.training.config import RunConfig
from storage.db import transaction
from storage.schema import Run
from tests.helpers import reap, wait_for


@pytest.fixture
def one_slot(engine, monkeypatch):
    monkeypatch.setenv(MAX_JOBS_ENV, "1")  # the workers inherit it
    return engine


def quick(engine, epochs: int = 2) -> int:
    return create_training_run(engine, RunConfig(dataset="digits", epochs=epochs, batch_size=128))


def test_with_one_slot_runs_started_together_run_in_order_and_each_completes(one_slot):
    engine = one_slot
    ids = [quick(engine) for _ in range(3)]
    for run_id in ids:
        start_worker(engine, run_id, project=False)
    first = wait_for(engine, ids[0], lambda r: r.status == "running")
    with transaction(engine) as session:  # the others wait, with their places
        seen = places(session)
        assert [seen[("runs", i)].ahead for i in ids[1:]] == [0, 1]
        assert all(seen[("runs", i)].busy == 1 and seen[("runs", i)].slots == 1 for i in ids[1:])
        assert [session.get(Run, i).status for i in ids[1:]] == ["queued", "queued"]
    assert "next in line, 1 of 1 slots busy" in seen[("runs", ids[1])].sentence()
    from core.runs.overview import run_snapshot, runs_table

    shown = {row["run"]: row["status"] for row in runs_table(engine)}  # the Runs page's table
    assert shown[ids[2]].startswith("queued (waiting for a free slot: 1 job ahead of it")
    assert run_snapshot(engine, ids[1]).waiting.startswith("waiting for a free slot: next in line")  # the Train card
    runs = [wait_for(engine, run_id, lambda r: r.status not in ("queued", "running"), timeout=300) for run_id in ids]
    assert [run.status for run in runs] == ["completed"] * 3
    for before, after in zip(runs, runs[1:]):  # one at a time, in the order they were started
        assert after.started_at >= before.finished_at
    assert first.started_at <= runs[1].started_at


def test_a_queued_run_cancelled_before_its_turn_never_starts(one_slot):
    engine = one_slot
    running = create_training_run(engine, RunConfig(dataset="digits", epochs=500, batch_size=64))
    waiting = quick(engine)
    start_worker(engine, running, project=False)
    wait_for(engine, running, lambda r: r.status == "running" and r.step > 0)
    pid = start_worker(engine, waiting, project=False)
    time.sleep(1.5)  # its process is up and waiting
    with transaction(engine) as session:
        assert session.get(Run, waiting).status == "queued"
    cancel_run(engine, waiting)
    cancel_run(engine, running)
    wait_for(engine, running, lambda r: r.status == "cancelled", timeout=60)
    reap(pid)  # its waiting process is gone
    with transaction(engine) as session:
        run = session.get(Run, waiting)
        assert run.status == "cancelled" and run.started_at is None and run.step == 0


def test_a_killed_worker_frees_its_slot_for_the_next(one_slot):
    engine = one_slot
    doomed = create_training_run(engine, RunConfig(dataset="digits", epochs=500, batch_size=64))
    after = quick(engine, epochs=1)
    pid = start_worker(engine, doomed, project=False)
    wait_for(engine, doomed, lambda r: r.status == "running" and r.step > 0)
    start_worker(engine, after, project=False)
    time.sleep(1.5)
    with transaction(engine) as session:
        assert session.get(Run, after).status == "queued"
    os.killpg(pid, signal.SIGKILL)
    run = wait_for(engine, after, lambda r: r.status not in ("queued", "running"), timeout=300)
    assert run.status == "completed"
    with transaction(engine) as session:
        assert session.get(Run, doomed).status == "interrupted"


# The app, as far as starting runs goes: the Train page's "Start training" (pages/train.py) is
# create_training_run then start_worker, here for three tiny runs; then it serves on until killed.
APP_STARTING_RUNS = """
import json, sys, time
from core.runs.jobs import create_training_run, start_worker
from core.training.config import RunConfig
from storage.db import make_engine

engine = make_engine()
ids = [create_training_run(engine, RunConfig(dataset="digits", epochs=1, batch_size=128, embedding_dim=16))
       for _ in range(3)]
for run_id in ids:
    start_worker(engine, run_id, project=False)  # (no map jobs: they would queue after the runs)
print(json.dumps(ids), flush=True)
time.sleep(600)
"""

# The app started again: what the Runs page reads (core.runs.overview.runs_table), by run.
APP_READING_RUNS = """
import json
from core.runs.overview import runs_table
from storage.db import make_engine

print(json.dumps({row["run"]: row["status"] for row in runs_table(make_engine())}))
"""


def test_the_queue_survives_the_app_killed_while_runs_wait(one_slot, tmp_path):
    """Issue 18: the app's process (and its whole process group, as a terminal's Ctrl-C or a
    killed service would take it) dies by SIGKILL while one run trains and two wait their turn;
    the three still complete, one after another in the order they were started, and the app
    started again reads them completed."""
    engine = one_slot
    root = Path(__file__).resolve().parents[1]
    with open(tmp_path / "app.log", "w") as log:
        app = subprocess.Popen([sys.executable, "-c", APP_STARTING_RUNS], cwd=root, stdout=subprocess.PIPE,
                               stderr=log, text=True, start_new_session=True)
    try:
        line = app.stdout.readline()
        assert line, f"the app did not start its runs: {(tmp_path / 'app.log').read_text()[-2000:]}"
        ids = json.loads(line)
        wait_for(engine, ids[0], lambda r: r.status == "running")
        with transaction(engine) as session:  # the others wait in their own processes
            waiting = [session.get(Run, i) for i in ids[1:]]
            assert [(r.status, r.pid is not None) for r in waiting] == [("queued", True)] * 2
        os.killpg(app.pid, signal.SIGKILL)  # the app and everything in its process group
    finally:
        if app.poll() is None:
            os.killpg(app.pid, signal.SIGKILL)
        app.wait()

    def app_started_again() -> list[str]:
        """The statuses a fresh app process reads of the three runs, as the Runs page shows them."""
        again = subprocess.run([sys.executable, "-c", APP_READING_RUNS], cwd=root, capture_output=True, text=True,
                               timeout=120)
        assert again.returncode == 0, again.stderr[-2000:]
        shown = json.loads(again.stdout)
        return [shown[str(run_id)] for run_id in ids]

    # at once: each run still waits (with its place), trains or is done; none reads interrupted
    assert all(status.split(" ")[0] in ("queued", "running", "completed") for status in app_started_again())
    runs = [wait_for(engine, run_id, lambda r: r.status not in ("queued", "running"), timeout=300) for run_id in ids]
    assert [(run.status, run.reason) for run in runs] == [("completed", None)] * 3
    for before, after in zip(runs, runs[1:]):  # one at a time, in the order they were started
        assert after.started_at >= before.finished_at
    assert app_started_again() == ["completed"] * 3


def test_the_slot_count_is_a_whole_number_said_in_a_sentence(monkeypatch):
    monkeypatch.delenv(MAX_JOBS_ENV, raising=False)
    assert max_jobs() == len(os.sched_getaffinity(0))
    monkeypatch.setenv(MAX_JOBS_ENV, "3")
    assert max_jobs() == 3
    for bad in ("0", "two", "-1", "1.5"):
        monkeypatch.setenv(MAX_JOBS_ENV, bad)
        with pytest.raises(ValueError, match=f"{MAX_JOBS_ENV} must be a whole number >= 1"):
            max_jobs()
