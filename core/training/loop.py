"""The training loop: `fit(cfg, data, ...)` reads top to bottom; the worker and the command line
both call it, and bench/train.py times its `TrainingStep`.

Devices: the model runs channels-last everywhere (on a 2-core CPU the small CNN's step is about
1.4× faster so). On CUDA it runs under bf16 autocast (precision auto or bf16), the dataset's uint8
pixels stay on the GPU when they fit, and `torch.compile` is optional. On CPU every core is used
and nothing GPU-only is touched; autocast only when precision is bf16.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from core.training.augment import resolve_supervision, two_views
from core.training.config import RunConfig
from core.data.datasets import DatasetArrays
from core.metric.losses import loss_for
from core.metric.mining import pairwise_distances
from core.metric.registry import CATEGORIES
from core.training.sampler import make_sampler
from core.training.tally import MiningTally
from core.training.tally_files import NegativeClasses
from models.encoders import build_encoder, in_channels_of, to_input

GAP_SAMPLES = 5000
GPU_DATA_FRACTION = 0.3  # keep the pixels on the GPU when they take at most this much of its free memory


class Cancelled(Exception):
    """Raised inside the loop when the run was asked to stop. `model` is the encoder as it stood
    then (in eval mode), for callers that stop on a time budget; None when raised elsewhere."""

    def __init__(self, *args, model: Optional[torch.nn.Module] = None) -> None:
        super().__init__(*args)
        self.model = model


@dataclass
class StepProgress:
    epoch: int  # 1-based
    step: int  # global, 1-based
    total_steps: int
    loss: float
    counts: dict[str, int]  # per category (registry.CATEGORIES) in this batch


@dataclass
class EpochStats:
    epoch: int
    loss: float
    counts: dict[str, int]  # summed over the epoch's batches
    seconds: float
    # what the miner picked and the loss used in the epoch's last batch (core.metric.inspector rows),
    # members as dataset positions
    triplets: list[dict] = field(default_factory=list)
    gap_histogram: Optional[dict] = None
    image_counts: Optional[np.ndarray] = None  # (n_images, 3) core.training.tally.MiningTally.counts of the epoch
    negative_classes: Optional[NegativeClasses] = None  # the epoch's most used negatives' anchor classes


@dataclass
class TrainingState:
    """Where training stands after a completed epoch: what a checkpoint stores to resume."""

    epoch: int  # epochs completed
    step: int  # optimizer steps taken
    model: torch.nn.Module  # the plain module (not the compiled wrapper)
    optimizer: torch.optim.Optimizer
    config: dict

    def save(self, path: Path) -> None:
        """Weights, optimizer state, epoch, step and RNG in one file, written atomically."""
        from models.checkpoint import save_training_state

        save_training_state(path, self.model, self.optimizer,
                            {"epoch": self.epoch, "step": self.step, "config": self.config})


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for, but no CUDA GPU is available here; use auto or cpu")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def resolve_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None for plain float32. auto: bf16 on a CUDA GPU that has it."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
        if precision == "bf16" and not supported:
            raise ValueError("precision bf16 was asked for, but this GPU has no bfloat16; use auto or fp32")
        return torch.bfloat16 if supported else None
    if precision == "bf16":
        return torch.bfloat16  # asked for explicitly; CPUs without bf16 units are slower with it
    return None


def use_all_cores() -> int:
    """Let torch use every core this process may run on (the affinity mask, not the machine's count)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    return cores


def uses_views(cfg: RunConfig, data: DatasetArrays) -> bool:
    """Two views of an image are the positive pair: self-supervised runs (see resolve_supervision)."""
    return resolve_supervision(cfg.supervision, cfg.loss, data.labels is not None) == "self"


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class TrainingStep:
    """One optimisation step: forward (under autocast when a dtype is given), loss in float32,
    backward, optimizer step. `fit` and bench/train.py both time this.

    model: an encoder on `device`; compile=True wraps it with torch.compile (the plain module
    keeps the weights, so checkpoints never carry the wrapper's names).
    """

    def __init__(self, model: torch.nn.Module, loss_fn: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, autocast_dtype: Optional[torch.dtype] = None, compile: bool = False) -> None:
        self.model, self.loss_fn, self.optimizer, self.device = model, loss_fn, optimizer, device
        self.autocast_dtype = autocast_dtype
        self.channels_last = True  # faster on CUDA and on CPU alike
        self.forward = torch.compile(model) if compile else model

    def __call__(self, x: torch.Tensor, labels: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C, H, W) float in [-1, 1]; labels: (B,) long. Returns (loss, embeddings), detached."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with self.autocast():
            embeddings = self.forward(x)
        loss = self.loss_fn(embeddings.float(), labels)  # mining and sorting in full precision
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), embeddings.detach()

    def autocast(self):
        """The autocast context of the forward pass (a no-op in float32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def build_training(cfg: RunConfig, in_channels: int, device: torch.device) -> TrainingStep:
    """Model, loss and optimizer of a run, placed for its device. Seeds torch first, so the
    initial weights depend on cfg.seed only."""
    torch.manual_seed(cfg.seed)
    model = build_encoder(cfg.encoder, in_channels, cfg.embedding_dim).to(device)
    model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # batch shapes are fixed within a run
    else:
        use_all_cores()
    loss_fn = loss_for(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    return TrainingStep(model, loss_fn, optimizer, device, resolve_precision(cfg.precision, device), cfg.compile)


class PixelSource:
    """The training images as a uint8 tensor, on the GPU when they fit (copied once), else in
    pinned host memory and sent batch by batch. `batch(positions)` -> (B, H, W, C) on device."""

    def __init__(self, pixels: np.ndarray, device: torch.device) -> None:
        self.device = device
        host = torch.from_numpy(np.ascontiguousarray(pixels))
        self.on_device = device.type == "cpu" or self._fits_on_gpu(host)
        if self.on_device:
            self.pixels = host.to(device)
        else:
            self.pixels = host.pin_memory()

    def _fits_on_gpu(self, host: torch.Tensor) -> bool:
        free, _ = torch.cuda.mem_get_info(self.device)
        return host.numel() * host.element_size() <= GPU_DATA_FRACTION * free

    def batch(self, positions: torch.Tensor) -> torch.Tensor:
        """positions: (B,) long, on the device when `on_device`, else on the CPU."""
        if self.on_device:
            return self.pixels[positions]
        return self.pixels[positions].pin_memory().to(self.device, non_blocking=True)


def fit(
    cfg: RunConfig,
    data: DatasetArrays,
    on_step: Optional[Callable[[StepProgress], None]] = None,
    on_epoch: Optional[Callable[[EpochStats, TrainingState], None]] = None,
    should_stop: Callable[[], bool] = lambda: False,
    resume_from: Optional[Path] = None,
) -> torch.nn.Module:
    """Train an encoder on the dataset's train split; returns it in eval mode.

    on_epoch gets each completed epoch's stats and the TrainingState to checkpoint. resume_from:
    a training state saved from the same config; training continues after its epoch, and every
    epoch's batches and views are drawn from (seed, epoch), so a resumed run sees the same data
    an uninterrupted one would.
    """
    device = resolve_device(cfg.device)
    in_channels = int(data.pixels.shape[3])
    views = uses_views(cfg, data)
    training = build_training(cfg, in_channels, device)
    model, optimizer = training.model, training.optimizer

    train_index = data.train_index if len(data.train_index) else np.arange(len(data.pixels))
    pixels = PixelSource(data.pixels[train_index], device)
    labels = None if views else torch.from_numpy(data.labels[train_index]).to(device)
    sampler = make_sampler("random" if views else cfg.sampler, None if views else data.labels[train_index],
                           len(train_index), cfg.batch_size, cfg.samples_per_class)
    steps_per_epoch = sampler.steps_per_epoch
    total_steps = steps_per_epoch * cfg.epochs
    warmup = min(100, total_steps // 10)
    generator = torch.Generator(device=device)
    tally = MiningTally(len(data.pixels), data.labels, len(data.classes))

    first_epoch, step = 1, 0
    if resume_from is not None:
        first_epoch, step = _resume(resume_from, cfg, model, optimizer, steps_per_epoch)

    for epoch in range(first_epoch, cfg.epochs + 1):
        model.train()
        started = time.perf_counter()
        rng, seed = _epoch_randomness(cfg.seed, epoch)
        generator.manual_seed(seed)
        batches = torch.from_numpy(sampler.epoch(rng))
        on_device = batches.to(device)  # one copy an epoch, not one a step
        loss_sum, counts_sum = 0.0, dict.fromkeys(CATEGORIES, 0)
        tally.reset()
        for picked, picked_here in zip(batches, on_device):
            if should_stop():
                raise Cancelled(model=model.eval())
            x = to_input(pixels.batch(picked_here if pixels.on_device else picked), in_channels)
            if views:
                x = two_views(x, generator)
                batch_labels = torch.arange(len(picked), device=device).repeat(2)
            else:
                batch_labels = labels[picked_here]
            loss, embeddings = training(x, batch_labels, lr_at(step, total_steps, cfg.lr, warmup))
            step += 1

            with torch.no_grad():
                dist = loss_distances(training.loss_fn, embeddings.float())
                rows = train_index[(picked.repeat(2) if views else picked).numpy()]
                counts = tally.add(rows, dist, batch_labels, cfg.margin)
            batch_counts = counts.as_dict()
            for key, value in batch_counts.items():
                counts_sum[key] += value
            loss_value = float(loss)
            loss_sum += loss_value
            if on_step is not None:
                on_step(StepProgress(epoch, step, total_steps, loss_value, batch_counts))

        triplets, histogram = inspect_batch(training.loss_fn, embeddings.float(), batch_labels, rows, cfg.margin,
                                            generator)
        stats = EpochStats(epoch, loss_sum / steps_per_epoch, counts_sum, time.perf_counter() - started,
                           triplets, histogram, tally.counts, tally.negative_classes())
        if on_epoch is not None:
            on_epoch(stats, TrainingState(epoch, step, model, optimizer, cfg.to_dict()))
    return model.eval()


def loss_distances(loss_fn: torch.nn.Module, embeddings: torch.Tensor) -> torch.Tensor:
    """The (B, B) distances the loss compares (its miner, the counts and the inspector see the
    same ones: squared distances for the squared triplet variant); euclidean for a loss that
    does not say."""
    distances = getattr(loss_fn, "distances", None)
    return distances(embeddings) if distances is not None else pairwise_distances(embeddings)


@torch.no_grad()
def inspect_batch(loss_fn: torch.nn.Module, embeddings: torch.Tensor, labels: torch.Tensor, positions: np.ndarray,
                  margin: float, generator: Optional[torch.Generator] = None) -> tuple[list[dict], dict]:
    """What the Triplets page shows of a batch: the loss's own inspector rows (core.metric.inspector:
    the triplets or pairs its miner returned and it used, with the loss each contributed; none
    for a loss without an `inspect`), members mapped to dataset positions, and a histogram of
    d(A,P) − d(A,N) of random triplets on the loss's distances.
    embeddings: (B, d) detached; labels: (B,); positions: (B,) dataset row of each batch row."""
    inspect = getattr(loss_fn, "inspect", None)
    rows = inspect(embeddings, labels, generator=generator) if inspect is not None else []
    for row in rows:
        for member in ("anchor", "positive", "negative"):
            if row[member] is not None:
                row[member] = int(positions[row[member]])
    dist = loss_distances(loss_fn, embeddings)
    gaps = random_triplet_gaps(dist, labels, GAP_SAMPLES, generator)
    half_width = max(margin * 4, float(gaps.abs().max()) if len(gaps) else 1.0)
    return rows, _histogram(gaps, bins=40, half_width=half_width)


def _epoch_randomness(seed: int, epoch: int) -> tuple[np.random.Generator, int]:
    """The batch order's generator and the views' torch seed of one epoch, from (seed, epoch)
    alone: resuming at any epoch needs no saved generator state to draw the same batches."""
    sequence = np.random.SeedSequence([seed, epoch])
    return np.random.default_rng(sequence), int(sequence.generate_state(1, dtype=np.uint64)[0] >> 1)


def _resume(path: Path, cfg: RunConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            steps_per_epoch: int) -> tuple[int, int]:
    """Load a training state; (first epoch to train, steps already taken)."""
    from models.checkpoint import load_training_state

    info = load_training_state(path, model, optimizer)
    try:  # a state saved by an earlier version spells some settings differently: compare them resolved
        same = RunConfig.from_dict(dict(info.get("config") or {})) == cfg
    except (TypeError, ValueError):
        same = False
    if not same:
        raise ValueError(f"{Path(path).name} was saved by a run with other settings; it cannot resume this one")
    epoch, step = int(info["epoch"]), int(info["step"])
    if step != epoch * steps_per_epoch:
        raise ValueError(f"{Path(path).name} holds step {step} of epoch {epoch}, "
                         f"but this data gives {steps_per_epoch} steps an epoch")
    return epoch + 1, step


def _histogram(values: torch.Tensor, bins: int, half_width: float) -> dict:
    counts = torch.histc(values.float().cpu(), bins=bins, min=-half_width, max=half_width)
    return {"edges": torch.linspace(-half_width, half_width, bins + 1).tolist(), "counts": counts.tolist()}


def random_triplet_gaps(dist: torch.Tensor, labels: torch.Tensor, n: int,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """d(A,P) − d(A,N) of n triplets drawn uniformly per anchor; (n,) or empty. O(B²) memory."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=dist.device)
    positives, negatives = (same & ~eye).float(), (~same).float()
    usable = torch.nonzero((positives.sum(1) > 0) & (negatives.sum(1) > 0)).squeeze(1)
    if len(usable) == 0:
        return dist.new_zeros(0)
    anchors = usable[torch.randint(len(usable), (n,), device=dist.device, generator=generator)]
    p = torch.multinomial(positives[anchors], 1, generator=generator).squeeze(1)
    q = torch.multinomial(negatives[anchors], 1, generator=generator).squeeze(1)
    return dist[anchors, p] - dist[anchors, q]


@torch.no_grad()
def embed(model: torch.nn.Module, pixels: np.ndarray, device: torch.device | str = "cpu", batch: int = 1024) -> np.ndarray:
    """L2-normalised embeddings (N, d) float32 of uint8 images (N, H, W, C)."""
    device = torch.device(device)
    if device.type == "cpu":
        use_all_cores()
    model = model.eval().to(device)
    in_channels = in_channels_of(model)
    out = []
    for start in range(0, len(pixels), batch):
        chunk = torch.from_numpy(np.array(pixels[start:start + batch]))  # a copy: the array may be a read-only memory map
        out.append(model(to_input(chunk.to(device), in_channels)).float().cpu())
    if not out:
        return np.zeros((0, model.head.net[-1].out_features), dtype=np.float32)
    return torch.cat(out).numpy().astype(np.float32)
