"""The training loop: `fit(cfg, data, ...)` reads top to bottom; the worker and the command line
both call it."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from core.augment import two_views
from core.config import RunConfig
from core.datasets import DatasetArrays
from core.losses import make_loss
from core.mining import count_triplets, pairwise_distances, sample_triplets
from models.encoders import build_encoder, to_input

TRIPLETS_SHOWN_PER_CATEGORY = 8
GAP_SAMPLES = 5000


class Cancelled(Exception):
    """Raised inside the loop when the run was asked to stop."""


@dataclass
class StepProgress:
    epoch: int  # 1-based
    step: int  # global, 1-based
    total_steps: int
    loss: float
    counts: dict[str, int]  # easy / semi_hard / hard in this batch


@dataclass
class EpochStats:
    epoch: int
    loss: float
    counts: dict[str, int]  # summed over the epoch's batches
    seconds: float
    # sampled triplets of the epoch's last batch, as dataset positions
    triplets: list[dict] = field(default_factory=list)
    gap_histogram: Optional[dict] = None


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for, but no CUDA GPU is available here; use auto or cpu")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def uses_views(cfg: RunConfig, data: DatasetArrays) -> bool:
    """Self-supervised (two views of an image are the positive pair) for InfoNCE or unlabeled data."""
    return cfg.loss == "infonce" or data.labels is None


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def fit(
    cfg: RunConfig,
    data: DatasetArrays,
    on_step: Optional[Callable[[StepProgress], None]] = None,
    on_epoch: Optional[Callable[[EpochStats, torch.nn.Module], None]] = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> torch.nn.Module:
    """Train an encoder on the dataset's train split; returns it in eval mode."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    in_channels = int(data.pixels.shape[3])
    model = build_encoder(cfg.encoder, in_channels, cfg.embedding_dim).to(device)
    loss_fn = make_loss(cfg.loss, cfg.miner, cfg.margin, cfg.temperature, cfg.distance)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)

    train_index = data.train_index if len(data.train_index) else np.arange(len(data.pixels))
    pixels = torch.from_numpy(np.ascontiguousarray(data.pixels[train_index])).to(device)
    labels = None if data.labels is None else torch.from_numpy(data.labels[train_index]).to(device)
    views = uses_views(cfg, data)
    batch = min(cfg.batch_size, len(train_index))
    steps_per_epoch = max(1, len(train_index) // batch)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = min(100, total_steps // 10)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)

    step = 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        started = time.perf_counter()
        order = torch.from_numpy(rng.permutation(len(train_index))).to(device)
        loss_sum, counts_sum = 0.0, {"easy": 0, "semi_hard": 0, "hard": 0}
        for i in range(steps_per_epoch):
            if should_stop():
                raise Cancelled()
            picked = order[i * batch:(i + 1) * batch]
            x = to_input(pixels[picked], in_channels)
            if views:
                x = two_views(x, generator, flip=in_channels == 3)
                batch_labels = torch.arange(len(picked), device=device).repeat(2)
            else:
                batch_labels = labels[picked]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, cfg.lr, warmup)
            embeddings = model(x)
            loss = loss_fn(embeddings, batch_labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1

            with torch.no_grad():
                dist = pairwise_distances(embeddings.detach().float(), cfg.distance)
                counts = count_triplets(dist, batch_labels, cfg.margin)
            batch_counts = {"easy": counts.easy, "semi_hard": counts.semi_hard, "hard": counts.hard}
            for key, value in batch_counts.items():
                counts_sum[key] += value
            loss_value = float(loss.detach())
            loss_sum += loss_value
            if on_step is not None:
                on_step(StepProgress(epoch, step, total_steps, loss_value, batch_counts))

        # the inspector shows a sample of what the miner saw in the epoch's last batch
        with torch.no_grad():
            sample = sample_triplets(dist, batch_labels, cfg.margin, TRIPLETS_SHOWN_PER_CATEGORY)
            gaps = random_triplet_gaps(dist, batch_labels, GAP_SAMPLES, generator)
        positions = train_index[(picked.repeat(2) if views else picked).cpu().numpy()]
        triplets = [
            {
                "anchor": int(positions[a]), "positive": int(positions[p]), "negative": int(positions[n]),
                "d_ap": float(dap), "d_an": float(dan), "category": category,
            }
            for a, p, n, dap, dan, category in zip(
                sample.anchor.tolist(), sample.positive.tolist(), sample.negative.tolist(),
                sample.d_ap.tolist(), sample.d_an.tolist(), sample.category,
            )
        ]
        gap_histogram = _histogram(gaps, bins=40, half_width=max(cfg.margin * 4, float(gaps.abs().max()) if len(gaps) else 1.0))
        stats = EpochStats(epoch, loss_sum / steps_per_epoch, counts_sum, time.perf_counter() - started,
                           triplets, gap_histogram)
        if on_epoch is not None:
            on_epoch(stats, model)
    return model.eval()


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
    model = model.eval().to(device)
    in_channels = _in_channels(model)
    out = []
    for start in range(0, len(pixels), batch):
        chunk = torch.from_numpy(np.array(pixels[start:start + batch]))  # a copy: the array may be a read-only memory map.to(device)
        out.append(model(to_input(chunk, in_channels)).float().cpu())
    return torch.cat(out).numpy().astype(np.float32)


def _in_channels(model: torch.nn.Module) -> int:
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    return int(first_conv.in_channels)
