from datetime import timedelta

import numpy as np
import pytest
from sqlalchemy import text

from core.datasets import load_arrays, save_dataset
from storage import artifacts, queries
from storage.db import make_engine, transaction
from storage.schema import EpochRow, Run, TripletRow, utcnow


def _tiny_dataset(engine, name="tiny", n=10):
    pixels = np.random.default_rng(0).integers(0, 255, size=(n, 8, 8, 1), dtype=np.uint8)
    labels = ["a" if i % 2 else "b" for i in range(n)]
    return save_dataset(engine, name, "upload", pixels, labels, [f"{i}.png" for i in range(n)],
                        [f"h{i}" for i in range(n)]), pixels


def test_sqlite_connections_use_wal_busy_timeout_and_foreign_keys(engine):
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
    with transaction(engine) as session:
        assert queries.mark_silent_runs(session, timedelta(seconds=60)) == 1
    with transaction(engine) as session:
        assert session.get(Run, stale_id).status == "interrupted"
        assert "heartbeat" in session.get(Run, stale_id).reason
        assert session.get(Run, fresh_id).status == "running"
        queries.delete_run_rows(session, stale_id)
    with transaction(engine) as session:
        assert session.get(Run, stale_id) is None
        assert queries.epoch_rows(session, [stale_id]) == []
        assert queries.triplet_rows(session, stale_id, 1) == []


def test_array_writes_are_atomic(lab_home, monkeypatch):
    path = lab_home / "x.npy"
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

    from core.importing import import_uploads

    def png(value):
        buffer = io.BytesIO()
        Image.fromarray(np.full((9, 9), value, np.uint8)).save(buffer, "PNG")
        return buffer.getvalue()

    folder = [("pets/cats/a.png", png(10)), ("pets/cats/b.png", png(20)), ("pets/dogs/c.png", png(200))]
    report = import_uploads(engine, "pets", [], 16, folder_files=folder)
    assert report.classes == ["cats", "dogs"] and report.n_images == 3
    arrays = load_arrays(engine, report.dataset_id)
    assert sorted(arrays.labels.tolist()) == [0, 0, 1]
