"""One run on two Ray Train workers (core.runs.parallel) on a local head with two CPUs: it is
refused when the cluster has too few CPUs; it can be cancelled while it trains, and resumed from
its checkpoint to completion, with its metrics, epochs, inspector rows and mining counts stored
once per epoch by its rank 0. Skipped, with the reason, where Ray cannot start."""
import json
import os
import subprocess
import sys
import time

import pytest

from core.runs.jobs import cancel_run, create_training_run, prepare_resume, start_worker
from core.runs.parallel import TRAIN_FOLDER
from core.training.config import RunConfig
from storage.db import transaction
from storage.run_files import RunFiles
from storage.schema import EpochRow, Run, TripletRow
from tests.helpers import wait_for
from tests.test_cli_errors import refused
from tests.test_ray import ROOT, TIMEOUT, engine, head, settled  # noqa: F401  (fixtures)

EPOCHS = 4


@pytest.fixture(scope="module", autouse=True)
def ready(head):
    """A new head reports its CPUs only after a while; the refusal below needs them said. (Its
    job agent may lag too: a submission refused with "No available agent" was seen once.)"""
    from core.runs.launch import _cluster_totals

    deadline = time.monotonic() + 120
    while _cluster_totals() is None and time.monotonic() < deadline:
        time.sleep(1)
    time.sleep(5)


def test_more_workers_than_the_cluster_has_cpus_are_refused_in_one_line(engine, tmp_path):
    result = subprocess.run([sys.executable, "-m", "core", "train", "--dataset", "digits", "--workers", "3"],
                            cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=TIMEOUT)
    refused(result, "3 workers need a CPU each, but the Ray cluster at", "has 2")
    with transaction(engine) as session:
        assert session.query(Run).count() == 0  # nothing queued


def test_a_two_worker_run_is_cancelled_then_resumed_from_its_checkpoint_to_completion(engine):
    cfg = RunConfig(dataset="digits", epochs=EPOCHS, batch_size=64, device="cpu", workers=2)
    run_id = create_training_run(engine, cfg)
    start_worker(engine, run_id, project=False)
    # once its first epoch is committed (the row names that epoch's checkpoint)
    wait_for(engine, run_id, lambda r: r.status not in ("queued", "running") or r.checkpoint, timeout=TIMEOUT)
    assert cancel_run(engine, run_id) in ("running", "cancelled")
    run = settled(engine, run_id)
    assert run.status == "cancelled", (run.status, run.reason)
    assert run.checkpoint and (RunFiles(run_id).absolute(TRAIN_FOLDER)).is_dir()  # Ray Train ran it, not one process

    stopped_after = prepare_resume(engine, run_id)  # the epoch of the checkpoint it resumes from
    assert 1 <= stopped_after < EPOCHS
    start_worker(engine, run_id, resume=True, project=False)
    run = settled(engine, run_id)
    assert run.status == "completed", (run.status, run.reason)
    assert run.metrics["precision_at_1"] > 0.5, run.metrics
    with transaction(engine) as session:
        epochs = [row.epoch for row in session.query(EpochRow).filter(EpochRow.run_id == run_id).order_by(EpochRow.epoch)]
        counted = [row.easy + row.semi_hard + row.hard for row in session.query(EpochRow).filter(EpochRow.run_id == run_id)]
        inspected = {row.epoch for row in session.query(TripletRow).filter(TripletRow.run_id == run_id)}
    assert epochs == list(range(1, EPOCHS + 1))  # each epoch stored once: by rank 0 alone
    assert all(count > 0 for count in counted)  # the mining counts of every epoch
    assert inspected == set(epochs)  # the inspector's rows of every epoch


def test_a_two_worker_run_from_the_command_line_completes_with_its_metrics(engine):
    result = subprocess.run([sys.executable, "-m", "core", "train", "--dataset", "digits", "--epochs", "1",
                             "--batch-size", "64", "--device", "cpu", "--workers", "2", "--no-projection"],
                            cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "completed" and summary["precision_at_1"] > 0.5, summary
    with transaction(engine) as session:
        run = session.get(Run, summary["run_id"])
        assert run.config["workers"] == 2 and run.epoch == 1 and run.metrics["map_at_r"] == summary["map_at_r"]
