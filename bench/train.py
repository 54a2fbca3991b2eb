"""Training time per epoch: our loop against a pytorch-metric-learning loop, side by side.

Both train the default recipe (RunConfig defaults: vgg_grid and supcon since 2026-12-06, batch 256,
P×K batches, AdamW with its schedule; --loss triplet for the triplet recipe) on the same batches
through core.training.loop's `prepare` and `train_one_epoch`; only the objective differs:
  ours: the run's route, with everything a run does per epoch on: one distance matrix per step
        shared by the loss, the per-image tally and the step's counts (for triplet, one sort
        shared by the semi-hard miner too); the epoch-end inspector and gap histogram
        (`evaluate`); the worker's probe (core.explore.evolution.store_probe: embedding the
        probe set, its Precision@1, its file);
  pml:  its counterpart of the objective, as its examples train: SupConLoss(τ) for supcon,
        TripletMarginMiner(type_of_triplets="semihard") + TripletMarginLoss for triplet, with
        nothing else (pml has no tally, inspector or probe).
The two alternate in pairs of steps, ours, pml, pml, ours, ours, pml, ... (pml's steps run from
ours' on_step and their time is taken out of ours'), so a busy machine slows both alike and each
loop follows itself half the time and the other loop half the time: in strict turns (ours, pml,
ours, pml) ours' backward pass took about 5 ms more than when it follows itself (pml's miner lists
every semi-hard triplet, megabytes of index tensors, and its step leaves the allocator and the
caches to the next one), which charged ours for pml's memory traffic. The first epoch of each is
a warm-up. Prints one JSON line: ours_epoch_s, pml_epoch_s (medians of the timed epochs' wall
seconds), their ratio, the same in CPU seconds (cpu_ratio: less blurred by other processes on a
shared machine), the threads used and the load average before and after.

    python bench/train.py [--device auto|cpu|cuda] [--quick] [--epochs 3] [--images 60000] [--loss supcon|triplet]

--quick: 5,120 training images (20 steps an epoch) and 1,000 probe images, one timed epoch each:
under a minute on 2 quiet cores. The full form takes Fashion-MNIST's 60,000 training images
(234 steps an epoch) and its 10,000 test images as the probe.

First GPU figures, 2026-12-04, one NVIDIA H200, `python bench/train.py --device cuda` (60,000
images, 10,000 probe, 3 epochs, the first a warm-up): ours 1.53 s an epoch (2.44 CPU-s), pml
1.23 s (1.16 CPU-s): ratio 1.25, so on a GPU ours is slower than pml's bare loop, against the goal
0.85. The small CNN at batch 256 is bound by the host there (234 steps in 1.2 s: ~5 ms a step);
ours also does per epoch what pml does not (the tally, the inspector, the gap histogram, the
probe: 0.09 s of it the probe). Not yet profiled; the next thing to look at on a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from core.data.datasets import DatasetArrays  # noqa: E402
from core.training.config import RunConfig  # noqa: E402
from core.training.loop import (  # noqa: E402
    Epochs, _epoch_randomness, evaluate, lr_at, prepare, resolve_device, train_one_epoch,
)
from models.encoders import to_input  # noqa: E402
from pml_loop import pml_step  # noqa: E402


def load_images(size: int, n: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(N, size, size, 1) uint8 Fashion-MNIST images and labels when installed, else random ones."""
    from core.data.datasets import fashion_mnist_available, load_builtin

    if fashion_mnist_available():
        pixels, labels, split, _ = load_builtin("fashion-mnist")
        pixels, labels, source = pixels[:n], labels[:n], "fashion-mnist"
    else:
        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
        labels, source = rng.integers(0, 10, n), "random"
    if size != pixels.shape[1]:
        resized = F.interpolate(torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float(),
                                size=(size, size), mode="area")
        pixels = resized.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return np.ascontiguousarray(pixels), labels.astype(np.int64), source


def bench_data(train: int, probe: int) -> tuple[DatasetArrays, str]:
    """Fashion-MNIST (or random images) with `train` training images and `probe` test images."""
    from core.data.datasets import fashion_mnist_available, load_builtin

    if fashion_mnist_available():
        pixels, labels, split, classes = load_builtin("fashion-mnist")
        source = "fashion-mnist"
    else:
        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 256, (70_000, 28, 28, 1), dtype=np.uint8)
        labels = rng.integers(0, 10, 70_000).astype(np.int64)
        split = np.array(["train"] * 60_000 + ["test"] * 10_000)
        classes, source = [str(c) for c in range(10)], "random"
    keep = np.concatenate([np.flatnonzero(split == "train")[:train], np.flatnonzero(split == "test")[:probe]])
    return DatasetArrays(pixels[keep], labels[keep], split[keep], classes), source


class PmlSteps:
    """The pml loop's epoch, one step per call: the same batches, input pipeline and schedule as
    train_one_epoch draws for ours (from (seed, epoch)), its TrainingStep with pml's objective.
    Called from ours' on_step, so the two loops alternate step by step and a busy machine slows
    both alike; each call's wall and CPU seconds are added up."""

    def __init__(self, run: Epochs) -> None:
        self.run, self.step, self.seconds, self.cpu, self.losses = run, 0, 0.0, 0.0, []
        self.taken = 0  # steps of the current epoch

    def start(self, epoch: int) -> None:
        rng, _ = _epoch_randomness(self.run.cfg.seed, epoch)
        self.batches = iter(torch.from_numpy(self.run.sampler.epoch(rng)).to(self.run.training.device))
        self.seconds = self.cpu = 0.0
        self.losses = []
        self.taken = 0

    def in_pairs(self, progress) -> None:
        """ours' on_step: after ours' odd steps of the epoch, pml's next two (ours, pml, pml, ours,
        ours, pml, ...); `finish` takes the epoch's last one when it has an odd number."""
        done = (progress.step - 1) % self.run.sampler.steps_per_epoch + 1  # ours' steps this epoch
        while self.taken < min(done + done % 2, self.run.sampler.steps_per_epoch):
            self()

    def finish(self) -> None:
        while self.taken < self.run.sampler.steps_per_epoch:
            self()

    def __call__(self, progress=None) -> None:
        run = self.run
        started, used = time.perf_counter(), time.process_time()
        picked = next(self.batches)
        x = to_input(run.pixels.batch(picked), run.in_channels)
        result = run.training(x, run.labels[picked], lr_at(self.step, run.total_steps, run.cfg.lr, run.warmup))
        self.losses.append(float(result.loss))
        self.step += 1
        self.taken += 1
        if run.training.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - started
        self.cpu += time.process_time() - used


def time_epochs(cfg: RunConfig, data: DatasetArrays, device: torch.device, epochs: int) -> dict:
    """Seconds of each loop's epochs, the loops alternating step by step: ours is core.training.loop's
    train_one_epoch and evaluate with the worker's probe, less the pml steps run from its on_step."""
    from core.explore.evolution import store_probe

    ours = prepare(cfg, data, device)
    pml = prepare(cfg, data, device)
    pml.training = pml_step(pml.training, cfg)
    pml_steps = PmlSteps(pml)
    staging = Path(tempfile.mkdtemp(prefix="bench-train-"))
    seconds: dict[str, list[float]] = {"ours": [], "pml": []}
    cpu: dict[str, list[float]] = {"ours": [], "pml": []}  # CPU seconds: what a busy machine blurs less
    threads: list[int] = []  # torch's threads in each epoch (core.threads), both loops alike
    step, extra = 0, {}
    for epoch in range(1, epochs + 1):
        pml_steps.start(epoch)
        started, used = time.perf_counter(), time.process_time()
        trained = train_one_epoch(ours, epoch, step, pml_steps.in_pairs, lambda: False)
        triplets, _ = evaluate(ours, trained)
        probe = store_probe(staging, 1, epoch, ours.training.model, data)  # as the worker's on_epoch
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds["ours"].append(time.perf_counter() - started - pml_steps.seconds)
        cpu["ours"].append(time.process_time() - used - pml_steps.cpu)
        pml_steps.finish()
        seconds["pml"].append(pml_steps.seconds)
        cpu["pml"].append(pml_steps.cpu)
        threads.append(torch.get_num_threads())
        step = trained.step
        extra.update(ours_loss=trained.loss, ours_probe_s=probe.seconds, ours_probe_precision_at_1=probe.precision_at_1,
                     ours_triplet_rows=len(triplets), ours_tallied=int(ours.tally.counts.sum()),
                     pml_loss=float(np.mean(pml_steps.losses)))
    timed = slice(1, None) if epochs > 1 else slice(None)  # the first epoch of each is a warm-up
    out = {f"{kind}_epoch_s": float(np.median(values[timed])) for kind, values in seconds.items()}
    out.update({f"{kind}_epoch_cpu_s": float(np.median(values[timed])) for kind, values in cpu.items()})
    out.update({f"{kind}_epochs_s": [round(v, 3) for v in values] for kind, values in seconds.items()})
    out["threads"] = threads
    out.update(extra)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--quick", action="store_true", help="a few thousand images, one timed epoch each")
    parser.add_argument("--epochs", type=int, help="epochs of each loop, the first a warm-up (default 3; quick 2)")
    parser.add_argument("--images", type=int, help="training images (default 60000; quick 5120)")
    parser.add_argument("--probe", type=int, help="probe images (default 10000; quick 1000)")
    parser.add_argument("--loss", choices=("supcon", "triplet"),
                        help="the objective both loops train (pml's counterpart in its loop; default: RunConfig's)")
    args = parser.parse_args(argv)
    os.environ.setdefault("EMBEDDING_LAB_HOME", tempfile.mkdtemp(prefix="bench-train-home-"))  # the probe's files
    device = resolve_device(args.device)
    epochs = args.epochs or (2 if args.quick else 3)
    data, source = bench_data(args.images or (5_120 if args.quick else 60_000), args.probe or (1_000 if args.quick else 10_000))
    chosen = {"loss": args.loss} if args.loss else {}
    cfg = RunConfig(dataset="bench", device=args.device, epochs=epochs, **chosen)  # the default recipe
    load_before = os.getloadavg()[0]
    result = {"device": str(device), "data": source, "encoder": cfg.encoder, "loss": cfg.loss, "batch": cfg.batch_size,
              "train_images": int((data.split == "train").sum()), "probe_images": int((data.split == "test").sum()),
              "epochs": epochs}
    result.update(time_epochs(cfg, data, device, epochs))
    result["ratio"] = result["ours_epoch_s"] / result["pml_epoch_s"]
    result["cpu_ratio"] = result["ours_epoch_cpu_s"] / result["pml_epoch_cpu_s"]
    result["goal_ratio"] = 0.85
    result["load_average_before"], result["load_average_after"] = load_before, os.getloadavg()[0]
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
