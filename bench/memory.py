"""Peak memory of what a hosted Streamlit machine runs at once: the app server, a digits training
run (its worker, then its statistics and map jobs), and a browser session on the Explore page of a
run of 70,000 images. Hosted Streamlit gives an app 690 MB to 2.7 GB; the goal is 2.5 GB.

    python bench/memory.py --home DATA_FOLDER --run RUN_ID [--port 8591] [--seconds 150] [--cores 0]

--cores: the host's cores, as taskset takes them ("0": one core, the smallest hosted tier). The
app server and every process it or this script starts for the run (the worker, its map jobs) are
kept on them; the browser is not (it is the visitor's machine), so `taskset -c 0 python
bench/memory.py` would measure a browser starved of CPU instead.

DATA_FOLDER holds a completed run of the whole of Fashion-MNIST (70,000 images) with its map, e.g.
    EMBEDDING_LAB_HOME=/tmp/fm python -m core train --dataset fashion-mnist --wait-projection
The script starts `streamlit run app.py` on that folder, opens Explore on RUN_ID in Chromium
(the map renders in the browser: the browser is the visitor's memory, not the host's, and is not
counted), starts a 3-epoch digits run through the page code path (core.runs.jobs.start_worker), opens
the Train and Runs pages while it trains, and samples every process of the app's (the server,
the worker, the map jobs) four times a second until the run and its jobs end or --seconds pass.
Shared pages (torch's, numpy's libraries) are counted once: PSS (proportional set size) is the
figure that adds up across processes; the sum of RSS is printed too.

Prints one JSON object per line: each process kind's peak, then the peak of the total.

Measured on the 2-core dev machine (2026-11-24), a default Fashion-MNIST run (70,000 images, 128-d,
its UMAP map and map across epochs done), a 3-epoch digits run alongside (two runs, load 0.3-1.9):
  app server (Explore on the 70,000-point run, then Train and Runs): peak PSS 434-453 MB
  training worker (torch, CPU): 372-374 MB; its statistics and map job (faiss, numba): 500-516 MB
  all at once: peak PSS 776-805 MB (sum of RSS 872-879 MB), well inside 2.5 GB
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-background-networking", "--disable-component-update",
                  "--no-first-run", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]


def kind_of(process: psutil.Process) -> str:
    command = " ".join(process.cmdline())
    if "streamlit" in command:
        return "app server"
    if " worker " in f"{command} ":
        return "training worker"
    if " project " in f"{command} ":
        return "map jobs"
    return "other"


def sample(server: psutil.Process, workers: list[psutil.Process]) -> dict[str, tuple[int, int]]:
    """{kind: (pss, rss)} over the server, its children and the run's processes, in bytes."""
    seen, totals = set(), {}
    processes = [server, *server.children(recursive=True)]
    for worker in list(workers):
        processes.append(worker)
        try:
            processes.extend(worker.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    for process in processes:
        if process.pid in seen:
            continue
        seen.add(process.pid)
        try:
            info = process.memory_full_info()
            kind = kind_of(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        pss, rss = totals.get(kind, (0, 0))
        totals[kind] = (pss + info.pss, rss + info.rss)
    return totals


def wait_for_map(page, timeout: float = 180) -> float:
    """Seconds until the map component's frame has drawn its points (window.__map.ready): the
    first iframe on the page may be another component's, hidden."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        frame = next((f for f in page.frames if "embedding_map" in f.url), None)
        try:
            if frame is not None and frame.evaluate("() => Boolean(window.__map && window.__map.ready)"):
                return round(time.monotonic() - started, 1)
        except Exception:  # the frame was replaced by a rerun
            pass
        page.wait_for_timeout(250)
    raise SystemExit(f"the Explore map of run {page.url} did not draw within {timeout:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", required=True)
    parser.add_argument("--run", type=int, required=True)
    parser.add_argument("--port", type=int, default=8591)
    parser.add_argument("--seconds", type=float, default=150)
    parser.add_argument("--screenshot", help="save the Explore page here when the run has ended (PNG)")
    parser.add_argument("--cores", help="keep the app and its jobs on these cores (taskset's list, e.g. 0)")
    args = parser.parse_args()
    host_cores = None
    if args.cores:
        host_cores = {int(c) for part in args.cores.split(",") for c in (
            range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1))}
    os.environ["EMBEDDING_LAB_HOME"] = args.home
    os.environ.pop("EMBEDDING_LAB_DB", None)

    try:  # another program on the port would answer in the app's place
        socket.create_connection(("127.0.0.1", args.port), timeout=1).close()
        raise SystemExit(f"port {args.port} is already taken: choose another with --port")
    except OSError:
        pass
    confine = ["taskset", "-c", args.cores] if args.cores else []
    server_process = subprocess.Popen(
        confine + [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port",
         str(args.port), "--browser.gatherUsageStats", "false"], cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = psutil.Process(server_process.pid)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", args.port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.3)
    workers: list[psutil.Process] = []
    peaks: dict[str, tuple[int, int]] = {}
    peak_total = (0, 0)
    stop = threading.Event()

    def sampler() -> None:
        nonlocal peak_total
        while not stop.is_set():
            totals = sample(server, workers)
            for kind, (pss, rss) in totals.items():
                old = peaks.get(kind, (0, 0))
                peaks[kind] = (max(old[0], pss), max(old[1], rss))
            total = (sum(p for p, _ in totals.values()), sum(r for _, r in totals.values()))
            peak_total = (max(peak_total[0], total[0]), max(peak_total[1], total[1]))
            time.sleep(0.25)

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    started = time.monotonic()
    from playwright.sync_api import sync_playwright

    from core.training.config import RunConfig
    from core.runs.jobs import create_training_run, start_worker
    from storage.db import make_engine, transaction
    from storage.schema import ProjectionRow, Run

    engine = make_engine()
    base = f"http://127.0.0.1:{args.port}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{base}/explore?run={args.run}")
        map_ready_s = wait_for_map(page)
        page.wait_for_timeout(5_000)
        if host_cores:  # the worker started below inherits this process's cores, the browser keeps its own
            os.sched_setaffinity(0, host_cores)
        run_id = create_training_run(engine, RunConfig(dataset="digits", epochs=3, batch_size=128))
        workers.append(psutil.Process(start_worker(engine, run_id)))
        other = browser.new_page(viewport={"width": 1400, "height": 1000})
        other.goto(f"{base}/train")
        other.wait_for_timeout(5_000)
        other.goto(f"{base}/runs")
        while time.monotonic() - started < args.seconds:
            with transaction(engine) as session:
                run = session.get(Run, run_id)
                jobs = session.query(ProjectionRow).filter(ProjectionRow.run_id == run_id).all()
                pids = {job.pid for job in jobs if job.pid}
                done = run.status not in ("queued", "running") and jobs and all(
                    job.status not in ("queued", "running") for job in jobs)
            for pid in pids - {w.pid for w in workers}:
                try:
                    workers.append(psutil.Process(pid))
                except psutil.NoSuchProcess:
                    pass
            if done:
                break
            page.mouse.move(700, 500)  # the Explore session stays open and alive
            time.sleep(1)
        if args.screenshot:
            page.screenshot(path=args.screenshot, full_page=True)
        browser.close()
    stop.set()
    thread.join()
    server_process.terminate()
    server_process.wait(timeout=30)
    mb = 1024 * 1024
    for kind, (pss, rss) in sorted(peaks.items()):
        print(json.dumps({"process": kind, "peak_pss_mb": round(pss / mb), "peak_rss_mb": round(rss / mb)}))
    print(json.dumps({"process": "all at once", "peak_pss_mb": round(peak_total[0] / mb),
                      "peak_rss_mb": round(peak_total[1] / mb), "run": run_id, "run_status": run.status,
                      "map_jobs": sorted(job.status for job in jobs), "cores": args.cores or "all",
                      "explore_map_ready_s": map_ready_s,
                      "seconds": round(time.monotonic() - started, 1)}))


if __name__ == "__main__":
    main()
