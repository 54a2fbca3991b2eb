"""Runs one stored run to its end: train (or load) an encoder, embed the dataset, measure it,
project it. The app's worker process and `python -m core train` both call `execute_run`."""
from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from sqlalchemy import Engine, insert, update

from core import projection
from core.config import RunConfig
from core.datasets import DatasetArrays, load_arrays
from core.jobs import training_state_path
from core.metrics import retrieval_metrics
from core.training import Cancelled, EpochStats, StepProgress, TrainingState, embed, fit, resolve_device
from models.checkpoint import load_checkpoint, save_checkpoint
from storage import artifacts, queries
from storage.db import transaction
from storage.schema import EpochRow, Run, TripletRow, utcnow

HEARTBEAT_SECONDS = 5.0
PROGRESS_WRITE_SECONDS = 0.5


def execute_run(engine: Engine, run_id: int, on_step: Optional[Callable[[StepProgress], None]] = None,
                project: bool = True, resume: bool = False) -> dict:
    """Run `run_id` and store everything it makes; returns the run's summary (see `run_summary`).

    resume=True continues a training run from its training state (see core.jobs.prepare_resume,
    which queues it again): the epochs already stored are kept and training goes on after them.
    """
    with transaction(engine) as session:
        run = session.get(Run, run_id)
        if run is None:
            raise LookupError(f"run {run_id} does not exist")
        if run.status not in ("queued",):
            raise RuntimeError(f"run {run_id} is {run.status}, not queued")
        kind, config, dataset_id = run.kind, dict(run.config), run.dataset_id
        run.status, run.pid, run.host = "running", os.getpid(), socket.gethostname()
        run.heartbeat_at = utcnow()
        run.started_at = run.started_at or run.heartbeat_at  # a resumed run keeps its first start
        run.phase = "starting"

    stop_beating = _start_heartbeat(engine, run_id)
    previous_handler = _cancel_on_sigterm()
    try:
        device = resolve_device(config.get("device", "auto"))
        _update(engine, run_id, device=str(device))
        data = load_arrays(engine, dataset_id)
        if kind == "train":
            model = _train(engine, run_id, RunConfig.from_dict(config), data, on_step, resume)
        else:
            model = _load_encoder(config)
        _update(engine, run_id, phase="embedding")
        embeddings = embed(model, data.pixels, device)
        folder = artifacts.run_folder(run_id)
        artifacts.save_array_atomic(artifacts.absolute(folder) / "embeddings.npy", embeddings)
        metrics = _test_metrics(embeddings, data)
        _update(engine, run_id, embeddings=f"{folder}/embeddings.npy", metrics=metrics)
        if project:
            _update(engine, run_id, phase="projecting")
            try:
                compute_projection(engine, run_id, embeddings)
            except RuntimeError:
                pass  # the projection row holds the reason; the encoder and embeddings are good
        _finish(engine, run_id, "completed", None)
    except (Cancelled, KeyboardInterrupt):
        _finish(engine, run_id, "cancelled", "cancelled by the user")
    except Exception as exc:  # the run row must say why, whatever broke
        _finish(engine, run_id, "failed", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}")
    finally:
        stop_beating()
        signal.signal(signal.SIGTERM, previous_handler)
    return run_summary(engine, run_id)


def _train(engine: Engine, run_id: int, cfg: RunConfig, data: DatasetArrays,
           on_step: Optional[Callable[[StepProgress], None]], resume: bool = False) -> torch.nn.Module:
    _update(engine, run_id, phase="training")
    last_write = [0.0]
    folder = artifacts.run_folder(run_id)
    checkpoint = artifacts.absolute(folder) / "encoder.safetensors"
    state_path = training_state_path(run_id)

    def step_callback(progress: StepProgress) -> None:
        if on_step is not None:
            on_step(progress)
        now = time.monotonic()
        # small transactions, batched per interval, so the page's reads never wait long
        if now - last_write[0] >= PROGRESS_WRITE_SECONDS or progress.step == progress.total_steps:
            last_write[0] = now
            _update(engine, run_id, epoch=progress.epoch, step=progress.step, total_steps=progress.total_steps,
                    last_loss=progress.loss, recent_counts=progress.counts)

    def epoch_callback(stats: EpochStats, state: TrainingState) -> None:
        # The rows first, then the files. A worker killed in between leaves rows one epoch ahead
        # of the training state; resuming deletes the rows past the state's epoch and trains
        # that epoch again, so every epoch is stored exactly once.
        with transaction(engine) as session:
            session.add(EpochRow(run_id=run_id, epoch=stats.epoch, loss=stats.loss, easy=stats.counts["easy"],
                                 semi_hard=stats.counts["semi_hard"], hard=stats.counts["hard"], seconds=stats.seconds,
                                 gap_histogram=stats.gap_histogram))
            if stats.triplets:
                session.execute(insert(TripletRow), [dict(t, run_id=run_id, epoch=stats.epoch) for t in stats.triplets])
            session.execute(update(Run).where(Run.id == run_id).values(epoch=stats.epoch, heartbeat_at=utcnow()))
        state.save(state_path)
        save_checkpoint(checkpoint, state.model, cfg.to_dict(), int(data.pixels.shape[3]))
        _update(engine, run_id, checkpoint=f"{folder}/encoder.safetensors")

    return fit(cfg, data, step_callback, epoch_callback, should_stop=_cancel_flag_reader(engine, run_id),
               resume_from=state_path if resume else None)


def _load_encoder(config: dict) -> torch.nn.Module:
    path = artifacts.absolute(config["checkpoint"])
    model, _ = load_checkpoint(path, config.get("checkpoint_name"))
    return model


def _test_metrics(embeddings: np.ndarray, data: DatasetArrays) -> Optional[dict]:
    """Metrics on the held-out images (all images when the dataset has no test split)."""
    if data.labels is None:
        return None
    rows = data.test_index if len(data.test_index) >= 2 else np.arange(len(embeddings))
    try:
        metrics = retrieval_metrics(embeddings[rows], data.labels[rows])
    except ValueError:
        return None
    metrics["evaluated_on"] = "test" if len(data.test_index) >= 2 else "all"
    metrics["n_queries"] = int(len(rows))
    return metrics


def compute_projection(engine: Engine, run_id: int, embeddings: Optional[np.ndarray] = None,
                       params: Optional[dict] = None) -> Path:
    """Compute and store the run's UMAP for `params` (defaults if None); reuses a stored one."""
    params = dict(projection.UMAP_DEFAULTS if params is None else params)
    key = projection.params_key(params)
    folder = artifacts.run_folder(run_id)
    relative = f"{folder}/umap-{hashlib.sha1(key.encode()).hexdigest()[:12]}.npy"
    with transaction(engine) as session:
        row = queries.projection(session, run_id, "umap", key)
        if row is not None and row.status == "done":
            return artifacts.absolute(row.path)
        queries.projection_running(session, run_id, "umap", params, key, relative)
    try:
        if embeddings is None:
            with transaction(engine) as session:
                embeddings = np.load(artifacts.absolute(session.get(Run, run_id).embeddings))
        coords = projection.project_umap(embeddings, **params)
        artifacts.save_array_atomic(artifacts.absolute(relative), coords)
        status, reason = "done", None
    except Exception as exc:
        status, reason = "failed", f"{type(exc).__name__}: {exc}"
    with transaction(engine) as session:
        row = queries.projection(session, run_id, "umap", key)
        row.status, row.reason = status, reason
    if reason:
        raise RuntimeError(f"UMAP failed: {reason}")
    return artifacts.absolute(relative)


def run_summary(engine: Engine, run_id: int) -> dict:
    with transaction(engine) as session:
        run = session.get(Run, run_id)
        summary = {"run_id": run.id, "status": run.status, "device": run.device,
                   "seconds": round(run.seconds or 0.0, 2), "dataset_id": run.dataset_id, "kind": run.kind}
        if run.reason:
            summary["reason"] = run.reason.splitlines()[0]
        summary.update(run.metrics or {})
        return summary


def _update(engine: Engine, run_id: int, **values) -> None:
    with transaction(engine) as session:
        session.execute(update(Run).where(Run.id == run_id).values(heartbeat_at=utcnow(), **values))


def _finish(engine: Engine, run_id: int, status: str, reason: Optional[str]) -> None:
    _update(engine, run_id, status=status, reason=reason, finished_at=utcnow(), phase=None)


def _cancel_flag_reader(engine: Engine, run_id: int) -> Callable[[], bool]:
    """A `should_stop` for `fit` that reads the run's cancel flag at most twice a second."""
    last_read = [0.0]

    def should_stop() -> bool:
        now = time.monotonic()
        if now - last_read[0] < PROGRESS_WRITE_SECONDS:
            return False
        last_read[0] = now
        with transaction(engine) as session:
            return bool(session.get(Run, run_id).cancel_requested)

    return should_stop


def _start_heartbeat(engine: Engine, run_id: int) -> Callable[[], None]:
    """A thread that writes the heartbeat while the process lives, whatever phase it is in
    (UMAP's first compilation can take a minute without a training step)."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            try:
                with transaction(engine) as session:
                    session.execute(update(Run).where(Run.id == run_id, Run.status == "running")
                                    .values(heartbeat_at=utcnow()))
            except Exception:
                pass  # a busy database is retried at the next beat

    thread = threading.Thread(target=beat, name=f"heartbeat-{run_id}", daemon=True)
    thread.start()

    def stop_beating() -> None:
        stop.set()
        thread.join(timeout=HEARTBEAT_SECONDS)

    return stop_beating


def _cancel_on_sigterm():
    def handler(signum, frame):
        raise Cancelled()

    if threading.current_thread() is threading.main_thread():
        return signal.signal(signal.SIGTERM, handler)
    return signal.getsignal(signal.SIGTERM)
