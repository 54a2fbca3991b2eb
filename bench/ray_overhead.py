"""What running through Ray costs: how long a local head takes to start here, and the same short
digits training run (2 epochs, batch 128, with no map) as a local worker process and as a Ray job,
from start_worker to the run stored completed, each --repeat times (the first Ray job also packs
and uploads the project's code; later ones find it on the cluster).

    python bench/ray_overhead.py [--repeat 3]

Prints one JSON object per line. Measured on the 2-core dev machine (2026-11-24, load 0.6-0.9):
  local worker process: 3.50, 3.07, 3.25 s (median 3.25)
  ray head start (`ray start --head` until the Jobs API answers, token auth on): 6.56 s
  ray job: 5.60 (code packed and uploaded), 4.36, 4.46 s (median 4.46): about 1.2 s more per run
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


def one_run(engine) -> float:
    from core.training.config import RunConfig
    from core.runs.jobs import create_training_run, start_worker
    from storage.db import transaction
    from storage.schema import Run

    run_id = create_training_run(engine, RunConfig(dataset="digits", epochs=2, batch_size=128, device="cpu"))
    began = time.monotonic()
    start_worker(engine, run_id, project=False)
    while True:
        with transaction(engine) as session:
            run = session.get(Run, run_id)
            if run.status not in ("queued", "running"):
                assert run.status == "completed", run.reason
                return time.monotonic() - began
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    os.environ["EMBEDDING_LAB_HOME"] = tempfile.mkdtemp(prefix="ray-bench-")
    os.environ.pop("EMBEDDING_LAB_DB", None)
    for name in ("EMBEDDING_LAB_RAY_ADDRESS", "RAY_ADDRESS"):
        os.environ.pop(name, None)
    from storage.db import make_engine
    from tests.raycluster import start_head, stop_head

    engine = make_engine()
    from core.data.datasets import ensure_builtin

    ensure_builtin(engine, "digits")
    local = [one_run(engine) for _ in range(args.repeat)]
    print(json.dumps({"what": "local worker process", "seconds": [round(s, 2) for s in local],
                      "median": round(statistics.median(local), 2)}))
    head, reason = start_head()
    if head is None:
        print(json.dumps({"what": "ray head", "error": reason}))
        return
    print(json.dumps({"what": "ray head start (ray start --head until the Jobs API answers)",
                      "seconds": round(head.seconds, 2)}))
    try:
        os.environ.update(head.client_env)
        through_ray = [one_run(engine) for _ in range(args.repeat)]
        print(json.dumps({"what": "ray job", "seconds": [round(s, 2) for s in through_ray],
                          "median": round(statistics.median(through_ray), 2),
                          "overhead_median": round(statistics.median(through_ray) - statistics.median(local), 2)}))
    finally:
        stop_head(head)


if __name__ == "__main__":
    main()
