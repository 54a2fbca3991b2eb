"""Where a run's process starts: a local process (the default), or a job on a Ray cluster.

With EMBEDDING_LAB_RAY_ADDRESS (or Ray's own RAY_ADDRESS) set, training, embedding and map jobs
are submitted through Ray's Jobs API: the entrypoint is the same `python -m core worker RUN_ID`
(or `project ...`), the project's code travels as the job's working_dir, and the job is given
this process's data folder and database, which must therefore be reachable from the cluster's
nodes (a shared path; PostgreSQL or another server database). Progress still flows through the
database, so the pages do not change. The submission id names the run and is stored with it, so
cancel can stop the job and the liveness check can ask for its status.

Ray is imported only when the setting is there: the app runs without it installed.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from storage.run_files import RunFiles
from storage.settings import DB_ENV, DB_FILE_ENV, HOME_ENV, data_home, database_url, write_url_file

RAY_ENV = "EMBEDDING_LAB_RAY_ADDRESS"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
# what a job needs of the project is its code: never the data, the browser build, the tests
WORKING_DIR_EXCLUDES = [".git", ".embedding-lab", "static", ".map-homes", "deploy", "tests", "bench", "**/__pycache__", "*.pyc",
                        "pages/map/frontend", ".pytest_cache", ".benchmarks", "*.egg-info"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# what a failed job's reason keeps of its log (JobSubmissionClient.get_job_logs): its last lines,
# bounded, so a job that printed megabytes still gives a reason a page can show
LOG_TAIL_LINES = 20
LOG_TAIL_CHARS = 4000
LAST_LINE_CHARS = 300  # of the log's last line, in the reason's first line
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class LaunchError(ValueError):
    """The run's process cannot be started; the message says why in one sentence."""


@dataclass(frozen=True)
class Launched:
    """A local process (pid, host) or a Ray job (job_id)."""

    pid: Optional[int] = None
    host: Optional[str] = None
    job_id: Optional[str] = None


def ray_address() -> Optional[str]:
    """The Ray cluster's address (its dashboard, e.g. http://head:8265) when runs go there; None
    for local processes."""
    return (os.environ.get(RAY_ENV) or os.environ.get("RAY_ADDRESS") or "").strip() or None


def job_client(address: Optional[str] = None):
    """Ray's JobSubmissionClient for the cluster; LaunchError naming the address and the reason when
    ray is not installed or the cluster does not answer."""
    address = address or ray_address()
    if address is None:  # never ask Ray to find a cluster by itself: it would guess, and cache its guess
        raise LaunchError(f"no Ray cluster is set: {RAY_ENV} (or RAY_ADDRESS) names none")
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError:
        raise LaunchError(f"{RAY_ENV} is set ({address}) but ray is not installed here; "
                          "pip install -r requirements-ray.txt, or unset it to run locally") from None
    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # ConnectionError, auth errors, a malformed address: all said in one line
        raise LaunchError(f"the Ray cluster at {address} cannot be reached: {_first_line(exc)}") from None


def start(arguments: list[str], run_id: int, log_name: str, gpus: float = 0, cpus: float = 1) -> Launched:
    """`python -m core ARGUMENTS` for run `run_id`, with this process's data folder and database:
    a local process in a new session (its output in the run's folder), or a Ray job asking for
    `gpus` GPUs and `cpus` CPUs. LaunchError when the Ray job cannot be submitted."""
    address = ray_address()
    if address is None:
        return Launched(pid=_local(arguments, run_id, log_name), host=socket.gethostname())
    client = job_client(address)
    logging.getLogger("ray").setLevel(logging.ERROR)  # not a line per file packed: failures raise below
    kind = "map" if arguments[0] == "project" else "run"
    submission_id = f"embedding-lab-{kind}-{run_id}-{uuid.uuid4().hex[:8]}"
    env = {HOME_ENV: str(data_home()), RAY_ENV: address, **_database_for_job()}
    try:
        job_id = client.submit_job(
            entrypoint=" ".join(["python", "-m", "core", *arguments]),
            submission_id=submission_id,
            runtime_env={"working_dir": str(PROJECT_ROOT), "excludes": WORKING_DIR_EXCLUDES, "env_vars": env},
            entrypoint_num_cpus=cpus,
            entrypoint_num_gpus=gpus,
            metadata={"embedding_lab_run": str(run_id), "log": log_name, "gpus": str(gpus)},
        )
    except Exception as exc:
        raise LaunchError(f"the Ray cluster at {address} did not take run {run_id}'s job: {_first_line(exc)}") from None
    return Launched(job_id=job_id)


def _database_for_job() -> dict[str, str]:
    """How a Ray job finds the database: a URL without a password as it is; one with a password
    through a file only this user can read in the shared data folder (storage.settings'
    write_url_file), never in the job's runtime environment, which Ray's Jobs API shows to anyone
    who can list jobs."""
    from sqlalchemy.engine import make_url

    url = database_url()
    if make_url(url).password is None:
        return {DB_ENV: url}
    return {DB_FILE_ENV: str(write_url_file(url))}


def gpus_for(device: Optional[str]) -> float:
    """What a job asks Ray for: a GPU when the run's device is cuda; none for cpu; for auto, a GPU
    only when the cluster has one (so a CPU cluster still runs it)."""
    if device == "cuda":
        return 1
    if device == "auto":
        return 1 if _cluster_gpus() > 0 else 0
    return 0


def check_workers(workers: int, device: str) -> None:
    """LaunchError, before any row exists, when a run asks for `workers` data-parallel workers
    (core.runs.parallel) that cannot be had: none is needed for one; more need a Ray cluster
    (EMBEDDING_LAB_RAY_ADDRESS) with a CPU (a GPU, for a GPU run) for each. A cluster whose
    dashboard does not say its size is not refused here (Ray keeps the job waiting instead)."""
    if workers <= 1:
        return
    address = ray_address()
    if address is None:
        raise LaunchError(f"{workers} workers train on a Ray cluster, and none is set: set {RAY_ENV} to its "
                          "dashboard's address (see the README), or train with one worker")
    totals = _cluster_totals()
    if totals is None:
        return
    kind = "GPU" if gpus_for(device) > 0 else "CPU"
    have = totals.get(kind, 0.0)
    if workers > have:
        raise LaunchError(f"{workers} workers need a {kind} each, but the Ray cluster at {address} has {have:g}; "
                          f"ask for at most {max(1, int(have))}")


def _cluster_gpus() -> float:
    """GPUs of the cluster as its dashboard reports them (0 when it cannot tell)."""
    return (_cluster_totals() or {}).get("GPU", 0.0)


def _cluster_totals() -> Optional[dict[str, float]]:
    """{resource: total} of the cluster (CPU, GPU, ...) as its dashboard reports them; None when it
    cannot tell (no answer, or no CPU reported yet)."""
    try:
        import json
        import urllib.request

        from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

        address = ray_address() or ""
        base = address if "://" in address else f"http://{address}"
        request = urllib.request.Request(f"{base.rstrip('/')}/api/cluster_status",
                                         headers=get_auth_headers_if_auth_enabled({}))
        with urllib.request.urlopen(request, timeout=10) as reply:
            status = json.loads(reply.read())
        usage = status["data"]["clusterStatus"]["loadMetricsReport"]["usage"]
        totals = {name: float(used_total[1]) for name, used_total in usage.items()}
    except Exception:
        return None
    # a head that has just started reports no resources for a few seconds: that is not knowing
    return totals if totals.get("CPU", 0) > 0 else None


def stop_job(job_id: str) -> None:
    """Ask Ray to stop the job (SIGTERM, then SIGKILL after Ray's grace period); quiet when the job
    has ended or the cluster is not there (the run's cancel flag stops the worker too)."""
    try:
        job_client().stop_job(job_id)
    except Exception:
        pass


def job_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """{job id: (status, message)} for the jobs Ray knows; {} when the cluster cannot be asked
    (then liveness rests on the heartbeat alone). A failed job's message ends with the last lines
    of its log (failure_message): why it failed, a missing module say, which Ray's own message
    only promises."""
    if not job_ids or ray_address() is None:  # rows of a cluster this app no longer uses: the heartbeat decides
        return {}
    try:
        client = job_client()
    except LaunchError:
        return {}
    states = {}
    for job_id in job_ids:
        try:
            info = client.get_job_info(job_id)
        except Exception:
            continue  # unknown to the cluster (a head restarted): the heartbeat decides
        status, message = str(getattr(info.status, "value", info.status)), info.message or ""
        if status == "FAILED":
            message = failure_message(client, job_id, message)
        states[job_id] = (status, message)
    return states


def failure_message(client, job_id: str, message: str) -> str:
    """A failed job's message as a run's reason gives it. Its first line (all that pages and the
    command line show) is Ray's own first line, without its promise of "last available logs", and
    the log's last line, which for a Python that stopped is the error ("ModuleNotFoundError: No
    module named 'sqlalchemy'"); the last LOG_TAIL_LINES lines of the log follow, at most
    LOG_TAIL_CHARS. The log is client.get_job_logs's; when that cannot be fetched, the lines Ray's
    message itself carries. Never raises: a log that cannot be read leaves Ray's first line alone."""
    lines = (message or "").strip().splitlines()
    first = re.sub(r",? *last available logs.*$", "", lines[0]).strip() if lines else ""
    try:
        log = client.get_job_logs(job_id)
    except Exception:
        log = None
    tail = log_tail(log if isinstance(log, str) and log.strip() else "\n".join(lines[1:]))
    if not tail:
        return first
    last = tail.splitlines()[-1][-LAST_LINE_CHARS:]
    return f"{first}; its log ends: {last}\nthe last lines of its log (ray job logs {job_id}):\n{tail}"


def log_tail(text: str, lines: int = LOG_TAIL_LINES, limit: int = LOG_TAIL_CHARS) -> str:
    """The last `lines` non-blank lines of `text` (terminal colours removed), cut to its last `limit`
    characters ("…" first when cut)."""
    kept = [line.rstrip() for line in _ANSI.sub("", text or "").splitlines() if line.strip()][-lines:]
    tail = "\n".join(kept)
    return tail if len(tail) <= limit else "…" + tail[-(limit - 1):]


def _local(arguments: list[str], run_id: int, log_name: str) -> int:
    """`python -m core ARGUMENTS` in a new session, with this process's data home and database."""
    env = dict(os.environ, **{HOME_ENV: str(data_home()), DB_ENV: database_url()})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    from storage.artifacts import disk_full_reason

    try:
        log = open(RunFiles(run_id).log(log_name), "ab")
    except OSError as exc:  # the run is failed with this reason (core.runs.jobs), not left queued
        raise LaunchError(disk_full_reason(exc, RunFiles(run_id).absolute())
                          or f"cannot write the log {RunFiles(run_id).absolute(log_name)}: {exc.strerror or exc}") from None
    with log:
        process = subprocess.Popen(
            [sys.executable, "-m", "core", *arguments], cwd=PROJECT_ROOT, env=env,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    return process.pid


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
