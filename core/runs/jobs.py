"""Runs as jobs: create the row, start a worker process, cancel it, notice when it died.

A worker is `python -m core worker RUN_ID`: a local process in a new session, so it outlives a
browser tab, can be cancelled as a group, and never shares CUDA or an engine with its parent; or,
when runs go to a Ray cluster, a Ray job (core.runs.launch).
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Optional

from sqlalchemy import Engine, delete, select, update

from core import access
from core.runs import launch, lifecycle
from core.training.config import DEVICES, RunConfig
from core.data.versions import resolve_dataset_version
from core.explore.failures import STATISTICS_PARAMS
from core.training.tally_files import remove_epochs_after
from storage import artifacts, queries
from storage.run_files import RunFiles
from storage.db import transaction
from storage.schema import Deletion, EpochRow, ProjectionRow, Run, TripletRow, utcnow
from storage.status import RunStatus


def check_device(device: str) -> None:
    """ValueError, before any row exists, when a run asks for CUDA and its process would start on
    this machine, which has none (a run for a Ray cluster gets a GPU node from the cluster)."""
    if device != "cuda" or launch.ray_address():
        return
    import torch

    if not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but this machine has no CUDA GPU that torch can use; "
                         "choose auto or cpu")


def create_training_run(engine: Engine, cfg: RunConfig) -> int:
    """Queue a training run on cfg.dataset: NAME, ID, or NAME@VERSION for a version of it (a bare
    name: its newest version; core.data.versions), which the run records. Settings that cannot
    work on this version (labels asked for on an unlabeled one, a supervised objective on one
    class, a P×K batch that holds a single class) fail here with a sentence, before a row exists.
    The config stores the dataset's name; the run's dataset_version its version."""
    from core.training.augment import resolve_supervision  # torch is imported lazily there
    from core.data.datasets import check_trainable
    from core.training.sampler import pk_shape

    access.require("train")
    check_device(cfg.device)
    launch.check_workers(cfg.workers, cfg.device)
    dataset, version = resolve_dataset_version(engine, cfg.dataset)
    supervision = resolve_supervision(cfg.supervision, cfg.loss, dataset.labeled)
    with transaction(engine) as session:
        counts = (queries.class_counts(session, dataset.id, split="train", version=version)
                  or queries.class_counts(session, dataset.id, version=version))
    shown = dataset.name if version == 1 else f"{dataset.name}@{version}"
    check_trainable(counts, supervised=supervision == "labels", dataset_name=shown, classes=dataset.classes)
    if supervision == "labels" and cfg.sampler == "pk":
        pk_shape(cfg.batch_size, cfg.samples_per_class, len(counts), n_images=sum(counts.values()))
    cfg = replace(cfg, dataset=dataset.name)
    with transaction(engine, what="queue the new run") as session:
        _check_person_jobs(session)
        run = lifecycle.create(session, Run(dataset_id=dataset.id, dataset_version=version, kind="train",
                                            config=cfg.to_dict(), created_by=access.who()))
        _hold_version(session, dataset.id, version, shown)
        return run.id


def _check_person_jobs(session) -> None:
    """The signed-in person's limit of runs running or queued at once (core.access.PERSON_JOBS_ENV),
    checked in the transaction that would add one; the machine's owner has none."""
    email = access.who()
    limit = None if email is None else access.person_limit(access.PERSON_JOBS_ENV)
    if limit is None:
        return
    mine = [run for run in session.scalars(select(Run).where(Run.created_by == email,
                                                             Run.status.in_(list(lifecycle.ACTIVE))))
            if run.status in lifecycle.ACTIVE]  # as read: a dead worker's run is no longer running
    if len(mine) >= limit:
        raise ValueError(f"{email} has {len(mine)} run{'s' * (len(mine) != 1)} running or queued, the most one person "
                         f"may have at once ({access.PERSON_JOBS_ENV} = {limit}); wait for one to end or cancel one")


def _hold_version(session, dataset_id: int, version: int, shown: str) -> None:
    """In the transaction that created a run on `version`, after its row is written: the version
    is still there, and stays until the run is committed (SQLite: this transaction holds the write
    lock now; a server database: the version's row is locked), so a delete at the same moment
    (core.data.versions.delete_version) either sees the run or came first and is said here."""
    from storage.schema import DatasetVersion

    if version == 1:
        return
    row = session.scalar(select(DatasetVersion).where(DatasetVersion.dataset_id == dataset_id,
                                                      DatasetVersion.version == version).with_for_update())
    if row is None:
        raise LookupError(f"{shown} was deleted meanwhile; no run was created")


def create_embedding_run(engine: Engine, dataset: str, checkpoint_bytes: bytes, checkpoint_name: str,
                         source_run: Optional[int] = None, device: str = "auto") -> int:
    """A run that embeds `dataset` (NAME, ID or NAME@VERSION, as create_training_run: its metrics
    use that version's labels) with a stored or uploaded encoder checkpoint.

    The file is checked whole (metadata within bounds, every tensor's name and shape, finite
    weights) before anything is stored: CheckpointError names it and the reason, and then no
    row and no copy of the file are left behind.
    """
    from models.checkpoint import validate_checkpoint

    access.require("train")
    if device not in DEVICES:
        raise ValueError(f"device must be one of: {', '.join(DEVICES)}; got {device!r}")
    check_device(device)
    target, version = resolve_dataset_version(engine, dataset)
    staged = artifacts.new_temp_folder() / "encoder.safetensors"
    try:
        staged.write_bytes(checkpoint_bytes)
        meta = validate_checkpoint(staged, checkpoint_name)
        with transaction(engine, what="queue the new run") as session:
            _check_person_jobs(session)
            run = lifecycle.create(session, Run(dataset_id=target.id, dataset_version=version, kind="embed", config={
                "dataset": target.name, "device": device, "source_run": source_run,
                "checkpoint_name": checkpoint_name, "encoder": meta["config"],
            }, created_by=access.who()))
            _hold_version(session, target.id, version, f"{target.name}@{version}")
            files = RunFiles(run.id)
            files.make()
            os.replace(staged, artifacts.absolute(files.encoder))
            run.checkpoint = files.encoder
            run.config = dict(run.config, checkpoint=run.checkpoint)
            return run.id
    finally:
        staged.unlink(missing_ok=True)
        staged.parent.rmdir()


def start_worker(engine: Engine, run_id: int, resume: bool = False, project: bool = True) -> Optional[int]:
    """Start the worker for a queued run (resume=True: one that prepare_resume queued again): a
    local process, whose pid is returned, or a Ray job when runs go to a cluster (core.runs.launch;
    None, the job id stored on the run). The worker claims the run itself (core.runs.lifecycle.claim).
    LaunchError (a ValueError) with the reason when the cluster does not take the job; the run is
    then failed with that reason rather than left queued."""
    with transaction(engine) as session:
        run = session.get(Run, run_id)
        device = (run.config or {}).get("device") if run is not None else None
        workers = int((run.config or {}).get("workers", 1)) if run is not None and run.kind == "train" else 1
    arguments = ["worker", str(run_id)] + (["--resume"] if resume else []) + ([] if project else ["--no-projection"])
    gpus = launch.gpus_for(device) if launch.ray_address() else 0
    cpus = 1
    if workers > 1:  # its process waits while its Ray Train workers (who ask for their own) train
        gpus = cpus = 0
    try:
        launched = launch.start(arguments, run_id, "worker.log", gpus=gpus, cpus=cpus)
    except launch.LaunchError as exc:
        with transaction(engine) as session:
            lifecycle.fail_to_start(session, Run, str(exc), Run.id == run_id)
        raise
    with transaction(engine) as session:
        # a fresh heartbeat for the seconds the worker takes to start, import torch and claim the run
        session.execute(update(Run).where(Run.id == run_id, Run.status == RunStatus.QUEUED)
                        .values(pid=launched.pid, host=launched.host, job_id=launched.job_id, heartbeat_at=utcnow()))
    return launched.pid


def training_state_path(run: Run) -> Path:
    """The training state a training run would resume from: the one written with the encoder
    its row names (storage.run_files.RunFiles.training_state_for)."""
    return artifacts.absolute(RunFiles(run.id).training_state_for(run.checkpoint))


def resumable_epoch(run: Run) -> Optional[int]:
    """The epoch a finished-but-unfinished training run would continue after, or None when it
    cannot be resumed (it completed, is active, is not a training run, or has no training state)."""
    from models.checkpoint import CheckpointError, read_training_state_info  # no torch

    if run.kind != "train" or run.status not in lifecycle.RESUMABLE:
        return None
    try:
        return int(read_training_state_info(training_state_path(run))["epoch"])
    except (CheckpointError, KeyError, ValueError, TypeError):
        return None


def prepare_resume(engine: Engine, run_id: int) -> int:
    """Queue an interrupted, cancelled or failed training run again to continue from its last
    checkpoint; returns that checkpoint's epoch. Epoch and triplet rows past it (written just
    before the worker died) are deleted, so each epoch ends up stored once. Raises ValueError or
    LookupError with a sentence when the run cannot be resumed; of two resumes at once, one
    wins and the other gets that sentence. A run whose worker died (it reads interrupted) is
    taken over here (core.runs.lifecycle.requeue)."""
    access.require("train")
    with transaction(engine, what=f"resume run {run_id}") as session:
        run = queries.get_run(session, run_id)
        if run.kind != "train":
            raise ValueError(f"run {run_id} embeds with a stored encoder; only training runs can be resumed")
        if run.status in lifecycle.ACTIVE:
            where = f" (process {run.pid} on {run.host})" if run.pid else ""
            raise ValueError(f"run {run_id} is already {run.status}{where}; it can be resumed once it stops")
        if run.status not in lifecycle.RESUMABLE:
            raise ValueError(f"run {run_id} is {run.status}; only {', '.join(lifecycle.RESUMABLE)} runs can be resumed")
        launch.check_workers(int(run.config.get("workers", 1)), run.config.get("device", "auto"))
        epoch = resumable_epoch(run)
        if epoch is None:
            raise ValueError(f"run {run_id} stopped before its first epoch ended, so it has no checkpoint "
                             "to resume from; start a new run")
        if not lifecycle.requeue(session, Run, run_id):
            raise ValueError(f"run {run_id} is being resumed by another process")
        for table in (EpochRow, TripletRow):
            session.execute(delete(table).where(table.run_id == run_id, table.epoch > epoch))
        remove_epochs_after(run_id, epoch)  # their mining counts too: those epochs are trained again
        for stale in RunFiles(run_id).stale_epoch_files(keep=run.checkpoint):  # of workers that lost the run
            stale.unlink(missing_ok=True)
        session.execute(update(Run).where(Run.id == run_id).values(epoch=epoch))
        return epoch


def resume_run(engine: Engine, run_id: int) -> int:
    """prepare_resume, then a worker process that continues the run; returns its pid."""
    prepare_resume(engine, run_id)
    return start_worker(engine, run_id, resume=True)


def cancel_run(engine: Engine, run_id: int) -> Optional[str]:
    """Stop a run: a queued one is cancelled at once; a running one (a worker, or a command-line
    `train` on this machine) gets the cancel flag and SIGTERM. Returns its status afterwards.
    An editor cancels their own runs only (core.access)."""
    with transaction(engine) as session:
        made_by = session.scalar(select(Run.created_by).where(Run.id == run_id))
    access.require("cancel", owner=made_by)
    return lifecycle.cancel(engine, Run, run_id)


def delete_run(engine: Engine, run_id: int) -> None:
    """Delete a run, its rows, its map jobs and its files; an active run is stopped first (its
    worker then finds its run gone and leaves without writing). LookupError when there is none.
    The deletion is recorded with who made it and when."""
    access.require("delete")
    with transaction(engine) as session:
        run = queries.get_run(session, run_id)
        what = f"run {run_id} ({run.config.get('loss', 'a stored encoder')} on {run.dataset.name})"
        projections = session.scalars(select(ProjectionRow.id).where(ProjectionRow.run_id == run_id)).all()
    for projection_id in projections:
        lifecycle.cancel(engine, ProjectionRow, projection_id)
    cancel_run(engine, run_id)
    with transaction(engine, what=f"delete run {run_id}") as session:
        queries.delete_run_rows(session, run_id)
        session.add(Deletion(kind="run", object_id=run_id, what=what[:500], deleted_by=access.who()))
    RunFiles(run_id).remove()
    from core.explore import map_files

    map_files.remove_run_files(run_id)


def start_projection(engine: Engine, run_id: int, params: Optional[dict] = None) -> Optional[int]:
    """Queue the run's after-work as jobs of their own and start one process for them: its
    statistics (where the encoder fails, the search index; see core.explore.failures), then its UMAP map
    (default parameters unless given), then, for a run that stored its probe at every epoch, its
    map across epochs (core.explore.evolution). Returns the pid, or None when all are already done or
    being computed. LookupError / ValueError with a sentence when the run has nothing to project."""
    from core.explore.evolution import EVOLUTION_PARAMS, probe_epochs
    from core.explore.projection import UMAP_DEFAULTS, params_key  # numpy only; umap is imported in the job

    access.require("compute")
    params = dict(UMAP_DEFAULTS if params is None else params)
    with transaction(engine) as session:
        _, stats_queued = queue_projection(session, run_id, STATISTICS_PARAMS, method="statistics")
        _, map_queued = queue_projection(session, run_id, params)
        evolution_queued = bool(probe_epochs(run_id)) and queue_projection(
            session, run_id, EVOLUTION_PARAMS, method="evolution")[1]
        if not (stats_queued or map_queued or evolution_queued):
            return None
    arguments = ["project", "--run", str(run_id), "--n-neighbors", str(params["n_neighbors"]),
                 "--min-dist", str(params["min_dist"]), "--quiet", "--queued-only"]
    keys = [params_key(params), params_key(STATISTICS_PARAMS), params_key(EVOLUTION_PARAMS)]
    queued = (ProjectionRow.run_id == run_id, ProjectionRow.params_key.in_(keys), ProjectionRow.status == RunStatus.QUEUED)
    try:
        launched = launch.start(arguments, run_id, "projection.log")
    except launch.LaunchError as exc:
        with transaction(engine) as session:
            lifecycle.fail_to_start(session, ProjectionRow, str(exc), *queued)
        raise
    with transaction(engine) as session:
        session.execute(update(ProjectionRow).where(*queued)
                        .values(pid=launched.pid, host=launched.host, job_id=launched.job_id, heartbeat_at=utcnow()))
    return launched.pid


def queue_projection(session, run_id: int, params: dict, method: str = "umap") -> tuple[ProjectionRow, bool]:
    """The run's `method` row (umap, statistics or evolution) for `params`, queued when it was
    missing or had stopped (failed, cancelled, interrupted); (row, whether it was queued now). A
    row that is done or active is returned as it is. LookupError / ValueError when the run has
    nothing to project."""
    from core.explore.projection import params_key

    ensure_projectable(session, run_id)
    key = params_key(params)
    row = queries.projection(session, run_id, method, key)
    if row is None:
        return lifecycle.create(session, ProjectionRow(run_id=run_id, method=method, params_key=key, params=params,
                                                       heartbeat_at=utcnow())), True
    if row.status in lifecycle.RESUMABLE and lifecycle.requeue(session, ProjectionRow, row.id):
        session.refresh(row)
        return row, True
    return row, False


def ensure_projectable(session, run_id: int) -> Run:
    """The run, if it has embeddings to project; LookupError or ValueError naming why not."""
    run = queries.get_run(session, run_id)
    if not run.embeddings or run.status != RunStatus.COMPLETED:
        why = f"it {run.status}" if run.status in lifecycle.RESUMABLE else f"it is {run.status}"
        detail = f": {run.reason.splitlines()[0]}" if run.reason else ""
        raise ValueError(f"run {run_id} has no embeddings to project ({why}{detail})")
    return run


def run_summary(engine: Engine, run_id: int) -> dict:
    """A run's line for the command line: status, device, seconds, dataset, the first line of its
    reason, its Ray job and its metrics. A read only; no torch (`python -m core runs`)."""
    with transaction(engine) as session:
        run = queries.get_run(session, run_id)
        summary = {"run_id": run.id, "status": run.status, "device": run.device,
                   "seconds": round(run.seconds or 0.0, 2), "dataset_id": run.dataset_id,
                   "dataset_version": run.dataset_version, "kind": run.kind}
        if run.reason:
            summary["reason"] = run.reason.splitlines()[0]
        if run.job_id:
            summary["job_id"] = run.job_id  # the Ray job that ran it (core.runs.launch)
        summary.update(run.metrics or {})
        return summary
