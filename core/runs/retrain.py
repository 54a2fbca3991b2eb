"""Train again on another version of a run's dataset (core.data.versions): the same settings, the
fixed data. The Data page's "Train again on this version" and `python -m core retrain` call these."""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

from sqlalchemy import Engine

from core.data.versions import resolve_dataset_version, version_ref
from core.runs.jobs import create_embedding_run, create_training_run, start_worker
from core.training.config import RunConfig
from storage import artifacts, queries
from storage.db import transaction


def create_retraining_run(engine: Engine, run_id: int, version: Optional[int] = None) -> int:
    """Queue a run with run `run_id`'s settings on `version` of its dataset (None: the newest);
    returns the new run's id. A training run trains again with its stored config; an embedding
    run embeds again with the same encoder. LookupError / ValueError with a sentence for an
    unknown run or version, or settings that cannot train on that version (create_training_run's
    checks); nothing is stored then."""
    with transaction(engine) as session:
        run = queries.get_run(session, run_id)
        kind, config, dataset_id, checkpoint = run.kind, dict(run.config or {}), run.dataset_id, run.checkpoint
    dataset, version = resolve_dataset_version(engine, dataset_id, version)
    target = version_ref(dataset.name, version)
    if kind == "train":
        return create_training_run(engine, replace(RunConfig.from_stored(config), dataset=target))
    if not checkpoint or not artifacts.absolute(checkpoint).is_file():
        raise LookupError(f"run {run_id}'s encoder file is gone, so it cannot embed {target} again")
    return create_embedding_run(engine, target, artifacts.absolute(checkpoint).read_bytes(),
                                config.get("checkpoint_name") or f"run {run_id} encoder", config.get("source_run"),
                                config.get("device", "auto"))


def retrain_on_version(engine: Engine, run_id: int, version: Optional[int] = None) -> int:
    """"Train again on this version": create_retraining_run, then a worker process runs it (a
    local process, or a Ray job when runs go to a cluster); returns the new run's id."""
    new_run = create_retraining_run(engine, run_id, version)
    start_worker(engine, new_run)
    return new_run
