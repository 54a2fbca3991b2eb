"""Runs as jobs: create the row, start a worker process, cancel it, notice when it died.

A worker is `sys.executable -m core worker RUN_ID` in a new session, so it outlives a
browser tab, can be cancelled as a group, and never shares CUDA or an engine with its parent.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Optional

from sqlalchemy import Engine, delete, update

from core.config import RunConfig
from core.datasets import resolve_dataset
from storage import artifacts, queries
from storage.db import transaction
from storage.schema import EpochRow, Run, TripletRow, utcnow
from storage.settings import DB_ENV, HOME_ENV, data_home, database_url

PROJECT_ROOT = Path(__file__).resolve().parent.parent
STALE_AFTER = timedelta(seconds=60)
RESUMABLE = ("interrupted", "cancelled", "failed")
TRAINING_STATE_FILE = "training-state.safetensors"


def create_training_run(engine: Engine, cfg: RunConfig) -> int:
    """Queue a training run. Settings that cannot work on this dataset (labels asked for on an
    unlabeled one, a P×K batch that holds a single class) fail here with a sentence, before a
    row exists."""
    from core.augment import resolve_supervision  # torch is imported lazily there
    from core.sampler import pk_shape

    dataset = resolve_dataset(engine, cfg.dataset)
    supervision = resolve_supervision(cfg.supervision, cfg.loss, dataset.labeled)
    if supervision == "labels" and cfg.sampler == "pk":
        pk_shape(min(cfg.batch_size, dataset.n_images), cfg.samples_per_class, len(dataset.classes))
    with transaction(engine) as session:
        run = Run(dataset_id=dataset.id, kind="train", config=cfg.to_dict(), status="queued")
        session.add(run)
        session.flush()
        return run.id


def create_embedding_run(engine: Engine, dataset: str, checkpoint_bytes: bytes, checkpoint_name: str,
                         source_run: Optional[int] = None, device: str = "auto") -> int:
    """A run that embeds `dataset` with a stored or uploaded encoder checkpoint.

    The file is checked before anything is stored (CheckpointError names it and the reason).
    """
    from models.checkpoint import read_metadata  # torch-free check, but keep pages' imports light

    target = resolve_dataset(engine, dataset)
    staged = artifacts.new_temp_folder() / "encoder.safetensors"
    staged.write_bytes(checkpoint_bytes)
    try:
        meta = read_metadata(staged, checkpoint_name)
        with transaction(engine) as session:
            run = Run(dataset_id=target.id, kind="embed", status="queued", config={
                "dataset": target.name, "device": device, "source_run": source_run,
                "checkpoint_name": checkpoint_name, "encoder": meta["config"],
            })
            session.add(run)
            session.flush()
            folder = artifacts.run_folder(run.id)
            os.replace(staged, artifacts.absolute(folder) / "encoder.safetensors")
            run.checkpoint = f"{folder}/encoder.safetensors"
            run.config = dict(run.config, checkpoint=run.checkpoint)
            return run.id
    finally:
        staged.unlink(missing_ok=True)
        staged.parent.rmdir()


def start_worker(engine: Engine, run_id: int, resume: bool = False) -> int:
    """Start the worker process for a queued run (resume=True: one that prepare_resume queued
    again); returns its pid."""
    pid = _spawn(["worker", str(run_id)] + (["--resume"] if resume else []), run_id, "worker.log")
    with transaction(engine) as session:
        session.execute(update(Run).where(Run.id == run_id, Run.pid.is_(None))
                        .values(pid=pid, host=socket.gethostname(), heartbeat_at=utcnow()))
    return pid


def _spawn(arguments: list[str], run_id: int, log_name: str) -> int:
    """`python -m core ARGUMENTS` in a new session, with this process's data home and database."""
    env = dict(os.environ, **{HOME_ENV: str(data_home()), DB_ENV: database_url()})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    with open(artifacts.absolute(artifacts.run_folder(run_id)) / log_name, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "core", *arguments], cwd=PROJECT_ROOT, env=env,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    return process.pid


def training_state_path(run_id: int) -> Path:
    """Where a training run checkpoints what resuming needs, every epoch."""
    return artifacts.absolute(f"runs/{run_id}") / TRAINING_STATE_FILE


def resumable_epoch(run: Run) -> Optional[int]:
    """The epoch a finished-but-unfinished training run would continue after, or None when it
    cannot be resumed (it completed, is active, is not a training run, or has no training state)."""
    from models.checkpoint import CheckpointError, read_training_state_info  # no torch

    if run.kind != "train" or run.status not in RESUMABLE:
        return None
    try:
        return int(read_training_state_info(training_state_path(run.id))["epoch"])
    except (CheckpointError, KeyError, ValueError, TypeError):
        return None


def prepare_resume(engine: Engine, run_id: int) -> int:
    """Queue an interrupted, cancelled or failed training run again to continue from its last
    checkpoint; returns that checkpoint's epoch. Epoch and triplet rows past it (written just
    before the worker died) are deleted, so each epoch ends up stored once. Raises ValueError or
    LookupError with a sentence when the run cannot be resumed."""
    with transaction(engine) as session:
        run = session.get(Run, run_id)
        if run is None:
            raise LookupError(f"run {run_id} does not exist")
        if run.kind != "train":
            raise ValueError(f"run {run_id} embeds with a stored encoder; only training runs can be resumed")
        if run.status not in RESUMABLE:
            raise ValueError(f"run {run_id} is {run.status}; only {', '.join(RESUMABLE)} runs can be resumed")
        epoch = resumable_epoch(run)
        if epoch is None:
            raise ValueError(f"run {run_id} stopped before its first epoch ended, so it has no checkpoint "
                             "to resume from; start a new run")
        for table in (EpochRow, TripletRow):
            session.execute(delete(table).where(table.run_id == run_id, table.epoch > epoch))
        # a fresh heartbeat, so refresh_liveness does not take the queued run for a dead one
        run.status, run.reason, run.finished_at, run.cancel_requested = "queued", None, None, False
        run.pid, run.phase, run.epoch, run.heartbeat_at = None, None, epoch, utcnow()
        return epoch


def resume_run(engine: Engine, run_id: int) -> int:
    """prepare_resume, then a worker process that continues the run; returns its pid."""
    prepare_resume(engine, run_id)
    return start_worker(engine, run_id, resume=True)


def cancel_run(engine: Engine, run_id: int) -> None:
    """Ask the worker to stop (flag + SIGTERM to its process group); a queued run ends at once."""
    with transaction(engine) as session:
        run = session.get(Run, run_id)
        if run is None or run.status not in queries.ACTIVE:
            return
        run.cancel_requested = True
        pid, host = run.pid, run.host
        if pid is None:
            run.status, run.finished_at, run.reason = "cancelled", utcnow(), "cancelled before it started"
            return
    if host == socket.gethostname():
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass


def refresh_liveness(engine: Engine, stale_after: timedelta = STALE_AFTER) -> None:
    """Mark runs whose worker died as interrupted: silent past `stale_after`, or whose process
    on this machine is gone."""
    with transaction(engine) as session:
        queries.mark_silent_runs(session, stale_after)
        here = socket.gethostname()
        for run in queries.list_runs(session):
            if run.status in queries.ACTIVE and run.pid and run.host == here and not _alive(run.pid):
                run.status, run.finished_at = "interrupted", utcnow()
                run.reason = "the worker process ended without finishing the run"


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our own child, so it is not a zombie
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ", 1)[1][0] not in "ZX"
    except (FileNotFoundError, IndexError):
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True


def delete_run(engine: Engine, run_id: int) -> None:
    """Delete a finished run, its rows and its files; an active run is cancelled first."""
    cancel_run(engine, run_id)
    with transaction(engine) as session:
        queries.delete_run_rows(session, run_id)
    artifacts.remove_folder(f"runs/{run_id}")


def start_projection(engine: Engine, run_id: int) -> int:
    """Compute the run's default UMAP in a process of its own (umap's import and compilation
    take tens of seconds); the Explore page polls the projection row."""
    from core.projection import UMAP_DEFAULTS, params_key

    with transaction(engine) as session:
        queries.projection_running(session, run_id, "umap", dict(UMAP_DEFAULTS), params_key(UMAP_DEFAULTS))
    return _spawn(["project", "--run", str(run_id)], run_id, "projection.log")
