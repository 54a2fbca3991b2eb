"""One run on several processes, data-parallel, with the miner and the loss seeing the global batch.

Every process draws the same global batch (the sampler's batches come from (seed, epoch) alone,
core.training.loop) and builds its input rows as a single process would, views included; then it
encodes only its shard of the rows (`Shard.rows`), and `gather_rows` puts the (B, d) embeddings of
the whole batch together on every process, with their gradients. So the distance matrix, the
miner, the loss, the tally and the inspector are those of the single-process step on the same
batch, computed identically on every process; only the encoder's forward and backward are split.

The factor N of N processes: `gather_rows` is an all_gather whose backward sums every process's
gradient for a shard (as torch.distributed.nn.functional.all_gather's does, which torch now
deprecates). Each process computes the same loss L, so a process's shard gets N · ∂L/∂(its rows); DistributedDataParallel then averages the parameters'
gradients over the N processes, which takes the N back out: the averaged gradient is ∂L/∂θ of
the single-process step, exactly (tests/test_parallel.py checks it to float rounding).

Batch normalisation must see the global batch too, or each shard's statistics would differ from
the batch's (and torch's SyncBatchNorm runs on GPUs only): `GlobalBatchNorm2d` takes its mean and
variance over every process's rows with a differentiable all_reduce (whose backward sums, the same
factor N as above), and keeps the running statistics a single process would.

torch only, no Ray: core.runs.parallel starts the processes with Ray Train; the tests start two
with torch.multiprocessing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Shard:
    """Process `rank` of `world`: which rows of every global batch it encodes."""

    rank: int
    world: int

    def __post_init__(self) -> None:
        if not (0 <= self.rank < self.world):
            raise ValueError(f"rank must be in [0, {self.world}), got {self.rank}")

    def bounds(self, n: int, rank: int) -> tuple[int, int]:
        return n * rank // self.world, n * (rank + 1) // self.world

    def rows(self, n: int) -> slice:
        """This process's rows of an n-row batch: contiguous, the shards' sizes within one of each other."""
        return slice(*self.bounds(n, self.rank))

    def sizes(self, n: int) -> list[int]:
        return [end - start for start, end in (self.bounds(n, r) for r in range(self.world))]


class _SumOverProcesses(torch.autograd.Function):
    """all_reduce(SUM) forward; backward, the sum of every process's gradient for it (what the
    gradient of the sum of the processes' losses is)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class _GatherRows(torch.autograd.Function):
    """all_gather of equal (m, ...) shards into (world·m, ...) forward; backward, this process's
    rows of the gradient summed over the processes (one all_reduce of a (B, d) gradient: small
    next to the encoder's, and gloo has no reduce_scatter)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, rank: int, world: int) -> torch.Tensor:
        ctx.rank, ctx.rows = rank, len(local)
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None, None


def sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor summed over the processes of the group, differentiably (see _SumOverProcesses)."""
    return _SumOverProcesses.apply(tensor)


def gather_rows(local: torch.Tensor, n: int, shard: Shard) -> torch.Tensor:
    """The (n, ...) rows of every process, in rank order, from this process's shard `local`
    (shard.rows(n) of them); differentiable: the gradient of each process's loss reaches the
    rows of every shard (summed over the processes, see the module's docstring). Shards of
    unequal size are padded for the collective and cut back after it."""
    sizes = shard.sizes(n)
    if len(local) != sizes[shard.rank]:
        raise ValueError(f"process {shard.rank} holds {len(local)} rows of its shard, expected {sizes[shard.rank]}")
    most = max(sizes)
    padded = local if len(local) == most else torch.cat([local, local.new_zeros(most - len(local), *local.shape[1:])])
    gathered = _GatherRows.apply(padded.contiguous(), shard.rank, shard.world)
    if most * shard.world == n:
        return gathered
    return torch.cat([gathered[r * most:r * most + size] for r, size in enumerate(sizes)])


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d over every process's rows while training in a process group: the mean and
    (biased) variance of the global batch in two passes, as a single process computes them on
    the concatenated batch; the running statistics updated as nn.BatchNorm2d updates them (the
    unbiased variance), identically on every process. Outside a group, or in eval mode, it is
    nn.BatchNorm2d; its parameters and buffers keep their names, so checkpoints do not change."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        values = x.float()
        dims = (0, 2, 3)
        local_count = values.new_tensor([values.shape[0] * values.shape[2] * values.shape[3]])
        summed = sum_over_processes(torch.cat([values.sum(dims), local_count]))  # one collective for the sums and the count
        count = summed[-1].detach()
        mean = summed[:-1] / count
        centred = values - mean[None, :, None, None]
        variance = sum_over_processes(centred.pow(2).sum(dims)) / count
        out = centred * torch.rsqrt(variance + self.eps)[None, :, None, None]
        if self.affine:
            out = out * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = variance * (count / (count - 1).clamp(min=1))
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.detach(), alpha=momentum)
        return out.to(x.dtype)


def global_batch_norm(model: nn.Module) -> nn.Module:
    """The model with each nn.BatchNorm2d made a GlobalBatchNorm2d in place (same weights,
    buffers and names); returns it."""
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = GlobalBatchNorm2d
    return model


def distribute(model: nn.Module, device: torch.device) -> nn.Module:
    """What a process of the group runs its forward through: the model with global batch norm,
    wrapped in DistributedDataParallel (which averages the gradients over the processes and
    starts every process from rank 0's weights). The plain `model` keeps the weights, so its
    checkpoints are a single process's."""
    from torch.nn.parallel import DistributedDataParallel

    global_batch_norm(model)
    # the running statistics are the same on every process already (GlobalBatchNorm2d): no broadcast a step
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   forward_sync_buffers=False)


def collective_stop(should_stop: Callable[[], bool], shard: Shard, device: torch.device) -> Callable[[], bool]:
    """A `should_stop` every process answers alike at each step, from rank 0's: the processes
    leave the loop together instead of the others waiting forever in the next collective. An
    exception of rank 0's should_stop (the run lost: core.runs.lifecycle.LostRun) is raised on
    rank 0 and the others stop too."""

    def agreed() -> bool:
        verdict = torch.zeros(1, dtype=torch.int32, device=device)
        error = None
        if shard.rank == 0:
            try:
                verdict[0] = 1 if should_stop() else 0
            except Exception as exc:  # said after the collective, so the others are not left waiting
                error, verdict[0] = exc, 2
        dist.all_reduce(verdict, op=dist.ReduceOp.MAX)
        if error is not None:
            raise error
        return bool(verdict.item())

    return agreed
