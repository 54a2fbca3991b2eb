"""Training throughput: our training step against a pytorch-metric-learning loop, side by side.

Both sides train the same encoder (models/encoders.py, ResNet-18-style by default) with the same
batches, optimizer, precision and input pipeline; only the objective differs:
  ours: core.training.loop.TrainingStep with the semi-hard triplet loss computed over the B×B
        distance matrix (no triplet listing);
  pml:  TripletMarginMiner(type_of_triplets="semihard") + TripletMarginLoss, as its examples do.
Prints one JSON object per line, then a table.

    python bench/train.py [--device auto|cpu|cuda] [--quick] [--batch 512 2048] [--encoder resnet18]

--quick is the CPU form (16×16 images, batches 128 and 512, three timed steps: about a minute on 2 quiet cores).
Each line also has the objective alone (mining + loss, forward and backward, on unit
embeddings): where the loops differ, without the encoder both share.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from core.training.config import RunConfig  # noqa: E402
from core.training.loop import build_training, lr_at, resolve_device, resolve_precision  # noqa: E402
from models.encoders import to_input  # noqa: E402
from pml_loop import MARGIN, PmlSemiHardTriplet, pml_step, print_table  # noqa: E402


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


def time_loops(cfg: RunConfig, pixels: torch.Tensor, labels: torch.Tensor, device: torch.device,
               warmup: int, steps: int) -> dict:
    """Median ms per step of each loop. The two loops alternate step by step on the same batches,
    so a busy machine slows both alike instead of whichever ran second."""
    loops = {"ours": build_training(cfg, 1, device)}
    loops["pml"] = pml_step(build_training(cfg, 1, device))
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(len(pixels), (cfg.batch_size,), generator=generator) for _ in range(warmup + steps)]
    times: dict[str, list[float]] = {kind: [] for kind in loops}
    losses: dict[str, float] = {}
    peaks: dict[str, float | None] = {kind: None for kind in loops}
    for kind in loops:
        if device.type == "cuda":  # each loop's peak on its own, beyond what was allocated before
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        for i in range(warmup):
            loops[kind](to_input(pixels[batches[i].to(device)], 1), labels[batches[i].to(device)], cfg.lr)
        if device.type == "cuda":
            torch.cuda.synchronize()
            peaks[kind] = (torch.cuda.max_memory_allocated() - before) / 2**20
    for i in range(warmup, warmup + steps):
        picked = batches[i].to(device)
        for kind, step in loops.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            result = step(to_input(pixels[picked], 1), labels[picked], lr_at(i, warmup + steps, cfg.lr, 1))
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[kind].append(time.perf_counter() - started)
            losses[kind] = float(result[0])  # (loss, embeddings)
    out = {}
    for kind in loops:
        ms = 1000 * float(np.median(times[kind]))
        out.update({f"{kind}_images_per_s": cfg.batch_size / ms * 1000, f"{kind}_ms_per_step": ms,
                    f"{kind}_peak_mb": peaks[kind], f"{kind}_last_loss": losses[kind]})
    return out


def time_objective(kind: str, batch: int, labels: torch.Tensor, device: torch.device, repeats: int) -> float:
    """ms of the objective alone (mining + loss, forward and backward) on unit embeddings
    (B, 128): where the two loops differ, without the encoder that both share."""
    from core.metric.losses import make_loss

    generator = torch.Generator().manual_seed(1)
    embeddings = F.normalize(torch.randn(batch, 128, generator=generator), dim=1).to(device).requires_grad_()
    batch_labels = labels[torch.randint(len(labels), (batch,), generator=generator).to(device)]
    loss_fn = make_loss("triplet", "semi-hard", MARGIN) if kind == "ours" else PmlSemiHardTriplet()

    def objective():
        return loss_fn(embeddings, batch_labels)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        objective().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        embeddings.grad = None
    return 1000 * float(np.median(times[1:]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--quick", action="store_true", help="the CPU form: small images and batches, few steps")
    parser.add_argument("--batch", type=int, nargs="+", help="batch sizes (default 512 2048; quick 128 512)")
    parser.add_argument("--encoder", choices=("resnet18", "small_cnn"), default="resnet18")
    parser.add_argument("--image-size", type=int, help="side in pixels (default 28; quick 16)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--steps", type=int, help="timed steps (default 20; quick 3)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 5; quick 1)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    batches = args.batch or ([128, 512] if args.quick else [512, 2048])
    size = args.image_size or (16 if args.quick else 28)
    steps = args.steps or (3 if args.quick else 20)
    warmup = args.warmup or (1 if args.quick else 5)

    pixels_np, labels_np, source = load_images(size, 60_000)
    pixels = torch.from_numpy(pixels_np).to(device)
    labels = torch.from_numpy(labels_np).to(device)
    autocast = resolve_precision(args.precision, device)
    precision = "bf16" if autocast == torch.bfloat16 else "fp32"
    rows = []
    for batch in batches:
        cfg = RunConfig(dataset="bench", encoder=args.encoder, embedding_dim=128, loss="triplet", miner="semi-hard",
                        margin=MARGIN, batch_size=batch, device=args.device, precision=args.precision)
        result = {"device": str(device), "encoder": args.encoder, "batch": batch, "image": f"{size}x{size}",
                  "precision": precision, "data": source}
        try:
            result.update(time_loops(cfg, pixels, labels, device, warmup, steps))
        except torch.OutOfMemoryError:  # pml's B×B×B mask at large batches
            torch.cuda.empty_cache()
            result.update({f"{kind}_{key}": None for kind in ("ours", "pml")
                           for key in ("images_per_s", "ms_per_step", "peak_mb", "last_loss")})
        ours, pml = result["ours_images_per_s"], result["pml_images_per_s"]
        result["speedup"] = ours / pml if ours and pml else None
        for kind in ("ours", "pml"):
            try:
                result[f"{kind}_objective_ms"] = time_objective(kind, batch, labels, device, repeats=5)
            except (torch.OutOfMemoryError, MemoryError):
                result[f"{kind}_objective_ms"] = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        print(json.dumps(result), flush=True)
        rows.append(result)

    print()
    columns = [("device", "device", 7, "s"), ("batch", "batch", 6, "d"), ("image", "image", 6, "s"),
               ("prec", "precision", 5, "s"), ("ours img/s", "ours_images_per_s", 11, ",.0f"),
               ("pml img/s", "pml_images_per_s", 10, ",.0f"), ("speedup", "speedup", 8, ".2f"),
               ("ours MB", "ours_peak_mb", 8, ".0f"), ("pml MB", "pml_peak_mb", 8, ".0f"),
               ("ours obj ms", "ours_objective_ms", 12, ".1f"), ("pml obj ms", "pml_objective_ms", 11, ".1f")]
    print_table(rows, columns)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
