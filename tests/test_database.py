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

from storage.db import MIGRATIONS, head_revision, make_engine, transaction
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
    with pytest.raises(StorageError) as refused:  # a URL given to make_engine, its password as libpq also takes it
        make_engine("postgresql://u@127.0.0.1:1/db?password=secret")
    assert "postgresql+psycopg://u@127.0.0.1:1/db?password=***" in str(refused.value)
    assert "secret" not in str(refused.value)


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
            assert MigrationContext.configure(connection).get_current_revision() == head_revision()
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


def test_a_database_at_0005_gets_the_memory_columns_and_keeps_its_rows(lab_home):
    """0006 adds epochs.memory_counts and triplets.from_memory in place: a run's epochs and
    triplets stored at 0005 are all still there and read as "no memory" (None), and the new
    columns take a memory run's values."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    from storage.schema import EpochRow, ProjectionRow, Run, TripletRow

    url = database_url()
    old = create_engine(url)
    with old.begin() as connection:
        command.upgrade(_alembic_config(connection), "0005")
        connection.execute(text(
            "INSERT INTO datasets (id, name, source, n_images, image_size, channels, classes, folder, created_at, "
            "created_by) VALUES (1, 'kept', 'upload', 3, 8, 1, '[\"a\", \"b\"]', 'datasets/1', "
            "'2026-12-01 10:00:00', 'ann@example.com')"))
        connection.execute(text(
            "INSERT INTO runs (id, dataset_id, dataset_version, kind, config, status, cancel_requested, created_at, "
            "epoch, step, total_steps) VALUES (7, 1, 1, 'train', '{\"loss\": \"triplet\"}', 'completed', false, "
            "'2026-12-01 10:01:00', 2, 10, 10)"))
        for epoch in (1, 2):
            connection.execute(text(
                "INSERT INTO epochs (run_id, epoch, loss, easy, semi_hard, hard, seconds, probe_precision_at_1) "
                f"VALUES (7, {epoch}, {0.5 / epoch}, 1, 2, 3, 1.5, 0.5)"))
            connection.execute(text(
                "INSERT INTO triplets (run_id, epoch, anchor, positive, negative, d_ap, d_an, category, loss) "
                f"VALUES (7, {epoch}, 0, 2, 1, 0.25, 0.5, 'semi-hard', 0.05)"))
        connection.execute(text(
            "INSERT INTO projections (run_id, method, params_key, params, status, created_at, cancel_requested) "
            "VALUES (7, 'umap', 'k', '{}', 'done', '2026-12-01 10:02:00', false)"))
    old.dispose()
    engine = make_engine()
    try:
        with engine.connect() as connection:
            assert MigrationContext.configure(connection).get_current_revision() == head_revision()
        with transaction(engine) as session:
            run = session.get(Run, 7)
            assert (run.status, run.dataset.created_by, run.dataset_version) == ("completed", "ann@example.com", 1)
            epochs = session.query(EpochRow).order_by(EpochRow.epoch).all()
            assert [(e.epoch, e.loss, e.hard, e.probe_precision_at_1, e.memory_counts) for e in epochs] == [
                (1, 0.5, 3, 0.5, None), (2, 0.25, 3, 0.5, None)]
            triplets = session.query(TripletRow).order_by(TripletRow.epoch).all()
            assert [(t.epoch, t.negative, t.loss, t.from_memory) for t in triplets] == [
                (1, 1, 0.05, None), (2, 1, 0.05, None)]
            assert session.query(ProjectionRow).one().status == "done"
            session.add(EpochRow(run_id=7, epoch=3, loss=0.1, easy=4, semi_hard=5, hard=6, seconds=1.0,
                                 memory_counts={"easy": 3, "semi-hard": 4, "hard": 5}))
            session.add(TripletRow(run_id=7, epoch=3, anchor=0, positive=2, negative=1, d_ap=0.2, d_an=0.3,
                                   category="semi-hard", from_memory=True))
        with transaction(engine) as session:
            assert session.query(EpochRow).filter_by(epoch=3).one().memory_counts == {"easy": 3, "semi-hard": 4,
                                                                                      "hard": 5}
            assert session.query(TripletRow).filter_by(epoch=3).one().from_memory is True
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


# the tables as the first version's create_all wrote them (before AUTOINCREMENT, ownership tokens,
# map jobs with a process of their own, pair rows, the probe's precision), and a row in each
_FIRST_VERSION = [
    "CREATE TABLE datasets (id {id}, name VARCHAR(200) NOT NULL, source VARCHAR(50) NOT NULL, n_images INTEGER NOT "
    "NULL, image_size INTEGER NOT NULL, channels INTEGER NOT NULL, classes JSON NOT NULL, folder VARCHAR(500) NOT "
    "NULL, created_at {time} NOT NULL, PRIMARY KEY (id), UNIQUE (name))",
    "CREATE TABLE images (id {id}, dataset_id INTEGER NOT NULL, position INTEGER NOT NULL, name VARCHAR(500) NOT NULL, "
    "label INTEGER, split VARCHAR(10) NOT NULL, sha256 VARCHAR(64) NOT NULL, PRIMARY KEY (id), "
    "UNIQUE (dataset_id, position), UNIQUE (dataset_id, sha256), "
    "FOREIGN KEY(dataset_id) REFERENCES datasets (id) ON DELETE CASCADE)",
    "CREATE TABLE runs (id {id}, dataset_id INTEGER NOT NULL, kind VARCHAR(20) NOT NULL, config JSON NOT NULL, "
    "status VARCHAR(20) NOT NULL, reason TEXT, device VARCHAR(40), pid INTEGER, host VARCHAR(200), cancel_requested "
    "BOOLEAN NOT NULL, created_at {time} NOT NULL, started_at {time}, finished_at {time}, heartbeat_at {time}, "
    "phase VARCHAR(40), epoch INTEGER NOT NULL, step INTEGER NOT NULL, total_steps INTEGER NOT NULL, last_loss "
    "{float}, recent_counts JSON, metrics JSON, checkpoint VARCHAR(500), embeddings VARCHAR(500), PRIMARY KEY (id), "
    "FOREIGN KEY(dataset_id) REFERENCES datasets (id) ON DELETE CASCADE)",
    "CREATE TABLE epochs (id {id}, run_id INTEGER NOT NULL, epoch INTEGER NOT NULL, loss {float} NOT NULL, easy "
    "INTEGER NOT NULL, semi_hard INTEGER NOT NULL, hard INTEGER NOT NULL, seconds {float} NOT NULL, gap_histogram "
    "JSON, PRIMARY KEY (id), UNIQUE (run_id, epoch), FOREIGN KEY(run_id) REFERENCES runs (id) ON DELETE CASCADE)",
    "CREATE TABLE projections (id {id}, run_id INTEGER NOT NULL, method VARCHAR(20) NOT NULL, params_key VARCHAR(200) "
    "NOT NULL, params JSON NOT NULL, status VARCHAR(20) NOT NULL, reason TEXT, path VARCHAR(500), created_at {time} "
    "NOT NULL, PRIMARY KEY (id), UNIQUE (run_id, method, params_key), "
    "FOREIGN KEY(run_id) REFERENCES runs (id) ON DELETE CASCADE)",
    "CREATE TABLE triplets (id {id}, run_id INTEGER NOT NULL, epoch INTEGER NOT NULL, anchor INTEGER NOT NULL, "
    "positive INTEGER NOT NULL, negative INTEGER NOT NULL, d_ap {float} NOT NULL, d_an {float} NOT NULL, category "
    "VARCHAR(12) NOT NULL, PRIMARY KEY (id), FOREIGN KEY(run_id) REFERENCES runs (id) ON DELETE CASCADE)",
    "CREATE INDEX ix_triplets_run_epoch ON triplets (run_id, epoch)",
    "INSERT INTO datasets (name, source, n_images, image_size, channels, classes, folder, created_at) "
    "VALUES ('old', 'builtin:digits', 2, 8, 1, '[\"a\", \"b\"]', 'datasets/1', '2026-10-01 09:00:00')",
    "INSERT INTO images (dataset_id, position, name, label, split, sha256) VALUES (1, 0, 'a.png', 0, 'train', 'h0'), "
    "(1, 1, 'b.png', 1, 'test', 'h1')",
    "INSERT INTO runs (dataset_id, kind, config, status, cancel_requested, created_at, epoch, step, total_steps, "
    "metrics) VALUES (1, 'train', '{{}}', 'completed', false, '2026-10-01 09:01:00', 1, 4, 4, '{{\"map_at_r\": 0.5}}')",
    "INSERT INTO epochs (run_id, epoch, loss, easy, semi_hard, hard, seconds) VALUES (1, 1, 0.75, 1, 2, 3, 2.0)",
    "INSERT INTO triplets (run_id, epoch, anchor, positive, negative, d_ap, d_an, category) "
    "VALUES (1, 1, 0, 0, 1, 0.25, 0.5, 'semi-hard')",
    "INSERT INTO projections (run_id, method, params_key, params, status, path, created_at) "
    "VALUES (1, 'umap', 'k', '{{}}', 'done', 'runs/1/umap.npy', '2026-10-01 09:02:00')",
]


def test_a_database_of_the_first_version_gets_every_later_column_and_keeps_its_rows(lab_home):
    """Revision 0001 brings a database made before migrations to its schema in place: tables
    lacking up to ten columns (one of them NOT NULL) and triplets whose members were NOT NULL;
    afterwards the schema is exactly the models' and every row is still there."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from storage.schema import Base, EpochRow, ProjectionRow, Run, TripletRow

    url = database_url()
    old = create_engine(url)
    postgres = old.dialect.name == "postgresql"
    with old.begin() as connection:
        for statement in _FIRST_VERSION:
            connection.execute(text(statement.format(
                id="SERIAL NOT NULL" if postgres else "INTEGER NOT NULL", time="TIMESTAMP" if postgres else "DATETIME",
                float="DOUBLE PRECISION" if postgres else "DOUBLE")))
    old.dispose()
    engine = make_engine()
    try:
        with engine.connect() as connection:
            assert MigrationContext.configure(connection).get_current_revision() == head_revision()
            assert compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}),
                                    Base.metadata) == []
        with transaction(engine) as session:
            run = session.get(Run, 1)
            assert (run.status, run.metrics, run.owner, run.job_id, run.dataset.classes) == (
                "completed", {"map_at_r": 0.5}, None, None, ["a", "b"])
            assert [(e.epoch, e.loss, e.probe_precision_at_1) for e in session.query(EpochRow)] == [(1, 0.75, None)]
            kept = session.query(ProjectionRow).one()
            assert (kept.status, kept.path, kept.cancel_requested, kept.owner) == ("done", "runs/1/umap.npy", False, None)
            assert [(t.positive, t.negative, t.loss) for t in session.query(TripletRow)] == [(0, 1, None)]
            session.add(TripletRow(run_id=1, epoch=1, anchor=1, positive=None, negative=0, d_ap=None, d_an=0.5,
                                   category="dissimilar", loss=0.1))  # a pair row: members may be empty now
            session.add(ProjectionRow(run_id=1, method="statistics", params_key="k", params={}))
        with transaction(engine) as session:
            assert session.query(TripletRow).count() == 2
            assert session.query(ProjectionRow).filter_by(method="statistics").one().cancel_requested is False
            session.delete(session.get(Run, 1))  # the rebuilt tables still cascade with their run
        with transaction(engine) as session:
            assert (session.query(TripletRow).count(), session.query(ProjectionRow).count()) == (0, 0)
    finally:
        engine.dispose()


def test_ids_are_never_reused_after_upgrading_a_database_that_reused_them(lab_home):
    """A first-version database (runs, datasets and maps without AUTOINCREMENT on SQLite): after
    the upgrade a new run gets an id past every one in evidence (a deleted run whose folder is
    left), and the newest run, dataset and map deleted afterwards never give their id again."""
    from storage.schema import Dataset, ProjectionRow, Run

    url = database_url()
    old = create_engine(url)
    postgres = old.dialect.name == "postgresql"
    with old.begin() as connection:
        for statement in _FIRST_VERSION:
            connection.execute(text(statement.format(
                id="SERIAL NOT NULL" if postgres else "INTEGER NOT NULL", time="TIMESTAMP" if postgres else "DATETIME",
                float="DOUBLE PRECISION" if postgres else "DOUBLE")))
        for _ in range(2):
            connection.execute(text(
                "INSERT INTO runs (dataset_id, kind, config, status, cancel_requested, created_at, epoch, step, "
                "total_steps) VALUES (1, 'train', '{}', 'completed', false, '2026-10-02 09:00:00', 1, 4, 4)"))
        assert connection.execute(text("SELECT max(id) FROM runs")).scalar() == 3
        connection.execute(text("DELETE FROM runs WHERE id = 3"))  # an earlier version's delete left its folder
    old.dispose()
    (lab_home / "runs" / "3").mkdir(parents=True)
    (lab_home / "runs" / "3" / "worker.log").write_text("run 3's")
    if not postgres:  # the old shape: the next id would have been 3 again
        with create_engine(url).connect() as connection:
            assert "AUTOINCREMENT" not in connection.execute(text(
                "SELECT sql FROM sqlite_master WHERE name = 'runs'")).scalar().upper()

    engine = make_engine()
    try:
        if not postgres:
            with engine.connect() as connection:
                for table in ("runs", "datasets", "projections"):
                    assert "AUTOINCREMENT" in connection.execute(text(
                        "SELECT sql FROM sqlite_master WHERE name = :t"), {"t": table}).scalar().upper()
        ids = []
        for _ in range(2):
            with transaction(engine) as session:
                run = Run(dataset_id=1, kind="train", config={})
                session.add(run)
                session.flush()
                ids.append(run.id)
                session.add(ProjectionRow(run_id=run.id, method="umap", params_key="k", params={}))
                session.add(Dataset(name=f"new-{run.id}", source="upload", n_images=0, image_size=8, channels=1,
                                    folder="x"))
            with transaction(engine) as session:  # the newest of each deleted again
                newest_dataset = session.query(Dataset).order_by(Dataset.id.desc()).first()
                ids.append(("dataset", newest_dataset.id))
                session.delete(newest_dataset)
                session.delete(session.get(Run, run.id))
        assert ids[0] == 4  # past run 3, whose folder is still there
        assert ids[2] == 5  # not 4 again, though run 4 was the newest when it was deleted
        assert ids[3][1] > ids[1][1]  # nor a deleted dataset's id
        with transaction(engine) as session:
            assert [r.id for r in session.query(Run).order_by(Run.id)] == [1, 2]  # the old rows kept
            assert session.query(ProjectionRow).count() == 1  # run 1's map; the deleted runs' went with them
            run = Run(dataset_id=1, kind="train", config={})
            session.add(run)
            session.flush()
            projection = ProjectionRow(run_id=run.id, method="umap", params_key="k", params={})
            session.add(projection)
            session.flush()
            assert run.id == 6 and projection.id > 3
    finally:
        engine.dispose()


def test_a_failed_migration_names_its_revision_and_changes_nothing(lab_home, monkeypatch):
    """0002 adds job_id to runs, then to projections: a failure at the second leaves no trace of
    the first, on SQLite too (whose driver would commit each ALTER on its own)."""
    from alembic.operations import Operations

    url = database_url()
    _previous_schema(url, stamped=True)
    real = Operations.add_column

    def add_column(self, table_name, column, **kwargs):
        if table_name == "projections":
            raise RuntimeError("no space left on device")
        return real(self, table_name, column, **kwargs)

    monkeypatch.setattr(Operations, "add_column", add_column)
    with pytest.raises(StorageError) as failed:
        make_engine()
    assert str(failed.value) == (f"cannot upgrade the database {url} to schema revision 0002 (from 0001); "
                                 "nothing was changed: no space left on device")
    check = create_engine(url)
    with check.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0001"
        assert "job_id" not in {c["name"] for c in inspect(connection).get_columns("runs")}
    check.dispose()
    monkeypatch.undo()
    make_engine().dispose()  # the next start migrates it


def test_a_database_from_a_newer_version_is_refused_with_a_sentence(any_engine):
    with any_engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    with pytest.raises(StorageError, match=r"^the database \S+ is at schema revision '0099', which this version of "
                                           r"the app does not know: a newer version upgraded it; "):
        make_engine()


def test_the_last_migration_goes_down_and_up_again_with_every_row(any_engine):
    """job_id dropped and added again; on SQLite without rebuilding runs (which would take its
    epochs, triplets and maps with it through ON DELETE CASCADE)."""
    from alembic import command

    from storage.schema import Dataset, EpochRow, ProjectionRow, Run, TripletRow

    with transaction(any_engine) as session:
        dataset = Dataset(name="d", source="upload", n_images=1, image_size=8, channels=1, classes=[], folder="x")
        session.add(dataset)
        session.flush()
        run = Run(dataset_id=dataset.id, kind="train", config={}, job_id="raysubmit_1")
        session.add(run)
        session.flush()
        session.add_all([EpochRow(run_id=run.id, epoch=1, loss=0.5, easy=1, semi_hard=1, hard=1, seconds=1.0),
                         TripletRow(run_id=run.id, epoch=1, anchor=0, positive=1, category="similar"),
                         ProjectionRow(run_id=run.id, method="umap", params_key="k", params={}, job_id="raysubmit_2")])
    with any_engine.begin() as connection:  # the app's connections: SQLite's foreign keys on
        command.downgrade(_alembic_config(connection), "0001")
        assert "job_id" not in {c["name"] for c in inspect(connection).get_columns("runs")}
    engine = make_engine()
    try:
        with transaction(engine) as session:
            assert [session.query(table).count() for table in (Run, EpochRow, TripletRow, ProjectionRow)] == [1, 1, 1, 1]
            assert session.query(Run).one().job_id is None  # the column is back, empty
    finally:
        engine.dispose()


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
    assert outcomes == [("ok", head_revision())] * 3


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
    from core.training.config import RunConfig
    from core.runs.jobs import create_training_run, start_worker
    from core.runs.worker import run_summary
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
