"""What the pages read of the store, as plain data (core.runs.overview, core.data.catalog): no
page opens a transaction, so these functions decide what each page lists."""
import numpy as np
import pytest

from core.data.catalog import dataset_contents, dataset_summaries
from core.data.datasets import save_dataset
from core.runs.overview import run_snapshot, run_snapshots, runs_table, runs_to_follow
from storage.db import transaction
from storage.schema import EpochRow, Run


def _dataset(engine) -> int:
    pixels = np.zeros((4, 8, 8, 1), np.uint8)
    return save_dataset(engine, "tiny", "upload", pixels, ["a", "b", "a", "b"], [f"{i}.png" for i in range(4)],
                        [f"h{i}" for i in range(4)])


def _runs(engine, dataset_id: int, statuses: list[str], **values) -> list[int]:
    """One training run per status, oldest first."""
    with transaction(engine) as session:
        runs = [Run(dataset_id=dataset_id, kind="train", config={"loss": "triplet", "epochs": 3}, status=status,
                    **values) for status in statuses]
        session.add_all(runs)
        session.flush()
        return [run.id for run in runs]


def test_the_train_page_follows_active_runs_the_newest_finished_and_completed_and_its_own(engine):
    dataset_id = _dataset(engine)
    old, done, mine, running, cancelled, queued = _runs(
        engine, dataset_id, ["completed", "completed", "failed", "running", "cancelled", "queued"])
    assert [r.id for r in runs_to_follow(engine)] == [queued, cancelled, running, done]
    assert [r.id for r in runs_to_follow(engine, watching=mine)] == [queued, cancelled, running, mine, done]
    assert [r.id for r in runs_to_follow(engine, watching=999)] == [queued, cancelled, running, done]
    assert [r.active for r in runs_to_follow(engine)] == [True, False, True, False]
    assert old not in [r.id for r in runs_to_follow(engine)]


def test_snapshots_carry_the_dataset_and_the_stored_epochs(engine):
    dataset_id = _dataset(engine)
    trained, fresh = _runs(engine, dataset_id, ["completed", "queued"])
    with transaction(engine) as session:
        session.add_all([EpochRow(run_id=trained, epoch=e, loss=1.0 / e, easy=1, semi_hard=2, hard=3, seconds=0.1)
                         for e in (1, 2)])
    snapshots = {r.id: r for r in run_snapshots(engine)}
    assert snapshots[trained].stored_epochs == 2 and snapshots[fresh].stored_epochs == 0
    assert snapshots[trained].dataset_name == "tiny" and snapshots[trained].config["epochs"] == 3
    assert [r.id for r in run_snapshots(engine, completed_only=True)] == [trained]
    assert run_snapshot(engine, fresh).status == "queued"


def test_the_runs_table_has_a_ray_job_column_only_when_a_run_went_to_a_cluster(engine):
    dataset_id = _dataset(engine)
    _runs(engine, dataset_id, ["completed"], device="cpu")
    [row] = runs_table(engine)
    assert "Ray job" not in row and row["dataset"] == "tiny" and row["epochs"] == "0/3"
    _runs(engine, dataset_id, ["running"], job_id="raysubmit_1")
    rows = runs_table(engine)
    columns = list(rows[0])
    assert columns[columns.index("device") + 1] == "Ray job"
    assert [row["Ray job"] for row in rows] == ["raysubmit_1", ""]


def test_the_runs_table_counts_the_epochs_stored_not_the_one_in_progress(engine):
    [cancelled] = _runs(engine, _dataset(engine), ["cancelled"], epoch=3)  # stopped in epoch 3 of 3
    with transaction(engine) as session:
        session.add_all([EpochRow(run_id=cancelled, epoch=e, loss=1.0, easy=1, semi_hard=2, hard=3, seconds=0.1)
                         for e in (1, 2)])
    [row] = runs_table(engine)
    assert row["epochs"] == "2/3"


def test_the_time_left_is_the_steps_left_at_the_pace_so_far(engine):
    """The stored epochs' own seconds per step once an epoch is stored (not the worker's start or a
    resume's pause), the time since the start before that; none outside the training phase."""
    from datetime import timedelta

    from storage.schema import utcnow

    started = utcnow() - timedelta(seconds=100)
    [run_id] = _runs(engine, _dataset(engine), ["running"], phase="training", step=50, total_steps=300,
                     started_at=started)
    assert run_snapshot(engine, run_id).seconds_left() == pytest.approx(250 * 100 / 50, rel=0.02)
    with transaction(engine) as session:  # 3 epochs of 100 steps: one stored, in 40 s of its own
        session.get(Run, run_id).step = 120
        session.add(EpochRow(run_id=run_id, epoch=1, loss=1.0, easy=1, semi_hard=2, hard=3, seconds=40.0))
    run = run_snapshot(engine, run_id)
    assert run.stored_seconds == 40.0 and run.seconds_left() == pytest.approx(180 * 0.4)
    with transaction(engine) as session:
        session.get(Run, run_id).phase = "embedding"
    assert run_snapshot(engine, run_id).seconds_left() is None


def test_the_data_page_reads_summaries_and_contents(engine):
    dataset_id = _dataset(engine)
    [summary] = dataset_summaries(engine)
    assert (summary.id, summary.name, summary.n_images, summary.classes, summary.labeled) == (
        dataset_id, "tiny", 4, ("a", "b"), True)
    contents = dataset_contents(engine, dataset_id)
    assert contents.counts == {0: 2, 1: 2}
    assert [image.name for image in contents.images] == ["0.png", "1.png", "2.png", "3.png"]


def test_a_missing_dataset_is_named_alike_everywhere(engine):
    from core.data.catalog import dataset_cache_key
    from core.data.datasets import load_arrays
    from core.explore.service import dataset_pixels

    for lookup in (dataset_cache_key, load_arrays, dataset_pixels):
        with pytest.raises(LookupError, match=r"^dataset 77 does not exist$"):
            lookup(engine, 77)


def test_reading_a_ray_runs_row_without_a_cluster_set_never_reaches_for_ray(engine, monkeypatch):
    """A database that once ran on a Ray cluster, opened where none is set: its rows read by their
    heartbeat, and Ray is neither asked nor imported (it would guess a cluster and keep its guess)."""
    import sys

    from core.runs import launch

    monkeypatch.delenv(launch.RAY_ENV, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setitem(sys.modules, "ray.job_submission", None)  # an import of it raises ImportError
    assert launch.job_states(["raysubmit_1"]) == {}
    with pytest.raises(launch.LaunchError, match="no Ray cluster is set"):
        launch.job_client()


def test_an_epochs_stored_seconds_are_its_whole_wall_time_in_the_worker(engine, monkeypatch):
    """The time left is the stored epochs' seconds per step, so an epoch's seconds must hold all
    the worker does for it: on a small run the checkpoint and the probe take as long as the steps."""
    import time

    from core.runs import worker
    from core.runs.jobs import create_training_run
    from core.training.config import RunConfig

    spent = {"steps": [], "probe": [], "checkpoint": []}

    def timed(name, function):
        def wrapper(*args, **kwargs):
            began = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[name].append(time.perf_counter() - began)
        return wrapper

    fit = worker.fit

    def fit_hearing_the_epochs(cfg, data, on_step, on_epoch, **kwargs):
        def on_epoch_heard(stats, state):
            spent["steps"].append(stats.seconds)  # the loop's own measure: steps and evaluation
            on_epoch(stats, state)
        return fit(cfg, data, on_step, on_epoch_heard, **kwargs)

    monkeypatch.setattr(worker, "fit", fit_hearing_the_epochs)
    monkeypatch.setattr(worker, "store_probe", timed("probe", worker.store_probe))
    monkeypatch.setattr(worker, "save_checkpoint", timed("checkpoint", worker.save_checkpoint))
    run_id = create_training_run(engine, RunConfig(dataset="digits", epochs=2, batch_size=128))
    assert worker.execute_run(engine, run_id, project=False)["status"] == "completed"
    with transaction(engine) as session:
        stored = [row.seconds for row in session.get(Run, run_id).epochs]
    assert len(stored) == len(spent["steps"]) == len(spent["probe"]) == len(spent["checkpoint"]) == 2
    for seconds, steps, probe, checkpoint in zip(stored, spent["steps"], spent["probe"], spent["checkpoint"]):
        assert seconds >= steps + probe + checkpoint  # three parts of the epoch, one after another
    assert run_snapshot(engine, run_id).stored_seconds == pytest.approx(sum(stored))  # what the time left reads


def test_side_by_side_settings_read_a_whole_float_as_the_same_whole_number(engine):
    from core.runs.overview import settings_side_by_side

    dataset_id = _dataset(engine)
    with transaction(engine) as session:
        runs = [Run(dataset_id=dataset_id, kind="train", status="completed",
                    config={"loss": "triplet", "lr": lr, "options": {"memory_size": memory}})
                for memory, lr in ((256.0, 0.003), (256, 0.001))]  # the form stores 256.0, the CLI 256
        session.add_all(runs)
        session.flush()
        a, b = (run.id for run in runs)
    rows = {row["setting"]: row for row in settings_side_by_side(engine, [a, b])}
    memory = rows["Cross-batch memory M"]
    assert (memory[f"#{a}"], memory[f"#{b}"], memory["differs"]) == ("256", "256", "")
    assert (rows["Learning rate"][f"#{a}"], rows["Learning rate"]["differs"]) == ("0.003", "≠")
