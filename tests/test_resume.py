"""Checkpoints every epoch and resume: an interrupted run continues from its last completed epoch
and ends as an uninterrupted one would (same epochs, each stored once)."""
import os
import signal
import time

import numpy as np
import pytest
import torch

from core.training.config import RunConfig
from core.data.datasets import DatasetArrays, load_builtin
from core.runs.jobs import create_training_run, prepare_resume, resumable_epoch, start_worker, training_state_path
from core.training.loop import Cancelled, fit
from core.runs.worker import execute_run
from models.checkpoint import CheckpointError, load_training_state, read_training_state_info, save_training_state
from models.encoders import build_encoder
from storage import queries
from storage.db import transaction
from storage.schema import EpochRow, Run
from tests.test_jobs import wait_for


def small_digits(n: int = 600) -> DatasetArrays:
    pixels, labels, split, classes = load_builtin("digits")
    return DatasetArrays(pixels[:n], labels[:n], split[:n], classes)


def trained_optimizer(seed: int):
    torch.manual_seed(seed)
    model = build_encoder("small_cnn", 1, 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(6, 1, 8, 8)).pow(2).sum().backward()
    optimizer.step()
    return model, optimizer


def test_training_state_round_trips_and_a_failed_save_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "training-state.safetensors"
    model, optimizer = trained_optimizer(0)
    save_training_state(path, model, optimizer, {"epoch": 3, "step": 30})
    assert read_training_state_info(path) == {"epoch": 3, "step": 30}

    other, other_optimizer = trained_optimizer(1)
    assert load_training_state(path, other, other_optimizer)["epoch"] == 3
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    saved, loaded = optimizer.state_dict(), other_optimizer.state_dict()
    for index, values in saved["state"].items():
        for name, value in values.items():
            torch.testing.assert_close(loaded["state"][index][name], value, rtol=0, atol=0)
    assert loaded["param_groups"][0]["betas"] == saved["param_groups"][0]["betas"]

    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    newer, newer_optimizer = trained_optimizer(2)
    with pytest.raises(OSError, match="disk full"):
        save_training_state(path, newer, newer_optimizer, {"epoch": 4, "step": 40})
    assert read_training_state_info(path)["epoch"] == 3  # the previous state, whole
    assert load_training_state(path, *trained_optimizer(3))["step"] == 30
    assert not list(tmp_path.glob("*.tmp"))

    with pytest.raises(CheckpointError, match="no training state to resume from"):
        read_training_state_info(tmp_path / "missing.safetensors")


def test_a_resumed_fit_continues_exactly_where_it_stopped(tmp_path):
    data = small_digits(400)
    cfg = RunConfig(dataset="digits", epochs=2, batch_size=64)
    uninterrupted: list[float] = []
    full = fit(cfg, data, on_epoch=lambda stats, state: uninterrupted.append(stats.loss))

    path = tmp_path / "state.safetensors"
    stopped_after: list[int] = []

    def save_then_stop(stats, state):
        state.save(path)
        stopped_after.append(stats.epoch)

    with pytest.raises(Cancelled):
        fit(cfg, data, on_epoch=save_then_stop, should_stop=lambda: bool(stopped_after))
    assert stopped_after == [1] and read_training_state_info(path)["epoch"] == 1

    resumed_losses: list[float] = []
    resumed = fit(cfg, data, on_epoch=lambda stats, state: resumed_losses.append((stats.epoch, stats.loss)),
                  resume_from=path)
    assert [epoch for epoch, _ in resumed_losses] == [2]
    np.testing.assert_allclose([loss for _, loss in resumed_losses], uninterrupted[1:], rtol=1e-4)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=name)

    with pytest.raises(ValueError, match="saved by a run with other settings"):
        fit(RunConfig(dataset="digits", epochs=2, batch_size=64, lr=0.01), data, resume_from=path)


# margin 1.0: the last batch of a run trained this well may hold no semi-hard triplet at the
# default margin (0 rows at epoch 3 with one thread, 4 with two, 2026-12-06), and then the
# inspector rightly stores none; the wide band leaves every epoch's last batch some to inspect
SEMI_HARD_EVERY_EPOCH = 1.0


def test_a_sigkilled_worker_resumes_to_the_same_number_of_epochs(engine):
    cfg = RunConfig(dataset="digits", epochs=3, batch_size=32, margin=SEMI_HARD_EVERY_EPOCH)
    run_id = create_training_run(engine, cfg)
    pid = start_worker(engine, run_id)
    wait_for(engine, run_id, lambda r: r.checkpoint is not None)  # epoch 1 is stored and checkpointed
    os.killpg(pid, signal.SIGKILL)
    time.sleep(0.3)
    with transaction(engine) as session:  # it reads interrupted (derived on read); resuming takes it over
        run = session.get(Run, run_id)
        assert run.status == "interrupted", (run.status, run.epoch)
        saved_epoch = resumable_epoch(run)
        assert saved_epoch is not None and 1 <= saved_epoch < cfg.epochs
        # as if the worker died after storing the next epoch's row but before its checkpoint
        stored = [e.epoch for e in queries.epoch_rows(session, [run_id])]
        if saved_epoch + 1 not in stored:
            session.add(EpochRow(run_id=run_id, epoch=saved_epoch + 1, loss=9.9, easy=0, semi_hard=0, hard=0,
                                 seconds=0))

    assert prepare_resume(engine, run_id) == saved_epoch
    with transaction(engine) as session:
        run = session.get(Run, run_id)
        assert run.status == "queued" and run.reason is None and run.epoch == saved_epoch
        assert [e.epoch for e in queries.epoch_rows(session, [run_id])] == list(range(1, saved_epoch + 1))
    with transaction(engine) as session:  # a queued resumed run is not taken for a dead one
        assert session.get(Run, run_id).status == "queued"
    summary = execute_run(engine, run_id, project=False, resume=True)
    assert summary["status"] == "completed", summary
    assert summary["precision_at_1"] > 0.8

    with transaction(engine) as session:
        run = session.get(Run, run_id)
        epochs = queries.epoch_rows(session, [run_id])
        assert [e.epoch for e in epochs] == [1, 2, 3]  # each once, none lost, the fake one replaced
        assert all(e.loss != 9.9 for e in epochs)
        assert run.epoch == 3 and run.step == run.total_steps
        assert {t.epoch for t in queries.triplet_rows(session, run_id, 3)} == {3}
        assert read_training_state_info(training_state_path(run))["epoch"] == 3


def test_resume_refuses_runs_it_cannot_continue(engine):
    run_id = create_training_run(engine, RunConfig(dataset="digits", epochs=2, batch_size=128))
    with pytest.raises(ValueError, match="is already queued; it can be resumed once it stops"):
        prepare_resume(engine, run_id)

    def stop_at_once(progress):
        raise Cancelled()

    assert execute_run(engine, run_id, on_step=stop_at_once, project=False)["status"] == "cancelled"
    with pytest.raises(ValueError, match="stopped before its first epoch ended"):
        prepare_resume(engine, run_id)
    with pytest.raises(LookupError, match="run 999 does not exist"):
        prepare_resume(engine, 999)

    # cancelled after its first epoch: resumable, and it completes with both epochs
    second = create_training_run(engine, RunConfig(dataset="digits", epochs=2, batch_size=128))

    def stop_in_epoch_two(progress):
        if progress.epoch == 2:
            raise Cancelled()

    assert execute_run(engine, second, on_step=stop_in_epoch_two, project=False)["status"] == "cancelled"
    assert prepare_resume(engine, second) == 1
    assert execute_run(engine, second, project=False, resume=True)["status"] == "completed"
    with pytest.raises(ValueError, match="is completed"):
        prepare_resume(engine, second)
