"""What a wrong path or a curious visitor must never reach (issue 18, point 4): the database
password in a Ray job's runtime environment, the data folder's path under static/, an export
written over the database or a run's files, a device file read until memory runs out, and an
intermediate checkpoint exported as if it were the run's encoder."""
import io
import os
import socket
import stat
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest


def cli(*args) -> tuple[int, str, str]:
    """`python -m core ARGS` in this process: (exit status, stdout, stderr)."""
    from core.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = main(list(args))
    return status, out.getvalue(), err.getvalue()


def one_line_error(status: int, out: str, err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and not out and len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# ---------------------------------------------------------------- Ray jobs


class FakeJobs:
    """Ray's JobSubmissionClient as far as launch.start uses it: what it was asked to run."""

    def __init__(self) -> None:
        self.submitted: list[dict] = []

    def submit_job(self, **kwargs) -> str:
        self.submitted.append(kwargs)
        return kwargs["submission_id"]


def test_a_ray_job_never_carries_the_database_password(lab_home, monkeypatch):
    from core.runs import launch
    from storage import settings

    url = "postgresql+psycopg://lab:s3cret-pw@db.example.org:5432/lab"
    jobs = FakeJobs()
    monkeypatch.setenv(settings.DB_ENV, url)
    monkeypatch.setenv(launch.RAY_ENV, "http://ray-head.example.org:8265")
    monkeypatch.setattr(launch, "job_client", lambda address=None: jobs)
    launched = launch.start(["worker", "7"], 7, "worker.log")
    assert launched.job_id and len(jobs.submitted) == 1
    assert "s3cret-pw" not in repr(jobs.submitted[0])  # entrypoint, runtime_env, metadata: nowhere
    env = jobs.submitted[0]["runtime_env"]["env_vars"]
    assert settings.DB_ENV not in env
    secret = Path(env[settings.DB_FILE_ENV])
    assert secret.is_relative_to(lab_home) and stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(secret.parent.stat().st_mode) == 0o700

    # the job, started with that environment, finds the same database
    monkeypatch.delenv(settings.DB_ENV)
    monkeypatch.setenv(settings.DB_FILE_ENV, str(secret))
    assert settings.database_url() == url

    # a URL without a password (SQLite in the shared folder) is passed as it is
    monkeypatch.delenv(settings.DB_FILE_ENV)
    launch.start(["worker", "8"], 8, "worker.log")
    assert jobs.submitted[1]["runtime_env"]["env_vars"][settings.DB_ENV].startswith("sqlite:///")


# ---------------------------------------------------------------- exports


@pytest.fixture
def exported_run(lab_home):
    """A completed run with embeddings and a checkpoint-less second run still training."""
    from core.data.datasets import save_dataset
    from storage import artifacts
    from storage.db import make_engine, transaction
    from storage.run_files import RunFiles
    from storage.schema import Run, utcnow

    engine = make_engine()
    rng = np.random.default_rng(0)
    dataset_id = save_dataset(engine, "tiny", "upload", rng.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8),
                              list("aabbcc"), [f"i{i}.png" for i in range(6)], [f"h{i}" for i in range(6)])
    with transaction(engine) as session:
        done = Run(dataset_id=dataset_id, kind="embed", config={}, status="completed", finished_at=utcnow())
        running = Run(dataset_id=dataset_id, kind="train", config={}, status="running", pid=os.getpid(),
                      host=socket.gethostname(), heartbeat_at=utcnow(), started_at=utcnow(), epoch=2)
        session.add_all([done, running])
        session.flush()
        done.embeddings = RunFiles(done.id).relative("embeddings.npy")
        running.checkpoint = RunFiles(running.id).relative("encoder.safetensors")
        ids = done.id, running.id
    RunFiles(ids[0]).make()
    np.save(artifacts.absolute(RunFiles(ids[0]).relative("embeddings.npy")), rng.normal(size=(6, 4)).astype(np.float32))
    yield engine, ids
    engine.dispose()


def test_an_export_is_never_written_inside_the_data_folder(exported_run, lab_home, tmp_path):
    engine, (done, _) = exported_run
    database = lab_home / "lab.db"
    embeddings = lab_home / "runs" / str(done) / "embeddings.npy"
    before = database.read_bytes(), embeddings.read_bytes()
    link = tmp_path / "elsewhere"
    link.symlink_to(lab_home / "runs")
    for out in (database, embeddings, lab_home / "new.parquet", link / "x.parquet"):
        status, stdout, err = cli("export", "--run", str(done), "--format", "parquet", "--out", str(out), "--overwrite")
        one_line_error(status, stdout, err, "inside the data folder")
    assert (database.read_bytes(), embeddings.read_bytes()) == before
    assert not (lab_home / "new.parquet").exists() and not (lab_home / "runs" / "x.parquet").exists()
    status, stdout, _ = cli("export", "--run", str(done), "--format", "parquet", "--out", str(tmp_path / "ok.parquet"))
    assert status == 0 and (tmp_path / "ok.parquet").exists()


def test_a_database_file_outside_the_data_folder_is_refused_too(exported_run, lab_home, tmp_path, monkeypatch):
    _, (done, _) = exported_run
    elsewhere = tmp_path / "db" / "lab.db"
    elsewhere.parent.mkdir()
    monkeypatch.setenv("EMBEDDING_LAB_DB", f"sqlite:///{elsewhere}")
    from core.explore.export import _check_outside_the_lab

    with pytest.raises(ValueError, match="it is the database"):
        _check_outside_the_lab(elsewhere)
    with pytest.raises(ValueError, match="it is the database"):
        _check_outside_the_lab(elsewhere.with_name("lab.db-wal"))
    _check_outside_the_lab(elsewhere.with_name("other.parquet"))  # beside it is fine


def test_the_encoder_of_a_run_still_training_is_not_exported(exported_run, tmp_path):
    _, (_, running) = exported_run
    out = tmp_path / "encoder.safetensors"
    status, stdout, err = cli("export", "--run", str(running), "--format", "safetensors", "--out", str(out))
    one_line_error(status, stdout, err, f"run {running} is still running", "intermediate")
    assert not out.exists()


# ---------------------------------------------------------------- files named on the command line


@pytest.mark.parametrize("command", [
    ("search", "--run", "1", "--image"),
    ("import",),
    ("embed", "--dataset", "digits", "--checkpoint"),
])
def test_a_device_a_folder_or_a_huge_file_is_refused_before_it_is_read(lab_home, tmp_path, command):
    huge = tmp_path / ("huge.zip" if command == ("import",) else "huge.png")
    with open(huge, "wb") as handle:  # sparse: gigabytes on paper, nothing on disk
        handle.truncate(3 * 2**30)
    cases = [("/dev/zero", "/dev/zero is not a regular file"), (str(huge), "over the")]
    if command != ("import",):  # a folder is what import takes; the others take one file
        cases.append((str(tmp_path), "is a folder"))
    for path, fragment in cases:
        status, out, err = cli(*command, path)
        one_line_error(status, out, err, fragment)
    from storage.db import make_engine, transaction
    from storage.schema import Dataset, Run

    engine = make_engine()
    with transaction(engine) as session:  # nothing was stored by the refusals
        assert session.query(Run).count() == 0 and session.query(Dataset).filter(Dataset.name != "digits").count() == 0
    engine.dispose()
