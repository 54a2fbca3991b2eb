"""A local Ray head for the tests and the benchmark, with token authentication on: `ray start
--head --num-cpus 2` in a short temporary folder (Ray's socket paths must stay short), its
dashboard (the Jobs API) on 127.0.0.1 at a free port; `ray stop --force` ends it."""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


def ray_command() -> Optional[str]:
    found = shutil.which("ray")
    if found:
        return found
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.exists() else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class RayHead:
    address: str  # the dashboard's http address: what EMBEDDING_LAB_RAY_ADDRESS names
    token: str  # what RAY_AUTH_TOKEN must hold on every client
    folder: Path
    seconds: float  # from `ray start` until the Jobs API answered

    @property
    def client_env(self) -> dict[str, str]:
        return {"EMBEDDING_LAB_RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}


def start_head(timeout: float = 240) -> tuple[Optional[RayHead], str]:
    """(the head, "") or (None, why it could not start)."""
    ray = ray_command()
    if ray is None:
        return None, "ray is not installed (pip install -r requirements-ray.txt)"
    folder = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    token = secrets.token_hex(24)
    dashboard = _free_port()
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0")
    env.pop("EMBEDDING_LAB_RAY_ADDRESS", None)
    env.pop("RAY_ADDRESS", None)
    began = time.monotonic()
    done = subprocess.run(
        [ray, "start", "--head", "--num-cpus", "2", "--num-gpus", "0", "--disable-usage-stats",
         "--port", str(_free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
         "--include-dashboard", "true", "--temp-dir", str(folder)],
        env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        return None, f"`ray start --head` failed: {(done.stdout + done.stderr)[-1500:]}"
    head = RayHead(f"http://127.0.0.1:{dashboard}", token, folder, 0.0)
    deadline = time.monotonic() + timeout
    probe = [sys.executable, "-c", "import sys; from ray.job_submission import JobSubmissionClient as C; "
             "C(sys.argv[1]).list_jobs()", head.address]
    while time.monotonic() < deadline:
        answered = subprocess.run(probe, env=dict(env, **head.client_env), capture_output=True, text=True, timeout=120)
        if answered.returncode == 0:
            head.seconds = time.monotonic() - began
            return head, ""
        time.sleep(1)
    stop_head(head)
    return None, f"the Ray head started but its Jobs API never answered: {answered.stderr[-1500:]}"


def stop_head(head: RayHead) -> None:
    ray = ray_command()
    if ray:
        subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=120,
                       env=dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=head.token))
    shutil.rmtree(head.folder, ignore_errors=True)
