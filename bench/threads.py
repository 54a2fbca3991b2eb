"""A default training step's time by torch thread count, on this machine as it is and beside busy
loops: what core.threads' share buys over every core.

    python bench/threads.py [--busy 0 2] [--steps 10]

For each number of busy loops (`yes > /dev/null`, started here and ended after), prints one JSON
line: the median ms of a default training step (RunConfig defaults: vgg_grid and supcon since
2026-12-06, batch 256, 28×28 images) with 1 thread, with every core, and with the share
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


def step_ms(counts: dict[str, int], pixels: torch.Tensor, labels: torch.Tensor, batches: list[torch.Tensor],
            warmup: int) -> dict[str, float]:
    """Median ms of a default training step at each named thread count; the counts take turns
    step by step, so a machine whose load changes slows them alike."""
    cfg = RunConfig(dataset="bench", device="cpu")
    trainings = {name: build_training(cfg, 1, torch.device("cpu")) for name in counts}
    times: dict[str, list[float]] = {name: [] for name in counts}
    for i, picked in enumerate(batches):
        for name, count in counts.items():
            torch.set_num_threads(count)
            started = time.perf_counter()
            trainings[name](to_input(pixels[picked], 1), labels[picked], 1e-3)
            if i >= warmup:
                times[name].append(time.perf_counter() - started)
    return {f"{name}_ms": 1000 * float(np.median(values)) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 2], help="busy loops beside the steps")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    pixels_np, labels_np, source = load_images(28, 10_000)
    pixels, labels = torch.from_numpy(pixels_np), torch.from_numpy(labels_np)
    batch_size = RunConfig(dataset="bench").batch_size
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(len(pixels), (batch_size,), generator=generator)
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
                   "data": source, "batch": batch_size}
            row.update(step_ms({"one_thread": 1, "every_core": cores, "share": share}, pixels, labels, batches,
                               args.warmup))
            print(json.dumps(row), flush=True)
        finally:
            for loop in loops:
                loop.kill()
                loop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
