"""Data-parallel training without Ray (core.training.parallel): two gloo processes, each encoding
half of a fixed batch, compute the single process's loss on the whole batch, and after
DistributedDataParallel's averaging hold the single process's gradients; their batch norm keeps
the same running statistics. The batch has an odd number of rows: the shards are uneven. Also
with a cross-batch memory, whose second step mines the first step's gathered rows."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from core.training.config import RunConfig
from core.training.loop import build_training
from core.training.parallel import Shard, collective_stop

ROWS = 27  # odd: shards of 13 and 14 rows
LR = 1e-3


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    x = torch.rand(ROWS, 1, 16, 16, generator=generator) * 2 - 1
    labels = torch.arange(ROWS) % 4  # 4 classes, 6 or 7 images each
    return x, labels


CONFIGS = {
    # a whole category's triplets over the (B, B) distances
    "all": dict(loss="triplet", miner="all"),
    # batch-hard against a cross-batch memory: the second step mines the first's gathered rows too
    "memory": dict(loss="triplet", miner="batch-hard", batch_size=ROWS, options={"memory_size": 2 * ROWS}),
}


def _config(name: str = "all") -> RunConfig:
    # float32: equality to TOL is a float32 property (precision auto is bf16 on CPUs with bf16
    # instructions, where each process's convolutions round differently from the whole batch's);
    # the small CNN at width 32 (its width before the width was a setting): the seeded batch's near-ties
    # (batch-hard's argmax against the memory) fall the same way in one process and in two with it
    return RunConfig(dataset="digits", encoder="small_cnn", embedding_dim=16, width=32, device="cpu", seed=3, precision="fp32",
                     **CONFIGS[name])


def _training(name: str):
    """The run's step with plain SGD in place of AdamW: Adam's update divides by the gradient's
    own size, so a gradient of 1e-9 that differs by float rounding moves a weight by up to lr;
    SGD's update is linear in the gradient and shows the second step from equal weights."""
    training = build_training(_config(name), 1, torch.device("cpu"))
    training.optimizer = torch.optim.SGD(training.model.parameters(), lr=LR)
    return training


def _step_outcome(training, x, labels) -> dict:
    result = training(x, labels, LR)
    model = training.model
    return {"loss": result.loss.double(), "embeddings": result.embeddings.double(),
            "grads": {name: p.grad.double().clone() for name, p in model.named_parameters()},
            "weights": {name: p.detach().double().clone() for name, p in model.named_parameters()},
            "buffers": {name: b.double().clone() for name, b in model.named_buffers()}}


def _process(rank: int, world: int, port: int, out: str, name: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        training = _training(name)
        training.distribute(Shard(rank, world))
        x, labels = _batch()
        first = _step_outcome(training, x, labels)
        second = _step_outcome(training, x, labels)  # from the first step's weights and running statistics
        shard = Shard(rank, world)
        asked = collective_stop(lambda: rank == 0, shard, torch.device("cpu"))()  # rank 0 says stop: all stop
        kept_on = collective_stop(lambda: False, shard, torch.device("cpu"))()
        torch.save({"first": first, "second": second, "stop": (asked, kept_on)}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(world: int, tmp_path, name: str) -> list[dict]:
    mp.spawn(_process, args=(world, _free_port(), str(tmp_path), name), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)]


def _single(name: str) -> tuple[dict, dict]:
    """The single process's two steps on the whole batch."""
    torch.set_num_threads(1)
    training = _training(name)
    x, labels = _batch()
    return _step_outcome(training, x, labels), _step_outcome(training, x, labels)


TOL = 1e-5


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gathered_processes_compute_the_single_process_loss_and_gradients(name, tmp_path):
    # float32 sums taken in another order (global batch norm's statistics over two processes) lie
    # about 1e-6 from one process's: 1.05e-6 on an embedding on an Intel Xeon (2026-12-06). A
    # wrong gather, scale or average is off by far more than TOL.
    single = _single(name)
    ranks = _spawn(2, tmp_path, name)
    for step, expected in zip(("first", "second"), single):
        assert float(expected["loss"]) > 0  # the miner found triplets: the gradients below are not all zero
        for outcome in ranks:
            got = outcome[step]
            # the miner and the loss saw the global batch: the same embeddings and the same loss
            torch.testing.assert_close(got["embeddings"], expected["embeddings"], rtol=0, atol=TOL)
            torch.testing.assert_close(got["loss"], expected["loss"], rtol=0, atol=TOL)
            # the gradients after DistributedDataParallel's averaging: not N times, not 1/N of them
            for name, grad in expected["grads"].items():
                scale = max(1.0, float(grad.abs().max()))
                torch.testing.assert_close(got["grads"][name], grad, rtol=0, atol=TOL * scale, msg=name)
            for name, weight in expected["weights"].items():
                torch.testing.assert_close(got["weights"][name], weight, rtol=0, atol=TOL, msg=name)
            # batch norm's running statistics are the global batch's, as one process keeps them
            for name, buffer in expected["buffers"].items():
                torch.testing.assert_close(got["buffers"][name], buffer, rtol=0, atol=TOL, msg=name)
    assert all(outcome["stop"] == (True, False) for outcome in ranks)


def test_a_shard_covers_its_rows_once():
    for world in (1, 2, 3, 4):
        for n in (1, 7, 8, 27):
            shards = [Shard(rank, world) for rank in range(world)]
            covered = [i for shard in shards for i in range(n)[shard.rows(n)]]
            assert covered == list(range(n))
            assert max(shards[0].sizes(n)) - min(shards[0].sizes(n)) <= 1
    with pytest.raises(ValueError, match="rank must be in"):
        Shard(2, 2)


@pytest.mark.parametrize("workers, said", [
    ("0", "--workers must be a whole number from 1 to 1024, got '0'"),
    ("-1", "--workers must be a whole number from 1 to 1024, got '-1'"),
    ("abc", "--workers must be a whole number from 1 to 1024, got 'abc'"),
    ("2", "2 workers train on a Ray cluster, and none is set: set EMBEDDING_LAB_RAY_ADDRESS"),
])
def test_the_command_line_refuses_workers_it_cannot_have_in_one_line(workers, said, tmp_path, monkeypatch):
    """Without a cluster (EMBEDDING_LAB_RAY_ADDRESS unset) more than one worker cannot be had;
    nothing is stored either way."""
    from tests.test_cli_errors import core, refused, stored_runs

    monkeypatch.delenv("EMBEDDING_LAB_RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    result = core("train", "--dataset", "digits", "--epochs", "1", f"--workers={workers}", home=tmp_path)
    refused(result, said)
    assert stored_runs(tmp_path) == []


def test_workers_are_checked_against_the_clusters_cpus_or_gpus(monkeypatch):
    from core.runs import launch

    monkeypatch.setenv("EMBEDDING_LAB_RAY_ADDRESS", "http://head:8265")
    totals = {"CPU": 4.0, "GPU": 1.0}
    monkeypatch.setattr(launch, "_cluster_totals", lambda: totals)
    launch.check_workers(4, "cpu")  # one CPU each: there are four
    with pytest.raises(launch.LaunchError, match=r"^5 workers need a CPU each, but the Ray cluster at "
                                                 r"http://head:8265 has 4; ask for at most 4$"):
        launch.check_workers(5, "cpu")
    with pytest.raises(launch.LaunchError, match="2 workers need a GPU each, .* has 1"):
        launch.check_workers(2, "cuda")
    with pytest.raises(launch.LaunchError, match="2 workers need a GPU each"):
        launch.check_workers(2, "auto")  # auto on a cluster with GPUs: a GPU run
    totals = None  # a dashboard that does not say: Ray keeps the job waiting instead
    launch.check_workers(64, "cpu")
    launch.check_workers(1, "cuda")  # one worker is a plain run: nothing to check


def test_workers_must_fit_the_batch():
    with pytest.raises(ValueError, match=r"workers must be at most the batch size \(8\)"):
        RunConfig(dataset="digits", batch_size=8, workers=9)
    with pytest.raises(ValueError, match="workers must be a whole number from 1 to 1024, got 0"):
        RunConfig(dataset="digits", workers=0)
    assert RunConfig(dataset="digits").workers == 1  # a config stored before workers existed reads as one process
