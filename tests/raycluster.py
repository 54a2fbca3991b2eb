"""A local Ray head for the tests and the benchmark, with token authentication on: `ray start
--head --num-cpus 2` in a short temporary folder (Ray's socket paths must stay short), its
dashboard (the Jobs API) on 127.0.0.1 at a free port. `stop_head` ends its processes alone (by
pid: those naming its folder or its port, and their children), never `ray stop --force`, which
would end every Ray head on the machine, another test process's too."""
from __future__ import annotations

import os
import secrets
import shutil
import signal
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
    port: int = 0  # its GCS port: processes that do not name the folder name this

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
    dashboard, port = _free_port(), _free_port()
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0")
    env.pop("EMBEDDING_LAB_RAY_ADDRESS", None)
    env.pop("RAY_ADDRESS", None)
    began = time.monotonic()
    done = subprocess.run(
        [ray, "start", "--head", "--num-cpus", "2", "--num-gpus", "0", "--disable-usage-stats",
         "--port", str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
         "--include-dashboard", "true", "--temp-dir", str(folder)],
        env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        stop_head(RayHead("", token, folder, 0.0, port))  # whatever of it did start
        return None, f"`ray start --head` failed: {(done.stdout + done.stderr)[-1500:]}"
    head = RayHead(f"http://127.0.0.1:{dashboard}", token, folder, 0.0, port)
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


def stop_head(head: RayHead, grace: float = 3) -> None:
    """End this head's processes (SIGTERM, then SIGKILL after `grace` seconds) and remove its folder.
    The grace is short because the GCS server and the autoscaler's monitor ignore SIGTERM here
    (seen: both still up after 20 s, the rest gone within a second), so a long grace was only a
    wait of that length at the end of every module with a head. Only its own: `ray stop --force` would end every head on the machine (that of another test
    process beside this one), so it is used only where /proc cannot tell which processes are this
    head's."""
    if not Path("/proc/self/cmdline").exists():
        ray = ray_command()
        if ray:
            subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=120,
                           env=dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=head.token))
    else:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = _head_processes(head)
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + grace
            while pids and time.monotonic() < deadline:
                pids = {pid for pid in pids if Path(f"/proc/{pid}").exists() and _state(pid) != "Z"}
                time.sleep(0.2)
            if not pids:
                break
    shutil.rmtree(head.folder, ignore_errors=True)


def _head_processes(head: RayHead) -> set[int]:
    """The head's processes: those whose arguments name its folder or end with its GCS port (the
    client server's --address), and every descendant of those (the workers, the dashboard's
    modules, a job's entrypoint), taken at once so that none is missed for being re-parented."""
    children: dict[int, list[int]] = {}
    roots = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        try:
            arguments = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # ended meanwhile
        children.setdefault(parent, []).append(pid)
        if any(str(head.folder) in a or (head.port and a.endswith(f":{head.port}")) for a in arguments):
            roots.append(pid)
    found, waiting = set(), list(roots)
    while waiting:
        pid = waiting.pop()
        if pid not in found:
            found.add(pid)
            waiting.extend(children.get(pid, []))
    return found


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"
