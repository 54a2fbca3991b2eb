"""A run's paths have one owner (storage.run_files.RunFiles); a writer's epoch files get new names
and the row's checkpoint says which are current."""
import re
from pathlib import Path

import pytest

from storage.run_files import RunFiles

ROOT = Path(__file__).resolve().parents[1]
# a path under a run's folder spelled by hand: f"runs/{...}", "runs/" + ..., / "runs" / ...
HAND_SPELLED = re.compile(r"""f["'][^"'\n]*\bruns/|["']runs/["']\s*\+|/\s*["']runs["']""")


def test_no_module_outside_run_files_spells_a_run_path():
    offenders = []
    for folder in ("core", "pages", "storage", "models"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name == "run_files.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if HAND_SPELLED.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_the_pattern_catches_the_spellings_it_forbids():
    assert HAND_SPELLED.search('relative = f"runs/{run_id}/embeddings.npy"')
    assert HAND_SPELLED.search("home / 'runs' / str(run_id)")
    assert not HAND_SPELLED.search("- `runs/<id>/probe/positions.npy`: the probe's positions")


def test_a_training_state_is_found_from_the_encoder_its_row_names(sqlite_home):
    files = RunFiles(7)
    encoder = files.epoch_encoder(3, "0123456789abcdef0123")
    assert encoder == "runs/7/encoder-epoch-3-0123456789ab.safetensors"
    assert files.training_state_for(encoder) == "runs/7/training-state-epoch-3-0123456789ab.safetensors"
    # a run of an earlier version (fixed names), or a row that names no encoder yet
    assert files.training_state_for(files.encoder) == "runs/7/training-state.safetensors"
    assert files.training_state_for(None) == "runs/7/training-state.safetensors"
    assert files.absolute(Path(encoder).name) == sqlite_home / encoder


def test_stale_epoch_files_are_every_epoch_pair_but_the_current_one(sqlite_home):
    files = RunFiles(4)
    files.make()
    current = files.epoch_encoder(2, "b" * 32)
    names = [current, files.training_state_for(current), files.epoch_encoder(2, "a" * 32),
             files.training_state_for(files.epoch_encoder(2, "a" * 32)), files.epoch_encoder(1, "b" * 32),
             files.encoder, files.training_state_for(None), files.relative("embeddings.npy")]
    for name in names:
        (sqlite_home / name).write_bytes(b"x")
    stale = {p.name for p in files.stale_epoch_files(current)}
    assert stale == {Path(n).name for n in names[2:5]}  # fixed names and other files are never stale
    assert len(files.stale_epoch_files(None)) == 5


def _stopped(pid: int, timeout: float = 300) -> None:
    """Wait until process `pid` has stopped itself (state T in /proc)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]
        except (FileNotFoundError, IndexError):
            raise AssertionError(f"process {pid} ended before its pause point") from None
        if state == "T":
            return
        time.sleep(0.1)
    raise AssertionError(f"process {pid} never reached its pause point")


def _what_readers_get(engine, run_id: int, tmp_path, tag: str) -> dict:
    """The completed run as every reader sees it: its row's files (bytes), a search by image,
    the neighbours from its index, and its encoder export."""
    from core.explore import export, service
    from core.explore.service import dataset_pixels
    from core.runs.jobs import training_state_path
    from PIL import Image
    import io
    from storage import artifacts
    from storage.db import transaction
    from storage.schema import Run

    with transaction(engine) as session:
        run = session.get(Run, run_id)
        row = (run.status, run.epoch, run.checkpoint, run.embeddings)
        files = {name: artifacts.absolute(name).read_bytes() for name in (run.checkpoint, run.embeddings)}
        files["training state"] = training_state_path(run).read_bytes()
        pixels = dataset_pixels(engine, run.dataset_id)
    service._cached_encoder.cache_clear()
    image = io.BytesIO()
    Image.fromarray(pixels[5, :, :, 0]).save(image, format="PNG")
    hits = service.search_by_image(engine, run_id, image.getvalue(), "query.png", k=5)
    out = export.export_run(engine, run_id, "safetensors", tmp_path / f"{tag}.safetensors")
    return {"row": row, "files": files, "search": [h["position"] for h in hits],
            "neighbours": [h["position"] for h in service.neighbours(service.load_run_index(engine, run_id), 5)],
            "export": out.read_bytes()}


def test_a_worker_stopped_between_its_epoch_commit_and_its_files_never_overwrites_the_run_that_took_it_over(
        any_engine, tmp_path, monkeypatch):
    """Fault 2 of issue 16: the worker stops itself (SIGSTOP) right after committing epoch 2; the
    run is declared interrupted, resumed in this process and completed at epoch 3; then the
    stopped worker is woken. The completed run's encoder, training state and embeddings stay
    byte for byte what they were, and search and export give the same answers."""
    import os
    import signal
    from datetime import timedelta

    from core.runs import lifecycle
    from core.runs.jobs import create_training_run, prepare_resume, start_worker
    from core.runs.worker import PAUSE_ENV, execute_run
    from core.training.config import RunConfig
    from storage.db import transaction
    from storage.schema import Run
    from tests.helpers import reap

    engine = any_engine
    run_id = create_training_run(engine, RunConfig(dataset="digits", epochs=3, batch_size=64))
    monkeypatch.setenv(PAUSE_ENV, "epoch-2-committed")
    stale = start_worker(engine, run_id, project=False)
    monkeypatch.delenv(PAUSE_ENV)
    try:
        _stopped(stale)
        with transaction(engine) as session:
            run = session.get(Run, run_id)
            assert (run.status, run.epoch) == ("running", 2)  # committed, stopped before anything after
            stale_encoder = run.checkpoint
        with monkeypatch.context() as patch:  # past its window of silence the run reads interrupted
            patch.setattr(lifecycle, "STALE_AFTER", timedelta(0))
            resumed = prepare_resume(engine, run_id)  # and the resume takes it over
        assert execute_run(engine, run_id, project=False, resume=True)["status"] == "completed"
        before = _what_readers_get(engine, run_id, tmp_path, "before")
        assert before["row"][:2] == ("completed", 3)
    finally:
        os.kill(stale, signal.SIGCONT)
    assert reap(stale, timeout=240) == 0  # it wakes, finds the run is not its own, and leaves
    after = _what_readers_get(engine, run_id, tmp_path, "after")
    assert after["row"] == before["row"]
    for name, data in before["files"].items():
        assert after["files"][name] == data, f"{name} changed"
    assert (after["search"], after["neighbours"]) == (before["search"], before["neighbours"])
    assert after["export"] == before["export"]
    assert before["row"][2] != stale_encoder  # the taken-over run's encoder has a name of its own
    assert resumed == 2  # the row's epoch and the training state it names agree: no epoch trained twice
    # the run's folder holds only the current epoch pair, and no process's staging
    folder = RunFiles(run_id).absolute()
    assert RunFiles(run_id).stale_epoch_files(keep=before["row"][2]) == []
    assert not list(folder.glob(".staging-*"))


class _FullLog:
    """A log file on a full disk: every write fails with ENOSPC."""

    def write(self, text):
        import errno

        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self):
        pass


def test_a_full_disk_is_the_runs_reason_even_when_the_workers_log_cannot_be_written(sqlite_home, monkeypatch):
    """Fault 4 (the full disk) of issue 16: the checkpoint write fails with ENOSPC inside a
    worker whose stdout and stderr (its log) fail too; the run fails with a sentence naming the
    run's folder, and the worker exits non-zero instead of dying on its own log."""
    import errno
    import sys

    import core.runs.worker as worker
    from core.cli import main
    from core.runs.jobs import create_training_run
    from core.training.config import RunConfig
    from storage.db import make_engine, transaction
    from storage.schema import Run

    engine = make_engine()
    run_id = create_training_run(engine, RunConfig(dataset="digits", epochs=1, batch_size=128))

    def no_space(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    with monkeypatch.context() as patch:
        patch.setattr(worker, "save_checkpoint", no_space)
        patch.setattr(sys, "stdout", _FullLog())
        patch.setattr(sys, "stderr", _FullLog())
        code = main(["worker", str(run_id), "--no-projection"])
    assert code == 1
    with transaction(engine) as session:
        run = session.get(Run, run_id)
        assert (run.status, run.reason) == (
            "failed", f"the disk is full: there is no space left to write in {RunFiles(run_id).absolute()}")
    assert not list(RunFiles(run_id).absolute().glob(".staging-*"))
    engine.dispose()


def test_a_full_disk_is_one_line_from_the_command_line_and_names_the_folder(sqlite_home, monkeypatch, capsys):
    """An array write (numpy) that fails with ENOSPC and names no file: `train` prints its one
    JSON line with the reason and exits 1; a worker whose log cannot be opened is never started
    and its run is failed with the reason, not left queued."""
    import errno
    import json

    import numpy as np

    from core.cli import main
    from core.data.datasets import resolve_dataset
    from core.runs import launch
    from core.runs.jobs import create_training_run, start_worker
    from core.training.config import RunConfig
    from storage.db import make_engine, transaction
    from storage.schema import Run

    real_save = np.save

    def no_space(file, array, *args, **kwargs):
        if hasattr(file, "write"):  # the run's arrays, written through a handle; not the dataset's import
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(file, array, *args, **kwargs)

    train = ["train", "--dataset", "digits", "--epochs", "1", "--batch-size", "128", "--no-projection"]
    with monkeypatch.context() as patch:  # the built-in dataset's import fails first: before any run
        patch.setattr(np, "save", no_space)
        assert main(train) == 2
    printed = capsys.readouterr()
    assert printed.out == ""
    assert printed.err == f"error: the disk is full: there is no space left to write in {sqlite_home}\n"

    engine = make_engine()
    resolve_dataset(engine, "digits")  # imported now; the run's own writes fail
    engine.dispose()
    with monkeypatch.context() as patch:
        patch.setattr(np, "save", no_space)
        code = main(train)
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 1 and len(lines) == 1
    summary = json.loads(lines[0])
    assert summary["status"] == "failed"
    assert summary["reason"] == (f"the disk is full: there is no space left to write in "
                                 f"{RunFiles(summary['run_id']).absolute()}")

    engine = make_engine()
    run_id = create_training_run(engine, RunConfig(dataset="digits", epochs=1, batch_size=128))

    def log_on_a_full_disk(self, name):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.absolute(name)))

    with monkeypatch.context() as patch:
        patch.setattr(RunFiles, "log", log_on_a_full_disk)
        with pytest.raises(launch.LaunchError, match="^the disk is full: there is no space left to write in "):
            start_worker(engine, run_id)
    with transaction(engine) as session:
        run = session.get(Run, run_id)
        assert (run.status, run.reason) == (
            "failed", f"the disk is full: there is no space left to write in {RunFiles(run_id).absolute()}")
    engine.dispose()


def test_a_run_of_the_previous_version_resumes_from_its_fixed_names_and_exports(sqlite_home, tmp_path):
    """A run stopped after epoch 1 by the previous version (encoder.safetensors and
    training-state.safetensors, named by its row) resumes from them, completes, and exports;
    its fixed-name files go once its new epoch is current."""
    import os

    from core.explore import export
    from core.runs.jobs import create_training_run, prepare_resume
    from core.runs.worker import execute_run
    from core.training.config import RunConfig
    from core.training.loop import Cancelled
    from models.checkpoint import read_training_state_info
    from storage import artifacts, queries
    from storage.db import make_engine, transaction
    from storage.schema import Run

    engine = make_engine()
    run_id = create_training_run(engine, RunConfig(dataset="digits", epochs=2, batch_size=128))

    def stop_in_epoch_two(progress):
        if progress.epoch == 2:
            raise Cancelled()

    assert execute_run(engine, run_id, on_step=stop_in_epoch_two, project=False)["status"] == "cancelled"
    files = RunFiles(run_id)
    with transaction(engine) as session:  # the files as the previous version named them
        run = session.get(Run, run_id)
        os.replace(artifacts.absolute(files.training_state_for(run.checkpoint)),
                   artifacts.absolute(files.training_state_for(None)))
        os.replace(artifacts.absolute(run.checkpoint), artifacts.absolute(files.encoder))
        run.checkpoint = files.encoder
    assert read_training_state_info(artifacts.absolute("runs/1/training-state.safetensors"))["epoch"] == 1

    assert prepare_resume(engine, run_id) == 1
    assert execute_run(engine, run_id, project=False, resume=True)["status"] == "completed"
    with transaction(engine) as session:
        run = session.get(Run, run_id)
        assert [e.epoch for e in queries.epoch_rows(session, [run_id])] == [1, 2]
        assert run.checkpoint.startswith(f"{files.folder}/encoder-epoch-2-")  # the resumed worker's own name
    assert not artifacts.absolute(files.encoder).exists()
    assert not artifacts.absolute(files.training_state_for(None)).exists()
    out = export.export_run(engine, run_id, "safetensors", tmp_path / "encoder.safetensors")
    assert out.read_bytes() == artifacts.absolute(run.checkpoint).read_bytes()
    engine.dispose()


def test_a_database_on_a_full_disk_says_so(sqlite_home, monkeypatch):
    """SQLite's 'disk I/O error' while the database's disk has no space left, and its own
    'database or disk is full', name the full disk and the folder."""
    import shutil
    import sqlite3
    from collections import namedtuple

    from sqlalchemy.exc import OperationalError

    import storage.db
    from storage.settings import StorageError

    usage = namedtuple("usage", "total used free")
    for message, free in (("disk I/O error", 4096), ("database or disk is full", 1 << 30)):
        def failing(engine, shown="the database"):
            raise OperationalError("PRAGMA journal_mode=WAL", None, sqlite3.OperationalError(message))

        with monkeypatch.context() as patch:
            patch.setattr(storage.db, "migrate", failing)
            patch.setattr(shutil, "disk_usage", lambda path: usage(1 << 40, (1 << 40) - free, free))
            with pytest.raises(StorageError) as refused:
                storage.db.make_engine()
        assert str(refused.value).endswith(f": the disk is full: there is no space left to write in {sqlite_home}")
    def io_error(engine, shown="the database"):
        raise OperationalError("PRAGMA journal_mode=WAL", None, sqlite3.OperationalError("disk I/O error"))

    with monkeypatch.context() as patch:  # an I/O error on a disk with room: SQLite's words, as before
        patch.setattr(storage.db, "migrate", io_error)
        patch.setattr(shutil, "disk_usage", lambda path: usage(1 << 40, 1 << 39, 1 << 39))
        with pytest.raises(StorageError, match=": disk I/O error$"):
            storage.db.make_engine()
