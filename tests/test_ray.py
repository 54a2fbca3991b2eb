"""Runs as Ray jobs (this module holds every test of a local Ray head: `ray stop --force` ends
every head on the machine, so two modules with heads of their own in two pytest workers would
end each other's): a local head with token authentication; a digits run submitted from the
command line and from the page code path completes with its metrics (and its map as a job of its
own); cancel stops the job; a job that ends behind the app's back marks its run interrupted;
without the setting nothing of Ray is even imported."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.training.config import RunConfig
from storage.db import make_engine, transaction
from core.runs.jobs import cancel_run, create_training_run, prepare_resume, start_worker
from core.runs.parallel import TRAIN_FOLDER
from storage.run_files import RunFiles
from storage.schema import EpochRow, ProjectionRow, Run, TripletRow
from tests.test_cli_errors import refused
from tests.helpers import wait_for
from tests.raycluster import start_head, stop_head

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 420


@pytest.fixture(scope="module")
def head():
    """One head for the module; the clients here (this process and its children) hold its token."""
    ray_head, reason = start_head()
    if ray_head is None:
        pytest.skip(reason)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in ray_head.client_env.items():
            patch.setenv(name, value)
        forget_ray_auth()
        print(f"\nRay head started in {ray_head.seconds:.1f} s")
        yield ray_head
    forget_ray_auth()
    stop_head(ray_head)


def forget_ray_auth() -> None:
    """Ray keeps the authentication mode and token it first read in a process-wide cache: a test
    earlier in this process that reached Ray without a token (a cluster that cannot be reached)
    left "no authentication" there, and every job here was refused. Make it read them again."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        return
    from ray._private.authentication_test_utils import reset_auth_token_state

    reset_auth_token_state()


@pytest.fixture
def engine(head, tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDDING_LAB_HOME", str(tmp_path / "lab"))
    monkeypatch.delenv("EMBEDDING_LAB_DB", raising=False)
    engine = make_engine()
    yield engine
    engine.dispose()


def settled(engine, run_id: int, timeout: float = TIMEOUT) -> Run:
    """The run once it has ended (as read: a dead job's run reads interrupted, core.runs.lifecycle)."""
    deadline = time.monotonic() + timeout
    while True:
        with transaction(engine) as session:
            run = session.get(Run, run_id)
            if run.status not in ("queued", "running") or time.monotonic() > deadline:
                return run
        time.sleep(0.3)


def job_status(job_id: str, until=("SUCCEEDED", "FAILED", "STOPPED"), timeout: float = 120) -> str:
    """The job's status once it is one of `until` (the entrypoint may still be exiting after it
    stored the run's end)."""
    from core.runs.launch import job_client

    client = job_client()
    deadline = time.monotonic() + timeout
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in until or time.monotonic() > deadline:
            return status
        time.sleep(0.3)


def test_the_head_refuses_a_client_without_its_token(head):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    probe = subprocess.run([sys.executable, "-c", "import sys; from ray.job_submission import JobSubmissionClient as C; "
                            "C(sys.argv[1]).list_jobs()", head.address], env=env, capture_output=True, text=True,
                           timeout=120)
    assert probe.returncode != 0 and "token" in probe.stderr.lower()


def test_a_run_submitted_from_the_command_line_completes_with_its_metrics(engine):
    result = subprocess.run([sys.executable, "-m", "core", "train", "--dataset", "digits", "--epochs", "1",
                             "--batch-size", "128", "--wait-projection"], cwd=ROOT, env=dict(os.environ),
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "completed" and summary["precision_at_1"] > 0.5, summary
    assert summary["job_id"].startswith(f"embedding-lab-run-{summary['run_id']}-")
    assert f"submitted as Ray job {summary['job_id']}" in result.stderr
    assert job_status(summary["job_id"]) == "SUCCEEDED"
    assert summary["projection"]["status"] == "done", summary
    with transaction(engine) as session:
        run = session.get(Run, summary["run_id"])
        assert run.metrics["map_at_r"] == summary["map_at_r"] and run.job_id == summary["job_id"]
        maps = session.query(ProjectionRow).filter(ProjectionRow.run_id == run.id).all()
        # its statistics and map ran as a Ray job of their own, submitted by the run's job
        assert maps and all(m.job_id and m.job_id.startswith(f"embedding-lab-map-{run.id}-") for m in maps)


def test_a_run_started_as_the_pages_do_runs_on_the_cluster(engine):
    run_id = create_training_run(engine, RunConfig(dataset="digits", epochs=1, batch_size=128, device="cpu"))
    assert start_worker(engine, run_id) is None  # no local process: a job
    with transaction(engine) as session:
        job_id = session.get(Run, run_id).job_id
    assert job_id and job_id.startswith(f"embedding-lab-run-{run_id}-")
    run = settled(engine, run_id)
    assert run.status == "completed", run.reason
    assert run.metrics["precision_at_1"] > 0.5
    assert job_status(job_id) == "SUCCEEDED"
    from core.runs.launch import job_client

    assert job_client().get_job_info(job_id).metadata["embedding_lab_run"] == str(run_id)
    # the run's job queued its statistics and map as a job of their own; they end done
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        with transaction(engine) as session:
            maps = session.query(ProjectionRow).filter(ProjectionRow.run_id == run_id).all()
            states = [(m.status, m.job_id) for m in maps]
        if maps and all(status not in ("queued", "running") for status, _ in states):
            break
        time.sleep(0.5)
    assert states and all(status == "done" and job for status, job in states), states


def test_cancel_stops_the_runs_job(engine):
    run_id = create_training_run(engine, RunConfig(dataset="digits", epochs=200, batch_size=64, device="cpu"))
    start_worker(engine, run_id)
    run = wait_for(engine, run_id, lambda r: r.status == "running" and r.step > 0, timeout=TIMEOUT)
    assert cancel_run(engine, run_id) in ("running", "cancelled")
    run = settled(engine, run_id)
    assert run.status == "cancelled", (run.status, run.reason)
    assert job_status(run.job_id) == "STOPPED"


def test_a_job_that_ends_behind_the_apps_back_interrupts_its_run(engine):
    """A job that died without touching its run (say, the node lacked a package): the liveness
    check asks Ray, and the run says which job ended and how, long before any heartbeat runs out."""
    from core.runs.launch import job_client

    run_id = create_training_run(engine, RunConfig(dataset="digits", epochs=1, batch_size=128))
    job_id = job_client().submit_job(entrypoint=f"{sys.executable} -c \"raise SystemExit('no module named torch')\"")
    assert job_status(job_id) == "FAILED"
    with transaction(engine) as session:
        session.get(Run, run_id).job_id = job_id  # as start_worker leaves it, the job never claiming the run
    with transaction(engine) as session:
        run = session.get(Run, run_id)
        assert run.status == "interrupted"
        assert job_id in run.reason and "failed" in run.reason


def test_a_job_that_fails_on_an_import_says_which_module_in_its_runs_reason(engine):
    """A node whose Python lacks a package: the job fails before the worker can touch its run, and
    the run's reason carries the log's last lines, the ModuleNotFoundError with them (Ray's own
    message stopped at "last available logs (truncated to 20,000 chars):")."""
    from core.runs.launch import job_client

    run_id = create_training_run(engine, RunConfig(dataset="digits", epochs=1, batch_size=128))
    job_id = job_client().submit_job(entrypoint=f"{sys.executable} -c \"import no_such_module_of_embedding_lab\"")
    assert job_status(job_id) == "FAILED"
    with transaction(engine) as session:
        session.get(Run, run_id).job_id = job_id
    with transaction(engine) as session:
        run = session.get(Run, run_id)
        assert run.status == "interrupted"
        first, *tail = run.reason.splitlines()
        assert first == (f"its Ray job {job_id} ended failed: Job entrypoint command failed with exit code 1; its log "
                         "ends: ModuleNotFoundError: No module named 'no_such_module_of_embedding_lab'")
        assert tail[0] == f"the last lines of its log (ray job logs {job_id}):" and tail[-1] in first
        assert any(line.startswith("Traceback") for line in tail)


class FakeJobs:
    """A JobSubmissionClient's get_job_info and get_job_logs, for a job that failed; `logs` an
    exception to raise them."""

    def __init__(self, message: str, logs):
        self.message, self.logs, self.asked = message, logs, []

    def get_job_info(self, job_id):
        from types import SimpleNamespace

        return SimpleNamespace(status=SimpleNamespace(value="FAILED"), message=self.message)

    def get_job_logs(self, job_id):
        self.asked.append(job_id)
        if isinstance(self.logs, BaseException):
            raise self.logs
        return self.logs


RAY_MESSAGE = ("Job entrypoint command failed with exit code 1, last available logs (truncated to 20,000 chars):\n"
               "Traceback (most recent call last):\n")


def fake_cluster(monkeypatch, client: FakeJobs) -> None:
    from core.runs import launch

    monkeypatch.setenv(launch.RAY_ENV, "http://fake-head:8265")
    monkeypatch.setattr(launch, "job_client", lambda address=None: client)


@pytest.fixture
def local_engine(lab_home):
    engine = make_engine()
    yield engine
    engine.dispose()


def test_a_failed_jobs_reason_ends_with_the_last_lines_of_its_log(local_engine, monkeypatch):
    from core.runs import launch

    log = "".join(f"\x1b[32mline {i}\x1b[0m\n" for i in range(100))
    log += "Traceback (most recent call last):\n\n  File \"core/__main__.py\", line 1\n"
    log += "ModuleNotFoundError: No module named 'sqlalchemy'\n"
    client = FakeJobs(RAY_MESSAGE, log)
    fake_cluster(monkeypatch, client)
    run_id = create_training_run(local_engine, RunConfig(dataset="digits", epochs=1, batch_size=128))
    with transaction(local_engine) as session:
        session.get(Run, run_id).job_id = "raysubmit_fake_import"
    for _ in range(3):  # an ended job is asked once, its log fetched once
        with transaction(local_engine) as session:
            run = session.get(Run, run_id)
            assert run.status == "interrupted"
            reason = run.reason
    assert client.asked == ["raysubmit_fake_import"]
    first, said, *tail = reason.splitlines()
    # the first line, all that pages and the command line show, names the error
    assert first == ("its Ray job raysubmit_fake_import ended failed: Job entrypoint command failed with exit code 1; "
                     "its log ends: ModuleNotFoundError: No module named 'sqlalchemy'")
    assert said == "the last lines of its log (ray job logs raysubmit_fake_import):"
    assert len(tail) == launch.LOG_TAIL_LINES  # the blank line is not one of them
    assert tail[-1] == "ModuleNotFoundError: No module named 'sqlalchemy'"
    assert tail[0] == "line 83" and "line 82" not in reason and "\x1b" not in reason  # the last 20, colours removed


def test_a_failed_jobs_log_is_bounded_and_a_log_that_cannot_be_read_never_raises(monkeypatch):
    from core.runs import launch

    fake_cluster(monkeypatch, FakeJobs(RAY_MESSAGE, "x" * 100_000 + "\nModuleNotFoundError: No module named 'torch'\n"))
    (status, message), = launch.job_states(["raysubmit_long"]).values()
    assert status == "FAILED" and len(message) < launch.LOG_TAIL_CHARS + launch.LAST_LINE_CHARS + 300
    assert message.endswith("ModuleNotFoundError: No module named 'torch'") and "\n…xxx" in message
    # the logs out of reach: the lines Ray's message carries, else its first line alone
    fake_cluster(monkeypatch, FakeJobs(RAY_MESSAGE + "ImportError: libGL.so.1\n", ConnectionError("head gone")))
    assert launch.job_states(["raysubmit_a"])["raysubmit_a"][1] == (
        "Job entrypoint command failed with exit code 1; its log ends: ImportError: libGL.so.1\n"
        "the last lines of its log (ray job logs raysubmit_a):\nTraceback (most recent call last):\n"
        "ImportError: libGL.so.1")
    fake_cluster(monkeypatch, FakeJobs("Job entrypoint command failed with exit code 1. No logs available.",
                                       RuntimeError("no logs")))
    assert launch.job_states(["raysubmit_b"]) == {
        "raysubmit_b": ("FAILED", "Job entrypoint command failed with exit code 1. No logs available.")}


def test_without_the_setting_runs_are_local_processes_and_ray_is_never_imported(head, tmp_path):
    script = (
        "import sys\n"
        "from core.training.config import RunConfig\n"
        "from core.runs.jobs import cancel_run, create_training_run, start_worker\n"
        "from storage.db import make_engine\n"
        "engine = make_engine()\n"
        "run_id = create_training_run(engine, RunConfig(dataset='digits', epochs=1, batch_size=128))\n"
        "pid = start_worker(engine, run_id)\n"
        "cancel_run(engine, run_id)\n"
        "print(pid, 'ray' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("EMBEDDING_LAB_RAY_ADDRESS", "RAY_ADDRESS")}
    env.update(EMBEDDING_LAB_HOME=str(tmp_path / "lab"), PYTHONPATH=str(ROOT))
    env.pop("EMBEDDING_LAB_DB", None)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-2000:]
    pid, imported = done.stdout.split()
    assert int(pid) > 0 and imported == "False"


def test_an_unreachable_cluster_fails_the_run_with_the_reason(engine, monkeypatch):
    monkeypatch.setenv("EMBEDDING_LAB_RAY_ADDRESS", "http://127.0.0.1:1")
    run_id = create_training_run(engine, RunConfig(dataset="digits", epochs=1, batch_size=128))
    with pytest.raises(ValueError, match="Ray cluster at http://127.0.0.1:1"):
        start_worker(engine, run_id)
    with transaction(engine) as session:
        run = session.get(Run, run_id)
        assert run.status == "failed" and "http://127.0.0.1:1" in run.reason


def test_a_cuda_run_waits_for_a_gpu_and_a_cpu_run_does_not(engine):
    from core.runs.launch import job_client

    cuda = create_training_run(engine, RunConfig(dataset="digits", epochs=1, batch_size=128, device="cuda"))
    cpu = create_training_run(engine, RunConfig(dataset="digits", epochs=1, batch_size=128, device="cpu"))
    for run_id in (cuda, cpu):
        start_worker(engine, run_id, project=False)
    with transaction(engine) as session:
        cuda_job, cpu_job = session.get(Run, cuda).job_id, session.get(Run, cpu).job_id
    assert job_client().get_job_info(cuda_job).metadata["gpus"] == "1"
    assert job_client().get_job_info(cpu_job).metadata["gpus"] == "0"
    assert settled(engine, cpu).status == "completed"  # it ran meanwhile
    assert job_client().get_job_status(cuda_job).value == "PENDING"  # this head has no GPU to give it
    with transaction(engine) as session:
        assert session.get(Run, cuda).status == "queued"
    assert cancel_run(engine, cuda) == "cancelled"  # queued: cancelled at once, and Ray asked to stop its job
    # Ray cannot stop a job still waiting for its resources: should a GPU appear, its worker finds
    # the run cancelled and leaves without training (the worker's claim fails)
    assert job_client().get_job_status(cuda_job).value in ("STOPPED", "PENDING")


# --- one run on two Ray Train workers (core.runs.parallel) ---------------------------------------

EPOCHS = 4


@pytest.fixture(scope="module")
def ready(head):
    """A new head reports its CPUs only after a while; the refusal below needs them said. (Its
    job agent may lag too: a submission refused with "No available agent" was seen once.)"""
    from core.runs.launch import _cluster_totals

    deadline = time.monotonic() + 120
    while _cluster_totals() is None and time.monotonic() < deadline:
        time.sleep(1)
    time.sleep(5)


def test_more_workers_than_the_cluster_has_cpus_are_refused_in_one_line(ready, engine, tmp_path):
    result = subprocess.run([sys.executable, "-m", "core", "train", "--dataset", "digits", "--workers", "3"],
                            cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=TIMEOUT)
    refused(result, "3 workers need a CPU each, but the Ray cluster at", "has 2")
    with transaction(engine) as session:
        assert session.query(Run).count() == 0  # nothing queued


def test_a_two_worker_run_is_cancelled_then_resumed_from_its_checkpoint_to_completion(ready, engine):
    # margin 1.0: at the default margin the last batch of epoch 4 held no semi-hard triplet once
    # (2026-12-06), and the inspector rightly stored none for it; the wide band leaves some each epoch
    cfg = RunConfig(dataset="digits", epochs=EPOCHS, batch_size=64, device="cpu", workers=2, margin=1.0)
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
