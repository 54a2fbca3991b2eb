"""A default training step's time by torch thread count, on this machine as it is and beside busy
loops: what core.threads' share buys over every core.

    python bench/threads.py [--busy 0 2] [--steps 10]

For each number of busy loops (`yes > /dev/null`, started here and ended after), prints one JSON
line: the median ms of a default training step (RunConfig defaults: small CNN, batch 256,
semi-hard triplet, 28×28 images) with 1 thread, with every core, and with the share
core.threads picks, plus the share and the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from core import threads  # noqa: E402
from core.training.config import RunConfig  # noqa: E402
from core.training.loop import build_training  # noqa: E402
from models.encoders import to_input  # noqa: E402
from train import load_images  # noqa: E402


def step_ms(training, pixels: torch.Tensor, labels: torch.Tensor, batches: list[torch.Tensor], warmup: int) -> float:
    times = []
    for i, picked in enumerate(batches):
        started = time.perf_counter()
        training(to_input(pixels[picked], 1), labels[picked], 1e-3)
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return 1000 * float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 2], help="busy loops beside the steps")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    pixels_np, labels_np, source = load_images(28, 10_000)
    pixels, labels = torch.from_numpy(pixels_np), torch.from_numpy(labels_np)
    cfg = RunConfig(dataset="bench", device="cpu")
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(len(pixels), (cfg.batch_size,), generator=generator)
               for _ in range(args.warmup + args.steps)]
    cores = threads.affinity_cores()
    for busy in args.busy:
        loops = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(busy)]
        try:
            time.sleep(1.0 if busy else 0.0)
            threads._kept = None  # measure now, beside these loops
            os.environ.pop(threads.ENV, None)
            share = threads.thread_share()
            row = {"busy_loops": busy, "cores": cores, "share": share, "load_average": os.getloadavg()[0],
                   "data": source, "batch": cfg.batch_size}
            for name, count in (("one_thread", 1), ("every_core", cores), ("share", share)):
                training = build_training(cfg, 1, torch.device("cpu"))  # sets the share; overridden next
                torch.set_num_threads(count)
                row[f"{name}_ms"] = step_ms(training, pixels, labels, batches, args.warmup)
            print(json.dumps(row), flush=True)
        finally:
            for loop in loops:
                loop.kill()
                loop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
