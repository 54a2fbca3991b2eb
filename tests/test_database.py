"""SQLite and a real PostgreSQL server alike: the URL forms, the migrations (a database of the
previous schema is upgraded, never dropped; the migrated schema is the models'), processes
starting at once, the command line end to end, and two trainings with readers polling."""
import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from storage.db import MIGRATIONS, make_engine, transaction
from storage.settings import StorageError, database_url, normalise_url

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def lab_home(any_home):
    return any_home


def test_postgres_urls_take_the_psycopg_driver(monkeypatch, tmp_path):
    assert normalise_url("postgres://u:p@h/db") == "postgresql+psycopg://u:p@h/db"
    assert normalise_url("postgresql://u@h:5433/db") == "postgresql+psycopg://u@h:5433/db"
    assert normalise_url("postgresql+psycopg2://u@h/db") == "postgresql+psycopg2://u@h/db"  # a driver named is kept
    assert normalise_url("sqlite:////x/lab.db") == "sqlite:////x/lab.db"
    monkeypatch.setenv("EMBEDDING_LAB_HOME", str(tmp_path))
    monkeypatch.setenv("EMBEDDING_LAB_DB", " postgres://u:secret@127.0.0.1:1/db ")
    assert database_url() == "postgresql+psycopg://u:secret@127.0.0.1:1/db"
    with pytest.raises(StorageError) as refused:  # nothing listens on port 1: one sentence, password hidden
        make_engine()
    assert "postgresql+psycopg://u:***@127.0.0.1:1/db" in str(refused.value) and "secret" not in str(refused.value)


def _alembic_config(connection):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def _previous_schema(url: str, stamped: bool) -> None:
    """The database as the previous version left it: revision 0001's tables with a dataset, a run,
    its epochs, triplets and a map, written without the models (which have newer columns);
    without alembic_version when made before migrations existed (`stamped` False)."""
    from alembic import command

    engine = create_engine(url)
    with engine.begin() as connection:
        command.upgrade(_alembic_config(connection), "0001")
        connection.execute(text(
            "INSERT INTO datasets (id, name, source, n_images, image_size, channels, classes, folder, created_at) "
            "VALUES (1, 'kept', 'upload', 3, 8, 1, '[\"a\", \"b\"]', 'datasets/1', '2026-11-01 10:00:00')"))
        for position in range(3):
            connection.execute(text(
                "INSERT INTO images (dataset_id, position, name, label, split, sha256) "
                f"VALUES (1, {position}, 'i{position}.png', {position % 2}, 'train', 'h{position}')"))
        connection.execute(text(
            "INSERT INTO runs (id, dataset_id, kind, config, status, cancel_requested, created_at, epoch, step, "
            "total_steps, metrics) VALUES (5, 1, 'train', '{\"loss\": \"triplet\"}', 'completed', false, "
            "'2026-11-01 10:01:00', 2, 10, 10, '{\"precision_at_1\": 0.75}')"))
        for epoch in (1, 2):
            connection.execute(text(
                "INSERT INTO epochs (run_id, epoch, loss, easy, semi_hard, hard, seconds) "
                f"VALUES (5, {epoch}, {0.5 / epoch}, 1, 2, 3, 1.5)"))
        connection.execute(text(
            "INSERT INTO triplets (run_id, epoch, anchor, positive, negative, d_ap, d_an, category) "
            "VALUES (5, 2, 0, 2, 1, 0.25, 0.5, 'semi-hard')"))
        connection.execute(text(
            "INSERT INTO projections (run_id, method, params_key, params, status, created_at, cancel_requested) "
            "VALUES (5, 'umap', 'k', '{}', 'done', '2026-11-01 10:02:00', false)"))
        if not stamped:
            connection.execute(text("DROP TABLE alembic_version"))
    if engine.dialect.name == "postgresql":  # explicit ids leave the sequences behind, as a restore would not
        with engine.begin() as connection:
            for table in ("datasets", "runs"):
                connection.execute(text(f"SELECT setval('{table}_id_seq', (SELECT max(id) FROM {table}))"))
    engine.dispose()


@pytest.mark.parametrize("stamped", [True, False], ids=["at-0001", "before-migrations"])
def test_a_database_of_the_previous_schema_is_upgraded_with_every_row_kept(lab_home, stamped):
    from alembic.runtime.migration import MigrationContext

    from storage.schema import EpochRow, ProjectionRow, Run, TripletRow

    url = database_url()
    _previous_schema(url, stamped)
    engine = make_engine()
    try:
        with engine.connect() as connection:
            assert MigrationContext.configure(connection).get_current_revision() == "0002"
            assert "job_id" in {c["name"] for c in inspect(connection).get_columns("runs")}
        with transaction(engine) as session:
            run = session.get(Run, 5)
            assert (run.status, run.metrics, run.dataset.name, run.dataset.classes) == (
                "completed", {"precision_at_1": 0.75}, "kept", ["a", "b"])
            assert [(e.epoch, e.loss) for e in session.query(EpochRow).order_by(EpochRow.epoch)] == [(1, 0.5), (2, 0.25)]
            assert [(t.anchor, t.negative) for t in session.query(TripletRow)] == [(0, 1)]
            assert session.query(ProjectionRow).one().status == "done"
            run.job_id = "raysubmit_kept"  # the new column is writable
            session.add(Run(dataset_id=1, kind="train", config={}))  # and new rows get new ids
        with transaction(engine) as session:
            assert session.get(Run, 5).job_id == "raysubmit_kept"
            assert max(r.id for r in session.query(Run)) == 6
    finally:
        engine.dispose()


def test_the_migrated_schema_is_the_models(any_engine):
    """A model changed without a migration fails here, on both databases."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from storage.schema import Base

    with any_engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}),
                                       Base.metadata)
    assert differences == []


def _open(home: str, database, barrier, results) -> None:
    os.environ["EMBEDDING_LAB_HOME"] = home
    if database:
        os.environ["EMBEDDING_LAB_DB"] = database
    from storage.db import make_engine

    barrier.wait(timeout=120)
    try:
        engine = make_engine()
        with engine.connect() as connection:
            results.put(("ok", connection.execute(text("SELECT version_num FROM alembic_version")).scalar()))
    except BaseException as exc:
        results.put(("error", repr(exc)))


def test_processes_opening_a_new_database_at_once_all_migrate_it_once(lab_home):
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(3), context.Queue()
    database = os.environ.get("EMBEDDING_LAB_DB")
    workers = [context.Process(target=_open, args=(str(lab_home), database, barrier, results)) for _ in range(3)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    assert outcomes == [("ok", "0002")] * 3


def core(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "core", *args], cwd=ROOT, env=dict(os.environ),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_the_command_line_end_to_end(lab_home):
    """Train, list, map, triplets: the same flow on SQLite and on PostgreSQL."""
    summary = json.loads(core("train", "--dataset", "digits", "--epochs", "1", "--batch-size", "128",
                              "--wait-projection").stdout.strip().splitlines()[-1])
    assert summary["status"] == "completed" and summary["precision_at_1"] > 0.5, summary
    assert summary["projection"]["status"] == "done", summary
    listed = [json.loads(line) for line in core("runs", "--json").stdout.splitlines()]
    assert [(r["run_id"], r["status"]) for r in listed] == [(summary["run_id"], "completed")]
    assert listed[0]["map_at_r"] == summary["map_at_r"]
    triplets = [json.loads(line) for line in core("triplets", "--run", str(summary["run_id"])).stdout.splitlines()]
    assert triplets and {t["epoch"] for t in triplets} == {1}
    assert all(t["category"] in ("easy", "semi-hard", "hard") for t in triplets)


def test_two_trainings_and_readers_at_once(lab_home, any_engine):
    """Two worker processes train while threads read what the pages read, the whole time."""
    from core.config import RunConfig
    from core.jobs import create_training_run, refresh_liveness, start_worker
    from core.worker import run_summary
    from storage import queries
    from storage.schema import EpochRow, Run
    from tests.helpers import wait_for

    runs = [create_training_run(any_engine, RunConfig(dataset="digits", epochs=2, batch_size=256, seed=seed))
            for seed in (1, 2)]
    errors, reads, done = [], [0], threading.Event()

    def reader() -> None:
        engine = make_engine()
        while not done.is_set():
            try:
                refresh_liveness(engine)
                with transaction(engine) as session:
                    queries.list_runs(session)
                    queries.epoch_rows(session, runs)
                for run_id in runs:
                    run_summary(engine, run_id)
                reads[0] += 1
            except Exception as exc:  # any error a page would show
                errors.append(repr(exc))
            time.sleep(0.25)  # a page polls twice a second: four readers at four a second are several tabs
        engine.dispose()

    readers = [threading.Thread(target=reader) for _ in range(4)]
    for thread in readers:
        thread.start()
    try:
        for run_id in runs:
            start_worker(any_engine, run_id, project=False)  # the map jobs are the end-to-end test's
        for run_id in runs:
            wait_for(any_engine, run_id, lambda r: r.status not in ("queued", "running"), timeout=480)
    finally:
        done.set()
        for thread in readers:
            thread.join(timeout=60)
    assert errors == []
    assert reads[0] > 10
    with transaction(any_engine) as session:
        for run_id in runs:
            run = session.get(Run, run_id)
            assert run.status == "completed", (run.status, run.reason)
            epochs = [e.epoch for e in session.query(EpochRow).filter(EpochRow.run_id == run_id)]
            assert sorted(epochs) == [1, 2]
