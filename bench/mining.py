"""Triplet losses over whole categories, ours against pytorch-metric-learning (pml), same process.

    python bench/mining.py [--device cpu|cuda] [--batch N ...] [--quick] [--pml-max-batch N]

Per batch size B (d = 128, L2-normalised random embeddings), label set (10 classes, or P×K with
K = 4) and kind, one forward + backward from the embeddings:

- semi-hard / hard / all: ours `range_triplet_loss` (sorted negatives, binary search, a B×B
  weight matrix; O(B²) memory) against pml TripletMarginMiner(type_of_triplets=kind) +
  TripletMarginLoss, which lists every triplet;
- batch-hard: ours TripletLoss(miner="batch-hard") against pml BatchHardMiner +
  TripletMarginLoss (mining plus the loss on the mined triplets).

Prints one JSON object per line, then a table. Time: median of up to --reps timed calls after
one warm-up call, fewer when calls are slow (about 1 s of timed calls, at least one);
torch.cuda.synchronize around each call on CUDA. Peak memory: on CUDA, max_memory_allocated
above what was allocated before the call; on CPU (torch keeps no CPU allocation statistics), the rise of the process's
peak resident set (VmHWM, reset through /proc/self/clear_refs) over its resident set just before
the call, after gc and malloc_trim; it counts everything the call touches, tensors or not.
pml is not run where its estimated memory exceeds what is free ("skipped (memory)"), above
--pml-max-batch ("skipped (time)"; on CPU pml takes ~20 s per call at B = 1024) or past B = 2048.

First GPU figures, 2026-12-04, one NVIDIA H200 (torch 2.11+cu130), `python bench/mining.py --device cuda`
(ms per forward + backward; peak MB on the GPU; losses equal to pml's to the printed digits):

     B    labels       kind  ours ms  pml ms  speedup  ours MB  pml MB
   256  10-class  semi-hard     3.06     2.9       1x      3.5      74
   512  10-class  semi-hard     2.49     7.9       3x     13.9     612
  1024  10-class  semi-hard     2.56    51.4      20x     54.7    4824
  1024  10-class        all     2.18    93.8      43x     53.8    7732
  1024       PxK  semi-hard     2.53     8.2       3x     47.7    1100
  2048  10-class  semi-hard     2.70   673.3     250x    219.1   38769
  2048  10-class        all     2.33  1015.3     436x    216.7   61955
  2048       PxK  semi-hard     2.30   315.7     138x    189.4     648
  2048  10-class batch-hard     1.96     3.1       2x    105.0     117
  4096  10-class  semi-hard     4.12   (not run, B > 2048)     865.0
Ours stays at 2–4 ms (kernel launches, not arithmetic) up to B = 4096; pml's lists of triplets
grow as B³ in time and memory (62 GB at B = 2048 with 10 classes).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/mining.py` from anywhere

from core.metric.losses import TripletLoss  # noqa: E402
from core.metric.distances import pairwise_distances  # noqa: E402
from core.metric.mining import range_triplet_loss  # noqa: E402

KINDS = ("semi-hard", "hard", "all", "batch-hard")
LABEL_SETS = ("10-class", "PxK")
MARGIN, DIM, CLASSES, K = 0.2, 128, 10, 4
PML_LARGEST = 2048
TIMED_S = 1.0  # rough budget of timed calls per row and side


def make_batch(size: int, labels: str, device: str, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    embeddings = F.normalize(torch.randn(size, DIM, generator=generator), dim=1)
    if labels == "10-class":
        label_tensor = torch.randint(CLASSES, (size,), generator=generator)
    else:
        label_tensor = torch.arange(size // K).repeat_interleave(K)[torch.randperm(size, generator=generator)]
    return embeddings.to(device), label_tensor.to(device)


def ours_step(kind: str):
    batch_hard = TripletLoss(margin=MARGIN, miner="batch-hard")

    def step(x, labels):
        if kind == "batch-hard":
            loss = batch_hard(x, labels)
        else:
            loss, _ = range_triplet_loss(pairwise_distances(x), labels, MARGIN, kind)
        loss.backward()
        return float(loss.detach())

    return step


def pml_step(kind: str):
    from pytorch_metric_learning import losses, miners

    if kind == "batch-hard":
        miner = miners.BatchHardMiner()
    else:
        miner = miners.TripletMarginMiner(margin=MARGIN, type_of_triplets=kind.replace("-", ""))
    loss_fn = losses.TripletMarginLoss(margin=MARGIN)

    def step(x, labels):
        loss = loss_fn(x, labels, miner(x, labels))
        loss.backward()
        return float(loss.detach())

    return step


def pml_estimated_bytes(labels: torch.Tensor) -> int:
    """pml lists every valid triplet (int64 a, p, n, then the mined ones, their distances and
    margins: about 64 bytes each) and, while B³ < 2³¹, first a B×B×B uint8 mask."""
    same = labels[:, None] == labels[None, :]
    positives = same.sum(dim=1) - 1
    every_triplet = int((positives * (~same).sum(dim=1)).sum())
    size = len(labels)
    cube = size**3 if size**3 < 2**31 else 0
    return cube + 64 * every_triplet


def free_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_peak_mb(device: str, call):
    """(result of call(), peak MB above the memory in use before it; None if unmeasurable)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = call()
        torch.cuda.synchronize()
        return result, (torch.cuda.max_memory_allocated() - before) / 2**20
    _malloc_trim()
    try:
        before = _status_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    except (OSError, RuntimeError):
        return call(), None
    result = call()
    return result, (_status_kb("VmHWM") - before) / 1024


def run(step, x, labels, device: str, reps: int) -> dict:
    """Warm-up, one memory-measured call, then timed calls; ms is the median of those."""

    def call():
        leaf = x.detach().clone().requires_grad_()
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = step(leaf, labels)
        if device == "cuda":
            torch.cuda.synchronize()
        return loss, time.perf_counter() - start

    (loss, warm_s) = call()
    (loss, first_s), peak_mb = measure_peak_mb(device, call)
    wanted = max(1, min(reps, math.ceil(TIMED_S / max(warm_s, 1e-6))))
    times = [first_s] + [call()[1] for _ in range(wanted - 1)]
    return {"ms": 1000 * statistics.median(times), "peak_mb": peak_mb, "loss": loss, "reps": len(times)}


def pml_skip_reason(size: int, labels: torch.Tensor, device: str, pml_max_batch: int) -> str | None:
    if size > PML_LARGEST:
        return f"not run (B > {PML_LARGEST})"
    if pml_estimated_bytes(labels) > 0.8 * free_bytes(device):
        return "skipped (memory)"
    if size > pml_max_batch:
        return "skipped (time)"
    return None


def bench(args) -> list[dict]:
    rows = []
    for size in args.batch:
        for label_set in args.labels:
            x, labels = make_batch(size, label_set, args.device)
            if args.no_pml:
                skip = "not run (--no-pml)"
            else:
                skip = pml_skip_reason(size, labels, args.device, args.pml_max_batch)
            for kind in args.kinds:
                ours = run(ours_step(kind), x, labels, args.device, args.reps)
                theirs = None if skip else run(pml_step(kind), x, labels, args.device, args.reps)
                row = {
                    "device": args.device,
                    "batch": size,
                    "labels": label_set,
                    "kind": kind,
                    "ours_ms": round(ours["ms"], 3),
                    "pml_ms": None if theirs is None else round(theirs["ms"], 3),
                    "ours_peak_mb": _round(ours["peak_mb"]),
                    "pml_peak_mb": None if theirs is None else _round(theirs["peak_mb"]),
                    "ours_loss": round(ours["loss"], 6),
                    "pml_loss": None if theirs is None else round(theirs["loss"], 6),
                    "speedup": None if theirs is None else round(theirs["ms"] / ours["ms"], 1),
                    "pml_note": skip,
                    "ours_reps": ours["reps"],
                    "pml_reps": None if theirs is None else theirs["reps"],
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def _round(value):
    return None if value is None else round(value, 1)


def table(rows: list[dict]) -> str:
    header = ("B", "labels", "kind", "ours ms", "pml ms", "speedup", "ours MB", "pml MB", "ours loss", "pml loss")
    lines = []
    for row in rows:
        missing = row["pml_note"] or ""
        lines.append(
            (
                str(row["batch"]),
                row["labels"],
                row["kind"],
                f"{row['ours_ms']:.2f}",
                missing if row["pml_ms"] is None else f"{row['pml_ms']:.1f}",
                "" if row["speedup"] is None else f"{row['speedup']:.0f}x",
                "n/a" if row["ours_peak_mb"] is None else f"{row['ours_peak_mb']:.1f}",
                "" if row["pml_ms"] is None else ("n/a" if row["pml_peak_mb"] is None else f"{row['pml_peak_mb']:.0f}"),
                f"{row['ours_loss']:.6f}",
                "" if row["pml_loss"] is None else f"{row['pml_loss']:.6f}",
            )
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    device = rows[0]["device"]
    if device == "cpu":
        device += f" ({torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at the end)"
    out = [
        f"device: {device}, d = {DIM}, margin = {MARGIN}; one forward + backward per call",
        "  ".join(h.rjust(w) for h, w in zip(header, widths)),
    ]
    out += ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines]
    return "\n".join(out)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+", help="batch sizes (default: 256 512 1024 2048 4096)")
    parser.add_argument("--labels", nargs="+", choices=LABEL_SETS, default=list(LABEL_SETS))
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--quick", action="store_true", help="B = 256 and 512, at most 7 repetitions")
    parser.add_argument("--reps", type=int, help="most timed repetitions (default 11, 7 with --quick)")
    parser.add_argument("--pml-max-batch", type=int, help="largest B for pml (default: 512 on CPU, 2048 on CUDA)")
    parser.add_argument("--no-pml", action="store_true", help="ours alone")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    if args.batch is None:
        args.batch = [256, 512] if args.quick else [256, 512, 1024, 2048, 4096]
    if any(size < 2 * K for size in args.batch):
        parser.error(f"every batch must be at least {2 * K}")
    args.reps = args.reps or (7 if args.quick else 11)
    if args.pml_max_batch is None:
        args.pml_max_batch = 512 if args.device == "cpu" else PML_LARGEST
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.no_pml:
        try:
            import pytorch_metric_learning  # noqa: F401
        except ImportError:
            sys.exit("pytorch-metric-learning is not installed: pip install -r requirements-test.txt, or --no-pml")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}",
          file=sys.stderr)
    rows = bench(args)
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
