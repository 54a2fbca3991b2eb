"""One run on several Ray Train workers (RunConfig.workers > 1), data-parallel.

The run's process is its Ray job's entrypoint, as for any run on a cluster (core.runs.launch): it
claims the run, beats its heartbeat, and here starts a `TorchTrainer` of `workers` processes
(gloo on CPUs, NCCL on GPUs). Each worker loads the dataset from the shared data folder and
database and runs `fit` with its Shard (core.training.parallel): the same global batches, its
share of the rows encoded, the loss on the gathered batch. Rank 0 alone reports: it writes the
progress, the epochs' rows, the mining counts, the inspector's rows and the checkpoints through
the run's own callbacks (core.runs.worker.training_callbacks), as the run's owner (the claim's
token travels with it), and reads the cancel flag for all of them. The checkpoint is a local run's
file, so the run's process then loads the last one, embeds and measures as ever; a resume gives
every worker the training state written with it.

Ray is imported here only, and this module only for a run with workers > 1.
"""
from __future__ import annotations

import shutil
from typing import Optional

import torch
from sqlalchemy import Engine

from core.runs import lifecycle
from core.runs.lifecycle import Holder, LostRun
from core.training.config import RunConfig
from storage.run_files import RunFiles

TRAIN_FOLDER = "ray-train"  # Ray Train's own files of the run (its storage_path), in the run's folder


def train_on_workers(engine: Engine, holder: Holder, cfg: RunConfig, dataset_id: int, version: int,
                     resume: bool, checkpoint: Optional[str]) -> torch.nn.Module:
    """Train the run on cfg.workers Ray Train workers; returns its last checkpoint's encoder (eval
    mode). Cancelled when a cancel stopped them, LostRun when the run is no longer `holder`'s,
    RunFailed with the worker's reason when one failed."""
    from core.runs import launch
    from core.runs.worker import RunFailed
    from core.training.loop import Cancelled

    if launch.ray_address() is None:  # never let Ray start a cluster of its own here
        raise RunFailed(f"{holder.what} trains on {cfg.workers} workers, which needs a Ray cluster: set "
                        f"{launch.RAY_ENV} to its dashboard's address")
    from ray.train import RunConfig as TrainRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = launch.gpus_for(cfg.device) > 0
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"run_id": holder.row_id, "owner": holder.owner, "config": cfg.to_dict(),
                           "dataset_id": dataset_id, "version": version, "resume": resume, "checkpoint": checkpoint},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=TrainRunConfig(name=f"run-{holder.row_id}-{holder.owner[:8]}",
                                  storage_path=str(RunFiles(holder.row_id).absolute(TRAIN_FOLDER))),
    )
    failure: Optional[BaseException] = None
    try:
        trainer.fit()
    except Exception as exc:  # a worker's error, said below unless the run's row tells another story
        failure = exc
    cancel = lifecycle.still_held(engine, holder)
    if cancel is None:
        raise LostRun(f"{holder.what} is no longer this process's")
    if cancel:
        raise Cancelled()
    if failure is not None:
        raise RunFailed(f"a Ray Train worker failed: {worker_reason(failure)}")
    from models.checkpoint import load_checkpoint
    from storage import artifacts
    from storage.db import transaction
    from storage.schema import Run

    with transaction(engine) as session:
        run = session.get(Run, holder.row_id)
        epoch, trained = run.epoch, run.checkpoint
    if epoch != cfg.epochs or not trained:
        raise RunFailed(f"the Ray Train workers stopped after epoch {epoch or 0} of {cfg.epochs} without an error")
    model, _ = load_checkpoint(artifacts.absolute(trained))
    return model


def worker_reason(failure: BaseException) -> str:
    """One line of why a Ray Train run failed: the first worker's own exception when Ray says it
    (WorkerGroupError.worker_failures), else Ray's message."""
    failures = getattr(failure, "worker_failures", None) or {}
    cause = failures[min(failures)] if failures else getattr(failure, "controller_failure", None) or failure
    lines = [line for line in str(cause).strip().splitlines() if line.strip()]
    # a traceback's last line names the exception; a plain message is its first
    line = lines[-1] if lines and lines[0].startswith("Traceback") else (lines[0] if lines else type(cause).__name__)
    return line.strip()[:500]


def train_worker(config: dict) -> None:
    """One Ray Train worker's loop (TorchTrainer's train_loop_per_worker; the process group is set
    up). Rank 0 writes as the run's owner; every rank leaves quietly when all stop at a cancel."""
    import ray.train
    import ray.train.torch

    from core.data.datasets import load_arrays
    from core.runs import worker
    from core.training.loop import Cancelled, fit
    from core.training.parallel import Shard
    from storage.db import make_engine
    from storage.schema import Run

    context = ray.train.get_context()
    shard = Shard(context.get_world_rank(), context.get_world_size())
    engine = make_engine(role="worker")
    cfg = RunConfig.from_stored(config["config"])
    holder = Holder(Run, config["run_id"], config["owner"])
    staging = worker._staging_folder(holder.row_id) if shard.rank == 0 else None
    try:
        data = load_arrays(engine, config["dataset_id"], config["version"])
        on_step = on_epoch = None
        should_stop = lambda: False  # noqa: E731  (rank 0's decides for all: core.training.parallel.collective_stop)
        if shard.rank == 0:
            on_step, on_epoch = worker.training_callbacks(engine, holder, cfg, data, None, staging,
                                                          config["checkpoint"])
            should_stop = worker._stop_reader(engine, holder)
        resume_from = worker.resume_point(holder.row_id, config["checkpoint"]) if config["resume"] else None
        fit(cfg, data, on_step, on_epoch, should_stop, resume_from, shard=shard,
            device=ray.train.torch.get_device())
    except Cancelled:
        pass  # every rank stopped at the same step; the run's process reads the cancel from the row
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        engine.dispose()
