"""The training loop: `fit(cfg, data, ...)` reads top to bottom (`train_one_epoch`, `evaluate`,
`lr_at`, the callbacks); the worker and the command line both call it, and bench/train.py times it.

One route for a batch: a `TrainingStep` computes the (B, B) distance matrix once from the
embeddings, its miner mines it once (a core.metric.mining.MiningBatch, whose negatives are sorted
once), and the loss reads (dist, labels, mined). The per-image tally, the step's category counts
and the epoch-end inspector read that same MiningBatch and mined output: no second distance
matrix, no second sort, no re-mining.

Devices: the model runs channels-last everywhere (on a 2-core CPU the small CNN's step is about
1.4× faster so). On CUDA it runs under bf16 autocast (precision auto or bf16), the dataset's uint8
pixels stay on the GPU when they fit, and `torch.compile` is optional. On CPU torch uses this
process's share of the cores (core.threads, measured again each epoch) and nothing GPU-only is
touched; bf16 autocast when precision is bf16, or auto on a CPU with bf16 instructions (cpu_has_bf16).
"""
from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import torch

from core.data.datasets import DatasetArrays
from core.metric.categories import CATEGORIES
from core.metric.distances import pairwise_distances
from core.metric.losses import make_loss
from core.metric.memory import CrossBatchMemory, References
from core.metric.miners import build_miner, mine
from core.metric.mining import MiningBatch
from core.metric.registry import CATEGORY_MARGIN
from core.training.augment import augment_batch, resolve_supervision, two_views
from core.training.config import RunConfig
from core.training.parallel import Shard, collective_stop, distribute, gather_rows
from core.threads import SHARE_SECONDS, keep_freed_memory, use_share
from core.training.sampler import make_sampler
from core.training.tally import MiningTally
from core.training.tally_files import NegativeClasses
from models.encoders import build_encoder, folded_for_inference, in_channels_of, to_input
from models.widths import mirror_averaged

GAP_SAMPLES = 5000
# the CPU's forward-only batch: 10,240 28×28 images (small CNN) took 2.4 s in batches of 128 against
# 3.6 s in batches of 256 on one thread, 1.4 s against 2.0 s on two (an AMD EPYC with 2 MB of L2 per core)
EMBED_BATCH_CPU = 128
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
    counts: dict[str, int]  # per category (core.metric.categories.CATEGORIES) in this batch
    # with a cross-batch memory: of `counts`, the triplets whose negative came from the memory
    memory_counts: dict[str, int] = field(default_factory=dict)


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
    began: Optional[float] = None  # time.perf_counter() as the epoch began (`seconds` is its steps and evaluation)
    # with a cross-batch memory: of `counts`, the triplets whose negative came from the memory (EpochRow.memory_counts)
    memory_counts: dict[str, int] = field(default_factory=dict)


@dataclass
class TrainingState:
    """Where training stands after a completed epoch: what a checkpoint stores to resume."""

    epoch: int  # epochs completed
    step: int  # optimizer steps taken
    model: torch.nn.Module  # the plain module (not the compiled wrapper)
    optimizer: torch.optim.Optimizer
    config: dict
    memory: Optional[CrossBatchMemory] = None  # the run's cross-batch memory, when it has one

    def save(self, path: Path) -> None:
        """Weights, optimizer state, epoch, step, RNG and the cross-batch memory in one file,
        written atomically."""
        from models.checkpoint import save_training_state

        save_training_state(path, self.model, self.optimizer,
                            {"epoch": self.epoch, "step": self.step, "config": self.config},
                            self.memory.state() if self.memory is not None else None)


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for, but no CUDA GPU is available here; use auto or cpu")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def resolve_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None for plain float32. auto: bf16 on a CUDA GPU that has it, and on
    a CPU that computes bf16 in hardware (cpu_has_bf16)."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
        if precision == "bf16" and not supported:
            raise ValueError("precision bf16 was asked for, but this GPU has no bfloat16; use auto or fp32")
        return torch.bfloat16 if supported else None
    if precision == "bf16":
        return torch.bfloat16  # asked for explicitly; CPUs without bf16 units are slower with it
    return torch.bfloat16 if cpu_has_bf16() else None


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (avx512_bf16 or amx_bf16 among /proc/cpuinfo's
    flags; False where that file is missing). There bf16 autocast makes a step of the small CNN
    about a third cheaper (oneDNN's bf16 convolutions); a CPU without them emulates bf16, slower
    than float32, so `auto` stays float32 there."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.partition(":")[2].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def uses_views(cfg: RunConfig, data: DatasetArrays) -> bool:
    """Two views of an image are the positive pair: self-supervised runs (see resolve_supervision)."""
    return resolve_supervision(cfg.supervision, cfg.loss, data.labels is not None) == "self"


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def loss_for(cfg: RunConfig) -> torch.nn.Module:
    """The loss a run trains with (core.metric.losses.make_loss of its settings)."""
    return make_loss(cfg.loss, cfg.miner, cfg.margin, cfg.temperature, cfg.distance, cfg.triplet_variant,
                     **cfg.options)


def miner_for(cfg: RunConfig):
    """The miner a run mines each batch with (core.metric.miners), at the run's margin and with
    its own settings."""
    return build_miner(cfg.miner, cfg.margin, **cfg.miner_settings())


class StepResult(NamedTuple):
    """What one training step computed, for the tally, the counts and the inspector to read."""

    loss: torch.Tensor  # scalar, detached
    embeddings: torch.Tensor  # (B, d) float32, detached
    batch: Optional[MiningBatch]  # the step's distances, labels and sorted negatives (None: an outside loss)
    mined: Any  # what the miner picked from `batch` (core.metric.miners)
    references: Optional[References] = None  # with a cross-batch memory: what `batch`'s columns are


class TrainingStep:
    """One optimisation step: forward (under autocast when a dtype is given); in float32 the
    (B, B) distances once (the loss's `distances`), the miner once on them (no_grad) and the loss
    on (dist, labels, mined); backward, optimizer step. `fit` and bench/train.py both time this.

    model: an encoder on `device`; compile=True wraps it with torch.compile (the plain module
    keeps the weights, so checkpoints never carry the wrapper's names). miner: None for a loss
    that mines inside itself, called on (embeddings, labels) (bench/pml_loop.py's); margin draws
    the batch's categories.

    A miner with a cross-batch memory (its `memory_size` > 0; core.metric.memory) makes the one
    distance matrix (B, R): the batch's rows against the memory after the batch was written into
    it (the loss's `cross_distances`), mined and sorted once as the square one is. Without one
    the step is the square route, unchanged.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, autocast_dtype: Optional[torch.dtype] = None, compile: bool = False,
                 miner: Any = None, margin: float = CATEGORY_MARGIN) -> None:
        self.model, self.loss_fn, self.optimizer, self.device = model, loss_fn, optimizer, device
        self.miner, self.margin = miner, margin
        self.autocast_dtype = autocast_dtype
        self.channels_last = True  # faster on CUDA and on CPU alike
        self.forward = torch.compile(model) if compile else model
        self.memory_size = int(getattr(miner, "memory_size", 0) or 0)
        self.memory: Optional[CrossBatchMemory] = None  # made on the first step, when the embeddings' size is known
        # one process of several (core.training.parallel): it encodes only its shard of each batch's rows and
        # gathers the batch's embeddings; None: a single process
        self.shard: Optional[Shard] = None

    def distribute(self, shard: Shard) -> None:
        """Make this step one process's of a data-parallel group (core.training.parallel): its
        forward runs through DistributedDataParallel with global batch norm, on its shard of the rows."""
        self.shard = shard
        wrapped = distribute(self.model, self.device)
        self.forward = torch.compile(wrapped) if self.forward is not self.model else wrapped

    def __call__(self, x: torch.Tensor, labels: torch.Tensor, lr: float) -> StepResult:
        """x: (B, C, H, W) float in [-1, 1]; labels: (B,) long."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        rows = len(x)
        if self.shard is not None:
            x = x[self.shard.rows(rows)]
        with self.autocast():
            embeddings = self.forward(x)
        embeddings = embeddings.float()  # distances, mining and sorting in full precision
        if self.shard is not None:  # the global batch's embeddings, with their gradients
            embeddings = gather_rows(embeddings, rows, self.shard)
        loss, batch, mined, references = self.mined_loss(embeddings, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return StepResult(loss.detach(), embeddings.detach(), batch, mined, references)

    def mined_loss(self, embeddings: torch.Tensor, labels: torch.Tensor
                   ) -> tuple[torch.Tensor, Optional[MiningBatch], Any, Optional[References]]:
        """The step's route from float32 embeddings (B, d) to its loss: one distance matrix (B, B),
        or (B, R) against the cross-batch memory; one MiningBatch (one sort); the miner once; the
        loss on what it picked. Returns (loss, batch, mined, references)."""
        if self.miner is None:
            return self.loss_fn(embeddings, labels), None, None, None
        if self.memory_size:
            references = self.enqueue(embeddings, labels)
            dist = self.loss_fn.cross_distances(embeddings, references.embeddings)
            batch = MiningBatch(dist, labels, self.margin, references.labels, references.own, ~references.fresh)
            mined = mine(self.miner, batch)
            return self.loss_fn.loss_on(dist, labels, mined), batch, mined, references
        distances = getattr(self.loss_fn, "distances", None)  # euclidean for a loss that does not say
        dist = distances(embeddings) if distances is not None else pairwise_distances(embeddings)
        batch = MiningBatch(dist, labels, self.margin)
        mined = mine(self.miner, batch)
        loss_on = getattr(self.loss_fn, "loss_on", None)
        # a loss without loss_on mines inside its forward: the tally and counts still read `batch`
        loss = loss_on(dist, labels, mined) if loss_on is not None else self.loss_fn(embeddings, labels)
        return loss, batch, mined, None

    def enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor) -> References:
        """Write the batch into the cross-batch memory; the references to mine it against."""
        if getattr(self.loss_fn, "cross_distances", None) is None or getattr(self.loss_fn, "loss_on", None) is None:
            raise ValueError(f"the {type(self.loss_fn).__name__} loss cannot use a cross-batch memory "
                             f"(it has no cross_distances); set the memory size to 0")
        if self.memory is None:
            self.memory = CrossBatchMemory(self.memory_size, embeddings.shape[1], embeddings.device, embeddings.dtype)
        return self.memory.enqueue(embeddings, labels)

    def autocast(self):
        """The autocast context of the forward pass (a no-op in float32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def build_training(cfg: RunConfig, in_channels: int, device: torch.device) -> TrainingStep:
    """Model, loss, miner and optimizer of a run, placed for its device. Seeds torch first, so
    the initial weights depend on cfg.seed only."""
    torch.manual_seed(cfg.seed)
    model = build_encoder(cfg.encoder, in_channels, cfg.embedding_dim, cfg.width, mirror_averaged(cfg.augment),
                          cfg.precision).to(device)
    model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # batch shapes are fixed within a run
    else:
        use_share()
        keep_freed_memory()
    # fused: one kernel over all parameters instead of a dozen ops per tensor (half the step's
    # optimizer time on a CPU); the same update to float rounding
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4,
                                  fused=device.type in ("cpu", "cuda") or None)
    return TrainingStep(model, loss_for(cfg), optimizer, device, resolve_precision(cfg.precision, device),
                        cfg.compile, miner_for(cfg), cfg.margin)


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


@dataclass
class Epochs:
    """What every epoch of a run draws from: the step, its images and labels, the sampler, the
    schedule and the per-image tally. Built once by `prepare`."""

    cfg: RunConfig
    training: TrainingStep
    pixels: PixelSource
    labels: Optional[torch.Tensor]  # (n_train,) on the device; None when two views are the positives
    views: bool
    in_channels: int
    train_index: np.ndarray  # dataset position of each training row
    sampler: Any  # core.training.sampler
    total_steps: int
    warmup: int
    generator: torch.Generator  # the views' randomness and the inspector's draws
    tally: MiningTally


@dataclass
class EpochResult:
    """One epoch of steps: the mean loss, the category counts summed, the steps taken so far,
    and the last step's route (its MiningBatch and mined output) with its rows' dataset positions."""

    loss: float
    counts: dict[str, int]
    step: int
    last: StepResult
    positions: np.ndarray
    ref_positions: Optional[np.ndarray] = None  # with a cross-batch memory: the dataset position of each reference
    memory_counts: dict[str, int] = field(default_factory=dict)  # of `counts`, negatives from the memory


def fit(
    cfg: RunConfig,
    data: DatasetArrays,
    on_step: Optional[Callable[[StepProgress], None]] = None,
    on_epoch: Optional[Callable[[EpochStats, TrainingState], None]] = None,
    should_stop: Callable[[], bool] = lambda: False,
    resume_from: Optional[Path] = None,
    shard: Optional[Shard] = None,
    device: Optional[torch.device] = None,
) -> torch.nn.Module:
    """Train an encoder on the dataset's train split; returns it in eval mode.

    on_epoch gets each completed epoch's stats and the TrainingState to checkpoint. resume_from:
    a training state saved from the same config; training continues after its epoch, and every
    epoch's batches and views are drawn from (seed, epoch), so a resumed run sees the same data
    an uninterrupted one would.

    shard: this process's place in a data-parallel group whose process group is set up
    (core.training.parallel; core.runs.parallel starts it): the same batches, each process
    encoding its shard of them, the loss on the global batch. Every process calls fit alike;
    rank 0's should_stop decides for all, and only a process given on_step / on_epoch reports.
    device: where this process trains (default: cfg.device resolved).
    """
    run = prepare(cfg, data, device if device is not None else resolve_device(cfg.device), shard)
    if shard is not None:
        should_stop = collective_stop(should_stop, shard, run.training.device)
    model, optimizer = run.training.model, run.training.optimizer
    first_epoch, step = 1, 0
    if resume_from is not None:
        first_epoch, step = _resume(resume_from, cfg, run.training, run.sampler.steps_per_epoch)
    for epoch in range(first_epoch, cfg.epochs + 1):
        started = time.perf_counter()
        trained = train_one_epoch(run, epoch, step, on_step, should_stop)
        step = trained.step
        if on_epoch is None:  # nobody reads the epoch's inspection (a data-parallel run's other processes)
            continue
        triplets, histogram = evaluate(run, trained)
        stats = EpochStats(epoch, trained.loss, trained.counts, time.perf_counter() - started, triplets, histogram,
                           run.tally.counts, run.tally.negative_classes(), began=started,
                           memory_counts=trained.memory_counts)
        on_epoch(stats, TrainingState(epoch, step, model, optimizer, cfg.to_dict(), run.training.memory))
    return model.eval()


def prepare(cfg: RunConfig, data: DatasetArrays, device: torch.device, shard: Optional[Shard] = None) -> Epochs:
    """The step, the training images on the device, the sampler and the tally of a run (shard:
    this process's in a data-parallel group, see fit)."""
    in_channels = int(data.pixels.shape[3])
    views = uses_views(cfg, data)
    training = build_training(cfg, in_channels, device)
    if shard is not None:
        training.distribute(shard)
    rows = cfg.batch_size * (2 if views else 1)  # two views of each image are two rows
    if training.memory_size and training.memory_size < rows:
        raise ValueError(f"a cross-batch memory of {training.memory_size} does not hold a batch's {rows} rows "
                         f"(two views of each image); make it at least {rows}")
    train_index = data.train_index if len(data.train_index) else data.included_index  # no split: every image used
    labels = None if views else torch.from_numpy(data.labels[train_index]).to(device)
    sampler = make_sampler("random" if views else cfg.sampler, None if views else data.labels[train_index],
                           len(train_index), cfg.batch_size, cfg.samples_per_class)
    total_steps = sampler.steps_per_epoch * cfg.epochs
    return Epochs(cfg, training, PixelSource(data.pixels[train_index], device), labels, views, in_channels,
                  train_index, sampler, total_steps, min(100, total_steps // 10), torch.Generator(device=device),
                  MiningTally(len(data.pixels), data.labels, len(data.classes)))


def train_one_epoch(run: Epochs, epoch: int, step: int, on_step: Optional[Callable[[StepProgress], None]],
                    should_stop: Callable[[], bool]) -> EpochResult:
    """Every batch of `epoch` (drawn from (seed, epoch)): a step, its rows added to the tally from
    the step's own MiningBatch, on_step with its counts. step: steps taken before this epoch.
    Raises Cancelled (with the model) once should_stop() says so."""
    training, device = run.training, run.training.device
    on_cpu = device.type == "cpu"
    if on_cpu:
        use_share()  # the machine's load may have changed since the last epoch
    share_again = time.monotonic() + SHARE_SECONDS  # and within a long epoch (a million images: an hour on one thread)
    training.model.train()
    rng, seed = _epoch_randomness(run.cfg.seed, epoch)
    run.generator.manual_seed(seed)
    batches = torch.from_numpy(run.sampler.epoch(rng))
    on_device = batches.to(device)  # one copy an epoch, not one a step
    loss_sum, counts_sum, memory_sum = 0.0, dict.fromkeys(CATEGORIES, 0), {}
    run.tally.reset()
    for picked, picked_here in zip(batches, on_device):
        if should_stop():
            raise Cancelled(model=training.model.eval())
        if on_cpu and time.monotonic() >= share_again:
            use_share()
            share_again = time.monotonic() + SHARE_SECONDS
        x = to_input(run.pixels.batch(picked_here if run.pixels.on_device else picked), run.in_channels)
        if run.views:
            x = two_views(x, run.generator)
            batch_labels = torch.arange(len(picked), device=device).repeat(2)
            if training.memory_size:  # the memory holds earlier batches: an image's label must be its own, not its row's
                batch_labels = picked_here.to(device).repeat(2)
        else:
            if run.cfg.augment != "none":
                x = augment_batch(x, run.cfg.augment, run.generator)
            batch_labels = run.labels[picked_here]
        result = training(x, batch_labels, lr_at(step, run.total_steps, run.cfg.lr, run.warmup))
        step += 1
        positions = run.train_index[(picked.repeat(2) if run.views else picked).numpy()]
        ref_positions = None
        if result.references is not None:  # the memory keeps each slot's dataset position beside it
            memory = training.memory
            memory.positions[result.references.own.cpu().numpy()] = positions
            ref_positions = memory.positions[:len(result.references.labels)].copy()
        batch_counts, memory_counts = {}, {}  # an outside loss that mines inside itself (bench's pml loop) leaves no batch to count
        if result.batch is not None:
            counted = run.tally.add_batch(positions, result.batch, ref_positions)
            batch_counts = counted.as_dict()
            if counted.from_memory is not None:
                memory_counts = counted.from_memory.as_dict()
        for key, value in batch_counts.items():
            counts_sum[key] += value
        for key, value in memory_counts.items():
            memory_sum[key] = memory_sum.get(key, 0) + value
        loss_value = float(result.loss)
        loss_sum += loss_value
        if on_step is not None:
            on_step(StepProgress(epoch, step, run.total_steps, loss_value, batch_counts, memory_counts))
    return EpochResult(loss_sum / run.sampler.steps_per_epoch, counts_sum, step, result, positions, ref_positions,
                       memory_sum)


@torch.no_grad()
def evaluate(run: Epochs, trained: EpochResult) -> tuple[list[dict], dict]:
    """The epoch's inspection, from its last step's MiningBatch and mined output (nothing is
    computed or mined again): the inspector's rows and the gap histogram (inspect_batch). The
    worker's per-epoch probe (core.explore.evolution.store_probe) runs in its on_epoch, where
    the run's files are. Nothing for an outside loss's step (no MiningBatch)."""
    if trained.last.batch is None:
        return [], None
    return inspect_batch(run.training.loss_fn, trained.last.batch, trained.last.mined, trained.positions,
                         run.generator, trained.ref_positions)


@torch.no_grad()
def inspect_batch(loss_fn: torch.nn.Module, batch: MiningBatch, mined: Any, positions: np.ndarray,
                  generator: Optional[torch.Generator] = None, ref_positions: Optional[np.ndarray] = None
                  ) -> tuple[list[dict], dict]:
    """What the Triplets page shows of a batch: the loss's own inspector rows of what the miner
    returned and the loss used (core.metric.inspector, `inspect_mined`; none for a loss without
    one), members mapped to dataset positions, and a histogram of d(A,P) − d(A,N) of random
    triplets of the batch's distances. positions: (B,) dataset row of each batch row;
    ref_positions: (R,) of each reference, with a cross-batch memory (positives and negatives
    are references there); each row then says whether its negative came from the memory
    ("from_memory", None for a similar pair)."""
    inspect = getattr(loss_fn, "inspect_mined", None)
    rows = inspect(batch, mined, generator=generator) if inspect is not None else []
    others = positions if ref_positions is None else ref_positions
    for row in rows:
        if batch.from_memory is not None:  # the row's negative came from the memory (an earlier batch)
            row["from_memory"] = None if row["negative"] is None else bool(batch.from_memory[row["negative"]])
        for member in ("anchor", "positive", "negative"):
            if row[member] is not None:
                row[member] = int((positions if member == "anchor" else others)[row[member]])
    gaps = random_triplet_gaps(batch.dist, batch.labels, GAP_SAMPLES, generator,
                               None if batch.square else batch.negatives)
    half_width = max(batch.margin * 4, float(gaps.abs().max()) if len(gaps) else 1.0)
    return rows, _histogram(gaps, bins=40, half_width=half_width)


def _epoch_randomness(seed: int, epoch: int) -> tuple[np.random.Generator, int]:
    """The batch order's generator and the views' torch seed of one epoch, from (seed, epoch)
    alone: resuming at any epoch needs no saved generator state to draw the same batches."""
    sequence = np.random.SeedSequence([seed, epoch])
    return np.random.default_rng(sequence), int(sequence.generate_state(1, dtype=np.uint64)[0] >> 1)


def _resume(path: Path, cfg: RunConfig, training: TrainingStep, steps_per_epoch: int) -> tuple[int, int]:
    """Load a training state into the step's model, optimizer and cross-batch memory; (first
    epoch to train, steps already taken)."""
    from models.checkpoint import load_training_state

    extra: dict = {}
    info = load_training_state(path, training.model, training.optimizer, extra)
    if training.memory_size and "memory.embeddings" in extra:  # a memory saved by this run's settings (checked below)
        training.memory = CrossBatchMemory.from_state(extra, training.device)
    try:  # a state saved by an earlier version spells some settings differently: compare them resolved
        same = RunConfig.from_stored(dict(info.get("config") or {})) == cfg
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
                        generator: Optional[torch.Generator] = None, sorted_negatives: Any = None) -> torch.Tensor:
    """d(A,P) − d(A,N) of n triplets drawn uniformly per anchor; (n,) or empty. O(B²) memory.
    sorted_negatives: a MiningBatch's `negatives` against references (dist (B, R)), whose
    positive mask and +inf-padded values say which columns are positives and negatives."""
    if sorted_negatives is None:
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(len(labels), dtype=torch.bool, device=dist.device)
        positives, negatives = (same & ~eye).float(), (~same).float()
    else:
        positives = sorted_negatives.positive.float()
        negatives = torch.zeros_like(positives).scatter_(
            1, sorted_negatives.order, torch.isfinite(sorted_negatives.values).float())
    usable = torch.nonzero((positives.sum(1) > 0) & (negatives.sum(1) > 0)).squeeze(1)
    if len(usable) == 0:
        return dist.new_zeros(0)
    anchors = usable[torch.randint(len(usable), (n,), device=dist.device, generator=generator)]
    p = torch.multinomial(positives[anchors], 1, generator=generator).squeeze(1)
    q = torch.multinomial(negatives[anchors], 1, generator=generator).squeeze(1)
    return dist[anchors, p] - dist[anchors, q]


@torch.no_grad()
def embed(model: torch.nn.Module, pixels: np.ndarray, device: torch.device | str = "cpu",
          batch: Optional[int] = None) -> np.ndarray:
    """L2-normalised embeddings (N, d) float32 of uint8 images (N, H, W, C). batch: images per
    forward pass; by default EMBED_BATCH_CPU on a CPU (the
    activations stay in cache) and 1,024 on a GPU.

    Under the encoder's own precision (models.encoders.Encoder.precision, its run's setting):
    bf16 autocast where that resolves to bf16 on `device`, float32 where it does not or cannot
    (bf16 asked for on a GPU without it). Every inference path comes here, so a run's stored
    embeddings and its search queries are computed alike."""
    device = torch.device(device)
    if batch is None:
        batch = EMBED_BATCH_CPU if device.type == "cpu" else 1024
    if device.type == "cpu":
        use_share()
    model = model.eval().to(device)
    in_channels = in_channels_of(model)
    # Always the folded copy, even for one image: a search query is then computed as the run's
    # stored embeddings were. Under bf16 the folded weights round differently from a convolution
    # followed by its batch norm (an image queried unfolded lay 0.004 from its own stored vector).
    folded = folded_for_inference(model)
    try:
        dtype = resolve_precision(getattr(model, "precision", "auto"), device)
    except ValueError:
        dtype = None
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    # One array for every row, filled batch by batch. Keeping each batch's small output tensor
    # until a final torch.cat held glibc's heap open under them: the freed activations between
    # them were never returned, and RSS grew by 26 KB an image (5.7 GB at 200,000 images, past
    # 24 GB at a million); filled in place, 50,000 images take 350 MB and half the time.
    result = None
    for start in range(0, len(pixels), batch):
        chunk = torch.from_numpy(np.array(pixels[start:start + batch]))  # a copy: the array may be a read-only memory map
        with autocast:
            out = folded(to_input(chunk.to(device), in_channels)).float().cpu().numpy()
        if result is None:  # the width the encoder gives, whatever wraps it
            result = np.empty((len(pixels), out.shape[1]), dtype=np.float32)
        result[start:start + len(chunk)] = out
    if result is None:
        return np.zeros((0, model.head.net[-1].out_features), dtype=np.float32)
    return result
