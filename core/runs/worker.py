"""Runs one stored run to its end: train (or load) an encoder, embed the dataset, measure it;
then starts its map as a job of its own. The app's worker process and `python -m core train`
both call `execute_run`; `python -m core project` calls `compute_projection`.

Every write goes through core.runs.lifecycle with this process's ownership token, so a worker that
lost its run (stalled and declared interrupted, then taken over by a resume; cancelled while
queued; deleted) leaves without writing anything.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from sqlalchemy import Engine, insert, update
from sqlalchemy.exc import DBAPIError, OperationalError

from core.explore import projection
from core.runs import lifecycle
from core.runs.queue import claim_in_turn
from core.training import tally_files
from core.training.config import RunConfig
from core.data.datasets import DatasetArrays, load_arrays
from core.explore.evolution import store_probe
from core.runs.jobs import run_summary, start_projection
from core.runs.lifecycle import Holder, LostRun
from core.explore.metrics import retrieval_metrics
from core.explore.search import nonfinite_rows
from core.training.loop import Cancelled, EpochStats, StepProgress, TrainingState, embed, fit, resolve_device
from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from storage import artifacts, queries
from storage.db import IDLE_IN_TRANSACTION_S, shown, transaction
from storage.run_files import ENCODER_FILE, TRAINING_STATE_FILE, RunFiles
from storage.settings import StorageError
from storage.schema import EpochRow, ProjectionRow, Run, TripletRow, utcnow
from storage.status import RunStatus

HEARTBEAT_SECONDS = 5.0
PROGRESS_WRITE_SECONDS = 0.5
# for the fault tests: a comma-separated list of named points (e.g. "epoch-2-committed") at which
# the worker stops itself with SIGSTOP, as a stalled machine would stop it there
PAUSE_ENV = "EMBEDDING_LAB_PAUSE_AT"
# how long a worker that lost the database keeps trying to write why its run stopped
END_WRITE_SECONDS = 60.0


class RunFailed(Exception):
    """A run that cannot go on, for a reason the user can act on (the message says which)."""


def execute_run(engine: Engine, run_id: int, on_step: Optional[Callable[[StepProgress], None]] = None,
                project: bool = True, resume: bool = False) -> dict:
    """Claim the queued run `run_id`, run it and store everything it makes; returns the run's
    summary (see `run_summary`). The run is completed once its embeddings and metrics are
    stored; project=True then starts its UMAP map as a job of its own (it never waits on it).

    resume=True continues a training run from its training state (see core.runs.jobs.prepare_resume,
    which queues it again): the epochs already stored are kept and training goes on after them.
    """
    try:
        holder = claim_in_turn(engine, Run, run_id)  # waits while the machine's job slots are taken
    except LostRun:  # cancelled before it started, or another process took it
        return run_summary(engine, run_id)
    with transaction(engine) as session:
        run = session.get(Run, run_id)
        kind, config, dataset_id, checkpoint = run.kind, dict(run.config), run.dataset_id, run.checkpoint
        version = run.dataset_version  # its labels and excluded images (core.data.versions)

    stop_beating = _start_heartbeat(engine, holder)
    previous_handler = _cancel_on_sigterm()
    staging = _staging_folder(run_id)
    completed = False
    ended = None  # the reason, when the run ends for a cause outside it (the database)
    try:
        workers = int(config.get("workers", 1)) if kind == "train" else 1
        # a data-parallel run's workers train where Ray puts them; this process embeds with what it has
        device = resolve_device("auto" if workers > 1 else config.get("device", "auto"))
        lifecycle.update_held(engine, holder, device=str(device), phase="loading")
        data = load_arrays(engine, dataset_id, version)
        if kind == "train" and workers > 1:
            from core.runs.parallel import train_on_workers

            lifecycle.update_held(engine, holder, phase="training")
            model = train_on_workers(engine, holder, RunConfig.from_stored(config), dataset_id, version, resume,
                                     checkpoint)
        elif kind == "train":
            model = _train(engine, holder, RunConfig.from_stored(config), data, on_step, resume, staging, checkpoint)
        else:
            model = _load_encoder(config)
        lifecycle.update_held(engine, holder, phase="embedding")
        embeddings = embed(model, data.pixels, device)
        bad = nonfinite_rows(embeddings)
        if bad:
            raise RunFailed(f"the encoder gives NaN or infinite embeddings for {bad} of {len(embeddings)} images; "
                            "its weights have diverged (try a lower learning rate) or the checkpoint is damaged")
        metrics = _test_metrics(embeddings, data)
        staging.mkdir(parents=True, exist_ok=True)
        staged = staging / "embeddings.npy"
        artifacts.save_array_atomic(staged, embeddings)
        relative = RunFiles(run_id).embeddings_of(holder.owner)  # a new name: never over a file a row names
        with transaction(engine) as session:
            lifecycle.complete(session, holder, embeddings=relative, metrics=metrics)
            os.replace(staged, artifacts.absolute(relative))  # inside: no other writer can hold the run now
        completed = True
    except LostRun:
        pass  # someone else owns the run now: write nothing
    except (Cancelled, KeyboardInterrupt):
        _write_end(lambda: lifecycle.end_cancelled(engine, holder))
    except (RunFailed, CheckpointError, ValueError) as exc:  # sentences written for the user
        _write_end(lambda: lifecycle.fail(engine, holder, str(exc)))
    except Exception as exc:  # the run row must say why, whatever broke
        disk_full = artifacts.disk_full_reason(exc, RunFiles(run_id).absolute())
        if disk_full:  # before the database's own words: SQLite says "disk I/O error" for it
            _write_end(lambda: lifecycle.fail(engine, holder, disk_full))
        elif _database_fault(exc):  # the database, not the run: resumable once it is back
            ended = _database_reason(engine, exc)
            _write_end(lambda: lifecycle.interrupt_held(engine, holder, ended))
        else:
            _write_end(lambda: lifecycle.fail(engine, holder,
                                              f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"))
    finally:
        stop_beating()
        signal.signal(signal.SIGTERM, previous_handler)
        shutil.rmtree(staging, ignore_errors=True)
    if completed and project:
        start_projection(engine, run_id)
    try:
        return run_summary(engine, run_id)
    except (OperationalError, StorageError):  # still out of reach: say what this process knows
        return {"run_id": run_id, "status": "interrupted", "reason": ended or "the database could not be reached"}


def _database_fault(exc: BaseException) -> bool:
    """Whether the database, not the run, stopped it: out of reach (OperationalError, a cut
    connection), a lock held past the timeout (DatabaseBusy), a session the server ended."""
    if isinstance(exc, (OperationalError, StorageError)):
        return True
    return isinstance(exc, DBAPIError) and (exc.connection_invalidated
                                            or getattr(exc.orig, "sqlstate", None) == "25P03")


def _database_reason(engine: Engine, exc: Exception) -> str:
    """Why a run stopped when the database failed it: a lock held too long (DatabaseBusy's own
    sentence), or the database out of reach (a server gone, a connection cut, a session the
    server ended)."""
    if isinstance(exc, StorageError):
        return str(exc)
    orig = getattr(exc, "orig", None) or exc
    detail = str(orig).strip().splitlines()
    why = f" ({detail[0][:200]})" if detail else ""
    if getattr(orig, "sqlstate", None) == "25P03" or "idle-in-transaction" in why:
        return (f"the database {shown(engine)} ended this worker's transaction after it sat idle for "
                f"{IDLE_IN_TRANSACTION_S:g} s (the worker was stopped or stalled); resume the run")
    if engine.dialect.name == "sqlite" and "disk" in why:  # a file that cannot be written is no outage
        return f"the database {shown(engine)} could not be written{why}; the run can be resumed once it can"
    return f"the database {shown(engine)} could not be reached{why}; resume the run once it is back"


def _write_end(write: Callable[[], bool]) -> None:
    """Write how the run ended, trying again for END_WRITE_SECONDS while the database cannot be
    reached or stays locked; after that the run reads interrupted by its silence (core.runs.lifecycle)."""
    deadline = time.monotonic() + END_WRITE_SECONDS
    while True:
        try:
            write()
            return
        except (OperationalError, StorageError):
            if time.monotonic() > deadline:
                return
            time.sleep(1.0)


def pause_point(name: str) -> None:
    """Stop this process here (SIGSTOP) when PAUSE_ENV names `name`; a test wakes it with SIGCONT."""
    if name in os.environ.get(PAUSE_ENV, "").split(","):
        os.kill(os.getpid(), signal.SIGSTOP)


def _staging_folder(run_id: int) -> Path:
    """Where this process writes a run's files before they are moved into place under a check
    that it still owns the run (so a worker that lost its run never overwrites the new owner's)."""
    return RunFiles(run_id).staging(os.getpid())


def _train(engine: Engine, holder: Holder, cfg: RunConfig, data: DatasetArrays,
           on_step: Optional[Callable[[StepProgress], None]], resume: bool, staging: Path,
           checkpoint: Optional[str]) -> torch.nn.Module:
    """checkpoint: the encoder the run's row names as it is claimed (resume continues from the
    training state written with it; None before the first epoch)."""
    lifecycle.update_held(engine, holder, phase="training")
    step_callback, epoch_callback = training_callbacks(engine, holder, cfg, data, on_step, staging, checkpoint)
    return fit(cfg, data, step_callback, epoch_callback, should_stop=_stop_reader(engine, holder),
               resume_from=resume_point(holder.row_id, checkpoint) if resume else None)


def resume_point(run_id: int, checkpoint: Optional[str]) -> Path:
    """The training state a resumed run continues from: the one written with its encoder."""
    return artifacts.absolute(RunFiles(run_id).training_state_for(checkpoint))


def training_callbacks(engine: Engine, holder: Holder, cfg: RunConfig, data: DatasetArrays,
                       on_step: Optional[Callable[[StepProgress], None]], staging: Path, checkpoint: Optional[str]
                       ) -> tuple[Callable[[StepProgress], None], Callable[[EpochStats, TrainingState], None]]:
    """(on_step, on_epoch) for `fit`: the run's progress, and each epoch's rows and files, written
    as `holder`. A data-parallel run's rank 0 (core.runs.parallel) writes through these same two."""
    run_id = holder.row_id
    last_write = [0.0]
    files = RunFiles(run_id)
    current = [checkpoint]  # what the row names; this process's commits replace it
    channels = int(data.pixels.shape[3])
    # where the next epoch's wall time starts counting: this process's last epoch commit (None
    # before its first epoch: that one counts from fit's own start of the epoch)
    counted_to: list[Optional[float]] = [None]

    def step_callback(progress: StepProgress) -> None:
        if on_step is not None:
            on_step(progress)
        now = time.monotonic()
        # small transactions, batched per interval, so the page's reads never wait long
        if now - last_write[0] >= PROGRESS_WRITE_SECONDS or progress.step == progress.total_steps:
            last_write[0] = now
            lifecycle.update_held(engine, holder, epoch=progress.epoch, step=progress.step,
                                  total_steps=progress.total_steps, last_loss=progress.loss,
                                  recent_counts=live_counts(progress))

    def epoch_callback(stats: EpochStats, state: TrainingState) -> None:
        # Files are staged first. In the transaction that commits the epoch's rows, once `hold`
        # has checked that this process still owns the run, they are moved into place: the
        # encoder and training state under names of their own (this epoch's, this owner's), which
        # the row's checkpoint then names. So nothing a row names is ever overwritten: a worker
        # that lost its run (stopped anywhere here, woken after another took the run over) never
        # gets past `hold`, and what it staged is removed with its staging folder. A worker killed
        # after the moves but before the commit leaves files no row names (prepare_resume
        # removes them) and rows one epoch behind them; resuming trains that epoch again.
        staging.mkdir(parents=True, exist_ok=True)
        state.save(staging / TRAINING_STATE_FILE)
        save_checkpoint(staging / ENCODER_FILE, state.model, cfg.to_dict(), channels)
        mining = [] if stats.image_counts is None else tally_files.stage_epoch(
            staging, run_id, stats.epoch, stats.image_counts, stats.negative_classes)
        probe = store_probe(staging, run_id, stats.epoch, state.model, data)  # the epoch's probe (core.explore.evolution)
        encoder = files.epoch_encoder(stats.epoch, holder.owner)
        # The epoch's seconds are its whole wall time, not only its steps (stats.seconds): the
        # checkpoint, the mining tally and the probe above cost as much as the steps on a small run,
        # and the time left (core.runs.overview) is these seconds per step. Counted from the last
        # commit (so that commit and what followed it count too), or from the epoch's start.
        now = time.perf_counter()
        began = counted_to[0] if counted_to[0] is not None else (
            stats.began if stats.began is not None else now - stats.seconds)
        counted_to[0] = now
        with transaction(engine) as session:
            lifecycle.hold(session, holder, epoch=stats.epoch, checkpoint=encoder)
            session.add(EpochRow(run_id=run_id, epoch=stats.epoch, loss=stats.loss, easy=stats.counts["easy"],
                                 semi_hard=stats.counts["semi-hard"], hard=stats.counts["hard"], seconds=now - began,
                                 gap_histogram=stats.gap_histogram, probe_precision_at_1=probe.precision_at_1,
                                 memory_counts=_memory_counts(stats)))
            if stats.triplets:
                session.execute(insert(TripletRow), [_triplet_values(t, run_id, stats.epoch) for t in stats.triplets])
            session.flush()  # the rows are in (a duplicate epoch fails here) before any file moves
            tally_files.move_into_place(mining)
            probe.move_into_place()
            os.replace(staging / TRAINING_STATE_FILE, artifacts.absolute(files.training_state_for(encoder)))
            os.replace(staging / ENCODER_FILE, artifacts.absolute(encoder))
        pause_point(f"epoch-{stats.epoch}-committed")
        replaced, current[0] = current[0], encoder
        if replaced and replaced != encoder:  # no row names it any more, and none will again
            for name in (replaced, files.training_state_for(replaced)):
                artifacts.absolute(name).unlink(missing_ok=True)

    return step_callback, epoch_callback


def live_counts(progress: StepProgress) -> dict:
    """The last batch's triplets per category as the Train page shows them live (Run.recent_counts);
    with a cross-batch memory, `from_memory` holds how many of each took their negative from it."""
    counts = {category: int(value) for category, value in progress.counts.items()}
    if progress.memory_counts:
        counts["from_memory"] = {category: int(progress.memory_counts.get(category, 0)) for category in progress.counts}
    return counts


def _memory_counts(stats: EpochStats) -> Optional[dict]:
    """What an epoch row keeps of the cross-batch memory: of the epoch's counted triplets, those
    whose negative came from the memory, per category; None for a run without a memory (the loop
    counts none; the Triplets page then shows nothing of it)."""
    if not stats.memory_counts:
        return None
    return {category: int(stats.memory_counts.get(category, 0)) for category in stats.counts}


def _triplet_values(row: dict, run_id: int, epoch: int) -> dict:
    """An inspector row (core.training.loop.inspect_batch) as a TripletRow's values; from_memory
    is None for a run without a memory (its rows carry no such key)."""
    return dict(row, run_id=run_id, epoch=epoch, from_memory=row.get("from_memory"))


def _load_encoder(config: dict) -> torch.nn.Module:
    path = artifacts.absolute(config["checkpoint"])
    model, _ = load_checkpoint(path, config.get("checkpoint_name"))
    return model


def _test_metrics(embeddings: np.ndarray, data: DatasetArrays) -> Optional[dict]:
    """Metrics on the held-out images (all images when the dataset has no test split), never on the
    images the run's version excludes."""
    if data.labels is None:
        return None
    rows = data.test_index if len(data.test_index) >= 2 else data.included_index
    try:
        metrics = retrieval_metrics(embeddings[rows], data.labels[rows])
    except ValueError as exc:  # one class, or no class with two images: numbers would mean nothing
        return {"unavailable": str(exc)}
    metrics["evaluated_on"] = "test" if len(data.test_index) >= 2 else "all"
    metrics["n_queries"] = int(len(rows))
    return metrics


def compute_projection(engine: Engine, run_id: int, params: Optional[dict] = None,
                       report: Optional[Callable[[str, Optional[float], str], None]] = None,
                       queued_only: bool = False) -> ProjectionRow:
    """Compute and store the run's UMAP map for `params` (defaults if None) in this process,
    as the projection row's owner; returns the row (status done, failed or cancelled). A map
    already done is returned as it is. LookupError / ValueError with a sentence when the run
    has nothing to project or another process is computing this map.

    report(phase, fraction, message) hears the progress too (the command line's stderr).
    """
    params = dict(projection.UMAP_DEFAULTS if params is None else params)
    key = projection.params_key(params)
    relative = RunFiles(run_id).umap(hashlib.sha1(key.encode()).hexdigest()[:12])

    def work(embeddings_path: str, on_progress, staging: Path) -> list[tuple[Path, str]]:
        from core.explore import knn as run_knn

        embeddings = np.load(artifacts.absolute(embeddings_path))
        moves, neighbours = [], None
        n_neighbors = max(2, min(int(params.get("n_neighbors", 15)), len(embeddings) - 1))
        if params.get("metric", "euclidean") in ("euclidean", "cosine") and len(embeddings) > 2 \
                and n_neighbors <= run_knn.KNN_WIDTH:
            found, moves = whole_run_knn(run_id, embeddings, embeddings_path, staging, on_progress)
            # None for euclidean on rows that are not unit length: umap's own metric then, exactly
            neighbours = run_knn.for_umap(found, n_neighbors, params.get("metric", "euclidean"))
        coords = projection.project_umap(embeddings, **params, on_progress=on_progress, knn=neighbours)
        staging.mkdir(parents=True, exist_ok=True)
        artifacts.save_array_atomic(staging / "umap.npy", coords)
        return moves + [(staging / "umap.npy", relative)]

    return _run_job(engine, run_id, "umap", params, relative, work, report, "map", queued_only)


def compute_statistics(engine: Engine, run_id: int,
                       report: Optional[Callable[[str, Optional[float], str], None]] = None,
                       queued_only: bool = False) -> ProjectionRow:
    """Compute and store the run's statistics (core.explore.failures: each image's average precision and
    nearest neighbours, the confusion matrix, likely label errors) and, for a run past
    core.explore.search.APPROXIMATE_ABOVE images, its approximate search index with its measured recall;
    as a job row of method "statistics". Also writes the dataset's image sprites for the map."""
    from core.explore import failures, map_files
    from core.explore.failures import STATISTICS_PARAMS
    from core.explore.search import APPROXIMATE_ABOVE, NeighbourIndex

    params = dict(STATISTICS_PARAMS)
    relative = RunFiles(run_id).statistics(params["k"])
    index_relative = RunFiles(run_id).index

    def work(embeddings_path: str, on_progress, staging: Path) -> list[tuple[Path, str]]:
        embeddings = np.load(artifacts.absolute(embeddings_path))
        with transaction(engine) as session:
            run = session.get(Run, run_id)
            rows = queries.run_image_table(session, run)  # the labels of the version it ran on
            dataset_id, dataset_key = run.dataset_id, run.dataset.cache_key
        labels = np.array([-1 if image.label is None else image.label for image in rows], dtype=np.int64)
        split = np.array([image.split for image in rows])
        # the queries of its metrics: the test images its version did not exclude (all those, without a test split)
        used = ~np.array([image.excluded for image in rows], dtype=bool)
        evaluated = (split == "test") & used if ((split == "test") & used).sum() >= 2 else used
        index = None
        if len(embeddings) > APPROXIMATE_ABOVE:
            on_progress("index", None, f"building the approximate search index of {len(embeddings):,} images")
            index = NeighbourIndex(embeddings)
        knn, moves = whole_run_knn(run_id, embeddings, embeddings_path, staging, on_progress, index=index)
        on_progress("statistics", 0.0, "finding each image's average precision")
        stats = failures.compute_statistics(
            embeddings, labels, evaluated, k=params["k"], knn=knn,
            on_progress=lambda f: on_progress("statistics", f, "finding each image's average precision"))
        staging.mkdir(parents=True, exist_ok=True)
        if index is not None:
            index.save(staging / "index")
            moves.append((staging / "index", index_relative))
        failures.save_statistics(stats, staging / "statistics.npz")
        moves.append((staging / "statistics.npz", relative))
        on_progress("sprites", None, "writing the images the map shows on hover")
        from core.explore.service import dataset_pixels

        try:
            map_files.write_sprites(dataset_id, dataset_key, dataset_pixels(engine, dataset_id))
        except (OSError, ValueError) as exc:  # the map works without hover images; the page says so
            print(f"the map's hover images could not be written: {exc}", file=sys.stderr)
        return moves

    return _run_job(engine, run_id, "statistics", params, relative, work, report, "statistics", queued_only)


def whole_run_knn(run_id: int, embeddings: np.ndarray, embeddings_path: str, staging: Path, on_progress,
                  index=None) -> tuple:
    """(the run's k-NN, moves): read from the run's knn/ folder when a job of the run already
    computed it from these embeddings (moves empty), else computed now (with `index`, the run's own
    search index, when given) and staged, with the move that makes it the run's file. The statistics
    and the map both call this, so the whole-run k-NN is computed once per run (core.explore.knn)."""
    from core.explore import knn as run_knn

    folder = artifacts.absolute(RunFiles(run_id).knn)
    try:
        return run_knn.load_run_knn(folder, expected_rows=len(embeddings), source=embeddings_path,
                                    min_width=min(run_knn.KNN_WIDTH, len(embeddings))), []
    except LookupError:
        pass
    except ValueError as exc:  # a damaged file: computed again and replaced
        print(f"{exc}; computing the run's k-NN again", file=sys.stderr)
    message = (f"finding each image's nearest neighbours ({len(embeddings):,} images, "
               + ("exact" if len(embeddings) <= run_knn.EXACT_UP_TO and index is None
                  or index is not None and index.kind == "exact" else "approximate") + ")")
    on_progress("neighbours", 0.0, message)
    knn = run_knn.compute_run_knn(embeddings, index=index, source=embeddings_path,
                                  on_progress=lambda f: on_progress("neighbours", f, message))
    run_knn.save_run_knn(knn, staging / "knn")
    return knn, [(staging / "knn", RunFiles(run_id).knn)]


def compute_evolution(engine: Engine, run_id: int,
                      report: Optional[Callable[[str, Optional[float], str], None]] = None,
                      queued_only: bool = False) -> ProjectionRow:
    """Compute and store the run's map across epochs (core.explore.evolution: its probe's embeddings of
    every epoch, laid out in aligned coordinates), as a job row of method "evolution";
    `python -m core project` runs it after the map. ValueError / LookupError as compute_projection."""
    from core.explore import evolution

    params = dict(evolution.EVOLUTION_PARAMS)
    relative = RunFiles(run_id).evolution

    def work(embeddings_path: str, on_progress, staging: Path) -> list[tuple[Path, str]]:
        return evolution.stage_evolution(engine, run_id, params, staging, on_progress)

    return _run_job(engine, run_id, "evolution", params, relative, work, report, "map across epochs", queued_only)


def _run_job(engine: Engine, run_id: int, method: str, params: dict, relative: str, work,
             report: Optional[Callable[[str, Optional[float], str], None]], what: str,
             queued_only: bool = False) -> ProjectionRow:
    """Run one after-work job of a run (a ProjectionRow of `method`) in this process as its
    owner: claim it, beat, report progress, let work(embeddings_path, on_progress, staging)
    write its files into `staging` and name where each goes, then move them into place and mark
    the row done in one held transaction. A row already done is returned as it is.

    queued_only (the app's job process): take the row only as it was queued for this process; a
    row cancelled meanwhile (a cancel, a deleted run) stays cancelled rather than queued again."""
    from core.runs.jobs import queue_projection

    with transaction(engine) as session:
        if queued_only:
            waiting = queries.projection(session, run_id, method, projection.params_key(params))
            if waiting is None or waiting.status not in (RunStatus.QUEUED, RunStatus.DONE):
                raise ValueError(f"run {run_id}'s {what} is no longer queued"
                                 + (f" (it is {waiting.status})" if waiting is not None else ""))
        row, _ = queue_projection(session, run_id, params, method=method)
        embeddings_path = session.get(Run, run_id).embeddings
        row_id, status, pid = row.id, row.status, row.pid
    if status == RunStatus.DONE:
        with transaction(engine) as session:
            return session.get(ProjectionRow, row_id)
    try:
        holder = claim_in_turn(engine, ProjectionRow, row_id)
    except LostRun:
        raise ValueError(f"run {run_id}'s {what} is already being computed by another process"
                         + (f" (pid {pid})" if pid else "")) from None

    def keep_waiting_rows_alive() -> None:
        """This process's other queued jobs of the run (the map waits for the statistics) are not dead."""
        with transaction(engine) as session:
            session.execute(update(ProjectionRow).where(
                ProjectionRow.run_id == run_id, ProjectionRow.status == RunStatus.QUEUED, ProjectionRow.pid == os.getpid())
                .values(heartbeat_at=utcnow()))

    stop_beating = _start_heartbeat(engine, holder, keep_waiting_rows_alive)
    previous_handler = _cancel_on_sigterm()
    staging = _staging_folder(run_id) / method
    last_write = [0.0]

    def on_progress(phase: str, fraction: Optional[float], message: str) -> None:
        if report is not None:
            report(phase, fraction, message)
        now = time.monotonic()
        if now - last_write[0] >= PROGRESS_WRITE_SECONDS or fraction in (None, 0.0, 1.0):
            last_write[0] = now
            lifecycle.update_held(engine, holder, phase=phase, progress=fraction, message=message)
            if lifecycle.still_held(engine, holder):
                raise Cancelled()

    try:
        moves = work(embeddings_path, on_progress, staging)  # it makes `staging` when it first writes
        with transaction(engine) as session:
            lifecycle.complete(session, holder, path=relative, progress=1.0, message=None)
            for source, target in moves:  # inside: no other writer can hold the row now
                destination = artifacts.absolute(target)
                if destination.is_dir():
                    shutil.rmtree(destination)
                os.replace(source, destination)
    except LostRun:
        pass
    except (Cancelled, KeyboardInterrupt):
        lifecycle.end_cancelled(engine, holder)
    except Exception as exc:
        lifecycle.fail(engine, holder, artifacts.disk_full_reason(exc, RunFiles(run_id).absolute())
                       or f"{type(exc).__name__}: {exc}")
    finally:
        stop_beating()
        signal.signal(signal.SIGTERM, previous_handler)
        shutil.rmtree(staging, ignore_errors=True)
        try:
            staging.parent.rmdir()  # this process's staging folder, unless a job of it still writes there
        except OSError:
            pass
    with transaction(engine) as session:
        return session.get(ProjectionRow, row_id)


def _stop_reader(engine: Engine, holder: Holder) -> Callable[[], bool]:
    """A `should_stop` for `fit`: True once a cancel was asked for; LostRun once the run is no
    longer this process's. Reads the row at most twice a second."""
    last_read = [0.0]

    def should_stop() -> bool:
        now = time.monotonic()
        if now - last_read[0] < PROGRESS_WRITE_SECONDS:
            return False
        last_read[0] = now
        cancel = lifecycle.still_held(engine, holder)
        if cancel is None:
            raise LostRun(f"{holder.what} is no longer this process's")
        return cancel

    return should_stop


def _start_heartbeat(engine: Engine, holder: Holder, also: Optional[Callable[[], None]] = None) -> Callable[[], None]:
    """A thread that writes the heartbeat while the process lives, whatever phase it is in,
    and only while this process still owns the row; `also` runs at each beat too."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            try:
                lifecycle.update_held(engine, holder)
                if also is not None:
                    also()
            except LostRun:
                return  # the main thread finds out at its next write
            except Exception:
                pass  # a busy database is retried at the next beat

    thread = threading.Thread(target=beat, name=f"heartbeat-{holder.row_id}", daemon=True)
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
