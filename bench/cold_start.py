"""How long a freshly started app takes to answer its first visitor: `streamlit run app.py` on an
empty data folder (the README's command), then Chromium opens the app and waits for the Data
page's heading, then for the page's script run to end (the built-in digits are imported on that
first run). Run it under `taskset -c 0` for the smallest hosted tier's one core.

    taskset -c 0 python bench/cold_start.py [--port 8593] [--runs 3]

Prints one JSON line per start: seconds until the server answers its health check, until the
heading shows, until the first page is whole; and the server's peak RSS meanwhile.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):  # the peak resident set
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def one_start(port: int) -> dict:
    """The browser is started first (it is the visitor's machine, not the host's)."""
    from playwright.sync_api import sync_playwright

    home = Path(tempfile.mkdtemp(prefix="bench-cold-"))
    env = dict(os.environ, EMBEDDING_LAB_HOME=str(home))
    env.pop("EMBEDDING_LAB_DB", None)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page()
        started = time.perf_counter()
        server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
                                   "--server.port", str(port), "--browser.gatherUsageStats", "false"],
                                  cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        try:
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1) as reply:
                        if reply.status == 200:
                            break
                except OSError:
                    time.sleep(0.05)
                if time.perf_counter() - started > 120:
                    raise TimeoutError("the server did not answer in 120 s")
            healthy = time.perf_counter() - started
            page.goto(f"http://127.0.0.1:{port}/")
            page.get_by_role("heading", name="Data", exact=True).wait_for(timeout=120_000)
            heading = time.perf_counter() - started
            page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=120_000)
            whole = time.perf_counter() - started
        finally:
            peak = rss_mb(server.pid)
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
            browser.close()
            shutil.rmtree(home, ignore_errors=True)
    return {"health_s": round(healthy, 2), "first_heading_s": round(heading, 2), "first_page_whole_s": round(whole, 2),
            "server_peak_rss_mb": round(peak), "cores": len(os.sched_getaffinity(0))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8593)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    for _ in range(args.runs):
        print(json.dumps(one_start(args.port)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
