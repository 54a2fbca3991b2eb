"""Five people press Train at once on this machine: the five runs with the job queue
(EMBEDDING_LAB_MAX_JOBS, default one per core) against the same five all at once (the queue's
slots set to five: what the app did before the queue). Each run is started as the Train page
starts it (core.runs.jobs.create_training_run and start_worker, a process each), with no map jobs.
While they run, the Runs page is rendered again and again in this process (Streamlit's AppTest:
the page's whole script, as a visitor's request runs it) and its seconds are taken: the app's
response under the load.

    python bench/load.py [--runs 5] [--epochs 3] [--slots N]

Prints one JSON line per mode: each run's wall seconds (created to finished) and the seconds it
waited in the queue, the time until all finished, the CPU seconds the runs took together, and the
page renders' median and worst seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def render_seconds(page: str) -> float:
    from streamlit.testing.v1 import AppTest

    started = time.perf_counter()
    at = AppTest.from_file(str(ROOT / "pages" / page), default_timeout=300)
    at.run()
    if at.exception:
        raise RuntimeError(f"{page} raised: {at.exception[0].message}")
    return time.perf_counter() - started


def one_mode(slots: int, runs: int, epochs: int) -> dict:
    home = Path(tempfile.mkdtemp(prefix="bench-load-"))
    os.environ["EMBEDDING_LAB_HOME"] = str(home)
    os.environ.pop("EMBEDDING_LAB_DB", None)
    os.environ["EMBEDDING_LAB_MAX_JOBS"] = str(slots)
    from core.runs.jobs import create_training_run, start_worker
    from core.training.config import RunConfig
    from storage.db import make_engine, transaction
    from storage.schema import Run

    engine = make_engine()
    render_seconds("runs.py")  # warm: imports and the built-in dataset, not measured
    ids = [create_training_run(engine, RunConfig(dataset="digits", epochs=epochs, batch_size=64)) for _ in range(runs)]
    started = time.perf_counter()
    for run_id in ids:
        start_worker(engine, run_id, project=False)
    renders = []
    while True:
        renders.append(render_seconds("runs.py"))
        with transaction(engine) as session:
            rows = [session.get(Run, run_id) for run_id in ids]
            if all(row.status not in ("queued", "running") for row in rows):
                break
        time.sleep(1.0)
    total = time.perf_counter() - started
    with transaction(engine) as session:
        rows = [session.get(Run, run_id) for run_id in ids]
        walls = [round((row.finished_at - row.created_at).total_seconds(), 1) for row in rows]
        waits = [round((row.started_at - row.created_at).total_seconds(), 1) for row in rows]
        cpu = sum(row.seconds or 0 for row in rows)
        states = [row.status for row in rows]
    engine.dispose()
    return {"mode": "queue" if slots < runs else "all at once", "slots": slots, "runs": runs, "epochs": epochs,
            "status": states, "run_wall_s": walls, "queued_s": waits, "all_done_s": round(total, 1),
            "mean_run_wall_s": round(statistics.mean(walls), 1), "runs_training_s": round(cpu, 1),
            "page_renders": len(renders), "page_median_s": round(statistics.median(renders), 2),
            "page_worst_s": round(max(renders), 2), "load_average": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--slots", type=int, help="the queue's slots (default: one per core)")
    args = parser.parse_args(argv)
    slots = args.slots or len(os.sched_getaffinity(0))
    for mode_slots in (slots, args.runs):
        print(json.dumps(one_mode(mode_slots, args.runs, args.epochs)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
