import re
from datetime import timedelta

import numpy as np
import pytest
from sqlalchemy import select, text

from core.data.datasets import load_arrays, save_dataset
from storage import artifacts, queries
from storage.db import make_engine, transaction
from storage.schema import EpochRow, Run, TripletRow, utcnow


@pytest.fixture
def lab_home(any_home):
    """Every test here that takes lab_home (or engine) runs on SQLite and on PostgreSQL
    (conftest's any_home); those of files and SQLite alone take sqlite_home."""
    return any_home


def _tiny_dataset(engine, name="tiny", n=10):
    pixels = np.random.default_rng(0).integers(0, 255, size=(n, 8, 8, 1), dtype=np.uint8)
    labels = ["a" if i % 2 else "b" for i in range(n)]
    return save_dataset(engine, name, "upload", pixels, labels, [f"{i}.png" for i in range(n)],
                        [f"h{i}" for i in range(n)]), pixels


def test_sqlite_connections_use_wal_busy_timeout_and_foreign_keys(sqlite_home):
    engine = make_engine()
    with engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA busy_timeout")).scalar() >= 1000
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1


def test_dataset_round_trip(engine, lab_home):
    dataset_id, pixels = _tiny_dataset(engine)
    arrays = load_arrays(engine, dataset_id)
    np.testing.assert_array_equal(arrays.pixels, pixels)
    assert arrays.classes == ["a", "b"]
    assert list(arrays.labels) == [0 if i % 2 else 1 for i in range(10)]  # a=0, b=1
    assert set(arrays.split) <= {"train", "test"} and (arrays.split == "test").sum() == 2
    with transaction(engine) as session:
        assert queries.class_counts(session, dataset_id) == {0: 5, 1: 5}
    # a second engine (another process would make its own) sees the same data
    other = make_engine()
    np.testing.assert_array_equal(load_arrays(other, dataset_id).pixels, pixels)


def test_failed_dataset_save_leaves_nothing_behind(engine, lab_home):
    _tiny_dataset(engine, "kept")
    before = sorted(p.name for p in (lab_home / "datasets").iterdir())
    with pytest.raises(ValueError, match="already exists"):
        _tiny_dataset(engine, "kept")
    with pytest.raises(Exception):
        # duplicate hashes break the unique constraint inside the transaction
        save_dataset(engine, "broken", "upload", np.zeros((2, 8, 8, 1), np.uint8), None, ["x", "y"], ["same", "same"])
    with transaction(engine) as session:
        assert [d.name for d in queries.list_datasets(session)] == ["kept"]
    assert sorted(p.name for p in (lab_home / "datasets").iterdir()) == before
    assert not any((lab_home / "tmp").iterdir())


def test_silent_runs_become_interrupted_and_delete_cascades(engine):
    dataset_id, _ = _tiny_dataset(engine)
    with transaction(engine) as session:
        stale = Run(dataset_id=dataset_id, kind="train", config={}, status="running",
                    heartbeat_at=utcnow() - timedelta(minutes=5))
        fresh = Run(dataset_id=dataset_id, kind="train", config={}, status="running", heartbeat_at=utcnow())
        session.add_all([stale, fresh])
        session.flush()
        session.add(EpochRow(run_id=stale.id, epoch=1, loss=0.5, easy=1, semi_hard=2, hard=3, seconds=1.0))
        session.add(TripletRow(run_id=stale.id, epoch=1, anchor=0, positive=1, negative=2, d_ap=0.1, d_an=0.2,
                               category="semi-hard"))
        stale_id, fresh_id = stale.id, fresh.id
    from core.runs import lifecycle  # noqa: F401  (its load events derive a row's liveness)

    with transaction(engine) as session:  # a silent run reads interrupted; nothing is written
        assert session.get(Run, stale_id).status == "interrupted"
        assert "heartbeat" in session.get(Run, stale_id).reason
        assert session.get(Run, fresh_id).status == "running"
        assert session.scalar(select(Run.status).where(Run.id == stale_id)) == "running"
        queries.delete_run_rows(session, stale_id)
    with transaction(engine) as session:
        assert session.get(Run, stale_id) is None
        assert queries.epoch_rows(session, [stale_id]) == []
        assert queries.triplet_rows(session, stale_id, 1) == []


def test_array_writes_are_atomic(sqlite_home, monkeypatch):
    path = sqlite_home / "x.npy"
    artifacts.save_array_atomic(path, np.arange(3))

    def broken_save(handle, array):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", broken_save)
    with pytest.raises(OSError):
        artifacts.save_array_atomic(path, np.arange(5))
    monkeypatch.undo()
    np.testing.assert_array_equal(np.load(path), np.arange(3))


def test_an_uploaded_folder_takes_labels_from_its_subfolders(engine):
    import io

    from PIL import Image

    from core.data.importing import import_uploads

    def png(value):
        buffer = io.BytesIO()
        Image.fromarray(np.full((9, 9), value, np.uint8)).save(buffer, "PNG")
        return buffer.getvalue()

    folder = [("pets/cats/a.png", png(10)), ("pets/cats/b.png", png(20)), ("pets/dogs/c.png", png(200))]
    report = import_uploads(engine, "pets", [], 16, folder_files=folder)
    assert report.classes == ["cats", "dogs"] and report.n_images == 3
    arrays = load_arrays(engine, report.dataset_id)
    assert sorted(arrays.labels.tolist()) == [0, 0, 1]


# --- settings that cannot work are one sentence, not a traceback ------------------------------

@pytest.fixture
def unwritable_folder(tmp_path):
    """A folder this process cannot write: chmod 555 for a normal user; as root (who writes
    anyway) a read-only mount such as /proc/sys, or skip."""
    import os
    from pathlib import Path

    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
    elif Path("/proc/sys").is_dir() and not os.access("/proc/sys", os.W_OK):
        yield Path("/proc/sys")
    else:
        pytest.skip("running as root with no read-only folder to test against")


def test_a_data_home_that_cannot_be_a_folder_is_a_storage_error(tmp_path, monkeypatch, unwritable_folder):
    from storage.settings import StorageError, data_home

    a_file = tmp_path / "file.txt"
    a_file.write_text("not a folder")
    monkeypatch.setenv("EMBEDDING_LAB_HOME", str(a_file))
    with pytest.raises(StorageError, match=rf"^the data folder {a_file} \(EMBEDDING_LAB_HOME\) exists but is not a folder"):
        data_home()
    monkeypatch.setenv("EMBEDDING_LAB_HOME", str(a_file / "lab"))
    with pytest.raises(StorageError, match=rf"^the data folder {a_file / 'lab'} \(EMBEDDING_LAB_HOME\) cannot be created: "):
        data_home()
    monkeypatch.setenv("EMBEDDING_LAB_HOME", str(unwritable_folder))
    with pytest.raises(StorageError, match=rf"^the data folder {unwritable_folder} .* is not writable by this process$"):
        data_home()
    monkeypatch.setenv("EMBEDDING_LAB_HOME", str(tmp_path / "new" / "lab"))
    assert data_home() == tmp_path / "new" / "lab" and data_home().is_dir()


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:", "sqlite:///file:lab?mode=memory&uri=true",
                                 "sqlite:///lab.db?mode=memory"])
def test_an_in_memory_database_is_refused(sqlite_home, monkeypatch, url):
    from storage.db import make_engine
    from storage.settings import StorageError, database_url

    monkeypatch.setenv("EMBEDDING_LAB_DB", url)
    message = (rf"^EMBEDDING_LAB_DB {re.escape(url)} is an in-memory SQLite database, so runs would be stored nowhere: "
               r"the worker processes cannot see an in-memory database; use a file path$")
    with pytest.raises(StorageError, match=message):
        database_url()
    with pytest.raises(StorageError, match="in-memory SQLite database"):
        make_engine()


def test_a_malformed_url_is_refused_with_its_password_hidden(sqlite_home, monkeypatch):
    from storage.settings import StorageError, database_url

    monkeypatch.setenv("EMBEDDING_LAB_DB", "postgres ql://bob:hunter2@db/lab")
    with pytest.raises(StorageError, match="is not a database URL SQLAlchemy understands") as caught:
        database_url()
    assert "bob:***@db" in str(caught.value) and "hunter2" not in str(caught.value)


def test_databases_that_cannot_be_opened_name_the_url(sqlite_home, tmp_path, unwritable_folder):
    from storage.db import make_engine
    from storage.settings import StorageError

    missing = tmp_path / "no-such-folder" / "lab.db"
    with pytest.raises(StorageError, match=rf"^cannot open the database sqlite:///{missing}: the folder "
                                           rf"{missing.parent} does not exist or is not a folder$"):
        make_engine(f"sqlite:///{missing}")
    with pytest.raises(StorageError, match=rf"the folder {unwritable_folder} is not writable by this process$"):
        make_engine(f"sqlite:///{unwritable_folder / 'lab.db'}")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is no SQLite file" * 200)
    with pytest.raises(StorageError, match=rf"^cannot open the database sqlite:///{garbage}: file is not a database$"):
        make_engine(f"sqlite:///{garbage}")
    with pytest.raises(StorageError, match=r"^cannot open the database nosuchdb://host/x: SQLAlchemy has no dialect 'nosuchdb'$"):
        make_engine("nosuchdb://host/x")
    # a server that is not there (port 1 refuses at once) or a driver that is not installed
    with pytest.raises(StorageError, match=r"^cannot open the database postgresql\+psycopg2://bob:\*\*\*@127.0.0.1:1/lab: ") as caught:
        make_engine("postgresql+psycopg2://bob:hunter2@127.0.0.1:1/lab")
    assert "hunter2" not in str(caught.value) and "\n" not in str(caught.value)


# --- temporary files carry their writer's pid; a dead writer's are cleaned ---------------------

def test_temporary_names_carry_the_writers_pid(sqlite_home, monkeypatch):
    import os

    folder = artifacts.new_temp_folder()
    assert folder.parent == sqlite_home / "tmp" and folder.name.startswith(f"{os.getpid()}-")
    seen = []
    real_save = np.save

    def spying_save(handle, array):
        seen.append(os.path.basename(handle.name))
        real_save(handle, array)

    monkeypatch.setattr(np, "save", spying_save)
    artifacts.save_array_atomic(sqlite_home / "x.npy", np.arange(3))
    assert seen == [f"x.npy.{os.getpid()}.tmp"]
    assert sorted(p.name for p in sqlite_home.iterdir()) == ["tmp", "x.npy"]


_DIES_MID_WRITE = """
import os
from pathlib import Path
from storage import artifacts
folder = artifacts.new_temp_folder()
(folder / "pixels.npy").write_bytes(b"half")
from storage.run_files import RunFiles
run = RunFiles(7).make()
artifacts.temp_file_for(run / "embeddings.npy").write_bytes(b"half")
artifacts.temp_file_for(run / "encoder.safetensors").write_bytes(b"half")
os._exit(1)  # a crash: nothing is cleaned up
"""


def test_clean_leftovers_removes_a_dead_writers_files_and_never_a_live_ones(sqlite_home):
    import os
    import subprocess
    import sys
    from pathlib import Path

    subprocess.run([sys.executable, "-c", _DIES_MID_WRITE], env=dict(os.environ, EMBEDDING_LAB_HOME=str(sqlite_home)),
                   cwd=Path(__file__).resolve().parents[1], timeout=120)
    dead = [p for p in sqlite_home.rglob("*") if p.name.endswith(".tmp") or p.parent.name == "tmp"]
    assert len(dead) == 3  # one temp folder, two temp files, all named with the dead child's pid
    # this process's own temp files, a file of the same shape from a live process, and plain files
    mine = artifacts.new_temp_folder()
    (mine / "pixels.npy").write_bytes(b"being written")
    my_file = artifacts.temp_file_for(sqlite_home / "runs" / "7" / "projection.npy")
    my_file.write_bytes(b"being written")
    parent_pid_file = sqlite_home / "runs" / "7" / f"x.npy.{os.getppid()}.tmp"
    parent_pid_file.write_bytes(b"a live process's")
    kept = [sqlite_home / "runs" / "7" / "embeddings.npy", sqlite_home / "notes.tmp", sqlite_home / "tmp" / "tmpabc123"]
    kept[0].write_bytes(b"final")
    kept[1].write_bytes(b"no pid in the name")
    kept[2].mkdir()

    assert artifacts.clean_leftovers() == 3
    assert not any(p.exists() for p in dead)
    assert mine.is_dir() and (mine / "pixels.npy").exists() and my_file.exists() and parent_pid_file.exists()
    assert all(p.exists() for p in kept)
    assert artifacts.clean_leftovers() == 0


def test_clean_leftovers_treats_an_impossible_pid_as_dead(sqlite_home):
    from pathlib import Path

    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text()) if Path("/proc/sys/kernel/pid_max").exists() else 2**22
    gone = sqlite_home / "tmp" / f"{pid_max + 1}-abcd"
    gone.mkdir(parents=True)
    (gone / "pixels.npy").write_bytes(b"x")
    assert artifacts.clean_leftovers() == 1 and not gone.exists()


def test_a_database_from_before_pair_rows_keeps_its_triplets_and_takes_pairs(lab_home):
    """Earlier versions made every triplet member NOT NULL; a pair row has no negative (or no
    positive). Opening such a database rebuilds the table with its rows kept."""
    from sqlalchemy import inspect as inspect_db

    from storage.schema import Dataset

    engine = make_engine()
    with transaction(engine) as session:
        dataset = Dataset(name="d", source="upload", n_images=1, image_size=8, channels=1, classes=[], folder="x")
        session.add(dataset)
        session.flush()
        session.add(Run(id=7, dataset_id=dataset.id, kind="train", config={}))
    with engine.begin() as connection:  # the table as an earlier version made it, with one row
        connection.execute(text("DROP TABLE alembic_version"))  # those versions had no migrations
        connection.execute(text("DROP TABLE triplets"))
        connection.execute(text(
            f"CREATE TABLE triplets (id {'SERIAL' if engine.dialect.name == 'postgresql' else 'INTEGER'} PRIMARY KEY, run_id INTEGER NOT NULL REFERENCES runs (id) "
            "ON DELETE CASCADE, epoch INTEGER NOT NULL, anchor INTEGER NOT NULL, positive INTEGER NOT NULL, "
            "negative INTEGER NOT NULL, d_ap FLOAT NOT NULL, d_an FLOAT NOT NULL, category VARCHAR(12) NOT NULL)"))
        connection.execute(text("INSERT INTO triplets (run_id, epoch, anchor, positive, negative, d_ap, d_an, category) "
                                "VALUES (7, 1, 3, 4, 5, 0.25, 0.5, 'semi-hard')"))
    engine.dispose()
    engine = make_engine()
    try:
        columns = {c["name"]: c for c in inspect_db(engine).get_columns("triplets")}
        assert columns["negative"]["nullable"] and "loss" in columns and "weight" in columns
        with transaction(engine) as session:
            kept = session.get(TripletRow, 1)
            assert (kept.anchor, kept.positive, kept.negative, kept.d_ap, kept.category) == (3, 4, 5, 0.25, "semi-hard")
            session.add(TripletRow(run_id=7, epoch=1, anchor=3, positive=4, negative=None, d_ap=0.1, d_an=None,
                                   category="similar", loss=0.01))
        with transaction(engine) as session:
            assert len(queries.triplet_rows(session, 7, 1)) == 2
            session.delete(session.get(Run, 7))  # the rebuilt table still cascades with its run
        with transaction(engine) as session:
            assert len(queries.triplet_rows(session, 7, 1)) == 0
    finally:
        engine.dispose()


def test_every_lookup_of_a_missing_run_says_the_same_sentence(engine):
    """One get_run: the command line, the pages and the worker name a missing run alike."""
    from core.explore.export import load_export_data
    from core.explore.service import search_by_images
    from core.runs.jobs import delete_run, prepare_resume, start_projection
    from core.runs.worker import run_summary

    sentence = "run 404 does not exist; `python -m core runs` lists them"
    with transaction(engine) as session:
        with pytest.raises(LookupError) as raised:
            queries.get_run(session, 404)
    assert str(raised.value) == sentence
    _tiny_dataset(engine)  # a store with a dataset and no run
    lookups = [lambda: delete_run(engine, 404), lambda: prepare_resume(engine, 404),
               lambda: start_projection(engine, 404), lambda: run_summary(engine, 404),
               lambda: load_export_data(engine, 404), lambda: search_by_images(engine, 404, [(b"", "a.png")])]
    for lookup in lookups:
        with pytest.raises(LookupError) as raised:
            lookup()
        assert str(raised.value) == sentence
    with transaction(engine) as session:
        assert list(queries.list_runs(session)) == []  # no lookup made a row
