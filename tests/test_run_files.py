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
    from tests.test_lifecycle import reap

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
        with monkeypatch.context() as patch:  # what the liveness check does after its window of silence
            patch.setattr(lifecycle, "STALE_AFTER", timedelta(0))
            lifecycle.mark_dead(engine)
        resumed = prepare_resume(engine, run_id)
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

