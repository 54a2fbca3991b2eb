"""The training loop: supervision, P×K batches, every objective and miner, and the device paths
(CPU never touches a GPU-only path; the CUDA path runs where a GPU is present)."""
import os
import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from core.training.config import RunConfig
from core.data.datasets import DatasetArrays, load_builtin
from core.explore.metrics import retrieval_metrics
from core.threads import thread_share
from core.training.loop import (
    PixelSource, TrainingStep, build_training, embed, fit, resolve_precision, uses_views,
)


@pytest.fixture(scope="module")
def digits() -> DatasetArrays:
    pixels, labels, split, classes = load_builtin("digits")
    return DatasetArrays(pixels, labels, split, classes)


def subset(data: DatasetArrays, n: int) -> DatasetArrays:
    return DatasetArrays(data.pixels[:n], data.labels[:n], data.split[:n], data.classes)


def record_batches(monkeypatch) -> list[tuple[int, torch.Tensor]]:
    """Patch TrainingStep to note each batch's (rows, labels) before it trains on it."""
    seen: list[tuple[int, torch.Tensor]] = []
    original = TrainingStep.__call__

    def recording(self, x, labels, lr):
        seen.append((len(x), labels.clone()))
        return original(self, x, labels, lr)

    monkeypatch.setattr(TrainingStep, "__call__", recording)
    return seen


class BatchMatrixOps(TorchFunctionMode):
    """Counts the products that make a (B, B) matrix (a Gram matrix: the distances) and the sorts
    of a (B, B) matrix (the negatives), whoever calls them."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size, self.products, self.sorts = size, 0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        square = (self.size, self.size)
        if name in ("matmul", "__matmul__", "mm", "cdist") and isinstance(out, torch.Tensor) and out.shape == square:
            self.products += 1
        if name in ("sort", "argsort", "msort") and isinstance(args[0], torch.Tensor) and args[0].shape == square:
            self.sorts += 1
        return out


@pytest.mark.parametrize("miner", ["semi-hard", "facenet"])
def test_a_step_computes_its_distances_once_and_sorts_them_once(digits, miner, monkeypatch):
    """The loss, the miner, the per-image tally, the step's counts and the epoch-end inspector
    all read one distance matrix and one sort of it."""
    from core.metric.losses.triplet import TripletLoss

    calls = []
    distances = TripletLoss.distances
    monkeypatch.setattr(TripletLoss, "distances", lambda self, x: calls.append(len(x)) or distances(self, x))
    from core.metric import mining

    ops = BatchMatrixOps(32)
    sort_rows = mining.sort_rows

    def counted_sort(matrix):  # the mining's one sort, by numpy or torch: one sort whichever does it
        before = ops.sorts
        out = sort_rows(matrix)
        ops.sorts = before + (tuple(matrix.shape) == (32, 32))
        return out

    monkeypatch.setattr(mining, "sort_rows", counted_sort)
    steps, epochs = [], []
    with ops:
        fit(RunConfig(dataset="digits", loss="triplet", epochs=1, batch_size=32, miner=miner), subset(digits, 200),
            on_step=steps.append, on_epoch=lambda stats, state: epochs.append(stats))
    assert len(steps) > 1 and calls == [32] * len(steps)
    assert ops.products == len(steps) and ops.sorts == len(steps)
    stats = epochs[0]  # the tally, the counts and the inspector were on
    assert stats.image_counts.sum() > 0 and sum(stats.counts.values()) > 0 and stats.triplets
    assert stats.gap_histogram is not None


def test_pk_batches_give_every_anchor_a_positive(digits, monkeypatch):
    seen = record_batches(monkeypatch)
    fit(RunConfig(dataset="digits", epochs=1, batch_size=32, samples_per_class=4), subset(digits, 400))
    train = int((digits.split[:400] == "train").sum())
    assert len(seen) == train // 32
    for rows, labels in seen:
        _, counts = torch.unique(labels, return_counts=True)
        assert rows == 32 and len(counts) == 8 and (counts == 4).all()


def test_random_batches_and_self_supervision_on_labeled_data(digits, monkeypatch):
    seen = record_batches(monkeypatch)
    data = subset(digits, 400)
    fit(RunConfig(dataset="digits", epochs=1, batch_size=32, sampler="random"), data)
    assert any((torch.unique(labels, return_counts=True)[1] == 1).any() for _, labels in seen)

    seen.clear()
    cfg = RunConfig(dataset="digits", epochs=1, batch_size=32, supervision="self")
    assert uses_views(cfg, data)
    fit(cfg, data)
    for rows, labels in seen:  # rows i and i + B are two views; the image index is the label
        assert rows == 64
        torch.testing.assert_close(labels, torch.arange(32).repeat(2))


# the encoder the objectives are compared on: the default vgg_grid's 3×3 grid repeats digits' 2×2 last
# map (models.encoders.VGGGridCNN), starts at MAP@R 0.39 untrained and moves less in five steps
OBJECTIVES_ENCODER = "vgg_cnn"


@pytest.fixture(scope="module")
def untrained_map_at_r(digits) -> float:
    """MAP@R of the seed-0 encoder before any step: random conv features already reach
    Precision@1 ≈ 0.86 on digits, so MAP@R (≈ 0.31) is what shows learning."""
    torch.manual_seed(0)
    model = build_training(RunConfig(dataset="digits", encoder=OBJECTIVES_ENCODER), 1, torch.device("cpu")).model
    test = digits.split == "test"
    return retrieval_metrics(embed(model, digits.pixels[test]), digits.labels[test])["map_at_r"]


@pytest.mark.parametrize("settings", [
    {"loss": "supcon"},
    {"loss": "triplet", "miner": "batch-hard"},
    {"loss": "triplet", "miner": "facenet"},
    {"loss": "triplet", "triplet_variant": "squared"},
    {"loss": "triplet", "triplet_variant": "soft-margin", "miner": "all"},
    {"loss": "triplet", "distance": "cosine"},
    {"loss": "contrastive", "miner": "hard", "margin": 0.5},
    {"loss": "contrastive", "miner": "all", "margin": 0.5, "sampler": "random"},
])
def test_every_supervised_objective_and_miner_learns(digits, untrained_map_at_r, settings):
    # five steps, too few for a warm-up: a rate every objective takes at full strength from step one
    cfg = RunConfig(dataset="digits", encoder=OBJECTIVES_ENCODER, epochs=1, batch_size=64, lr=1e-3, **settings)
    epochs = []
    model = fit(cfg, subset(digits, 448), on_epoch=lambda stats, state: epochs.append(stats))
    assert len(epochs) == 1 and np.isfinite(epochs[0].loss) and epochs[0].loss > 0
    assert sum(epochs[0].counts.values()) > 0 and epochs[0].triplets
    test = digits.split == "test"
    map_at_r = retrieval_metrics(embed(model, digits.pixels[test]), digits.labels[test])["map_at_r"]
    assert map_at_r > untrained_map_at_r + 0.08, (map_at_r, untrained_map_at_r)  # five steps, clearly learning


@pytest.mark.parametrize("settings", [
    {"loss": "infonce"},
    {"loss": "contrastive", "supervision": "self"},
    {"loss": "supcon", "supervision": "self"},
    {"loss": "triplet", "supervision": "self"},
])
def test_every_self_supervised_objective_learns(digits, settings):
    epochs = []
    fit(RunConfig(dataset="digits", epochs=2, batch_size=64, **settings), subset(digits, 448),
        on_epoch=lambda stats, state: epochs.append(stats.loss))
    assert len(epochs) == 2 and np.isfinite(epochs).all() and epochs[1] < epochs[0]


def test_the_easy_miner_has_nothing_to_learn(digits):
    epochs = []
    fit(RunConfig(dataset="digits", loss="triplet", epochs=1, batch_size=64, miner="easy"), subset(digits, 448),
        on_epoch=lambda stats, state: epochs.append(stats))
    assert epochs[0].loss == 0 and epochs[0].counts["easy"] > 0  # easy triplets have zero loss, never NaN


def test_cpu_never_takes_a_gpu_path(digits, monkeypatch):
    def gpu_only(*args, **kwargs):
        raise AssertionError("a GPU-only call on the CPU path")

    monkeypatch.setattr(torch.cuda, "mem_get_info", gpu_only)
    monkeypatch.setattr(torch.Tensor, "pin_memory", gpu_only)
    monkeypatch.setattr(torch.Tensor, "cuda", gpu_only)
    import core.training.loop as loop

    monkeypatch.setattr(loop, "cpu_has_bf16", lambda: False)
    assert resolve_precision("auto", torch.device("cpu")) is None  # a CPU without bf16 instructions
    assert resolve_precision("fp32", torch.device("cpu")) is None
    assert resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16  # only when asked for
    monkeypatch.setattr(loop, "cpu_has_bf16", lambda: True)
    assert resolve_precision("auto", torch.device("cpu")) == torch.bfloat16  # one with them: a cheaper step
    assert resolve_precision("fp32", torch.device("cpu")) is None

    training = build_training(RunConfig(dataset="digits", device="cpu", precision="fp32"), 1, torch.device("cpu"))
    assert training.autocast_dtype is None and training.channels_last  # channels-last is faster on CPU too
    conv = next(m for m in training.model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.get_num_threads() == thread_share()  # its share of the cores, not all of them
    source = PixelSource(digits.pixels[:10], torch.device("cpu"))
    assert source.on_device and source.batch(torch.tensor([3, 1])).shape == (2, 8, 8, 1)
    model = fit(RunConfig(dataset="digits", epochs=1, batch_size=64, device="cpu"), subset(digits, 300))
    assert next(model.parameters()).device.type == "cpu"


def test_the_cpu_s_bf16_instructions_are_read_from_its_flags(tmp_path, monkeypatch):
    import builtins

    import core.training.loop as loop

    real_open = builtins.open
    for flags, expected in (("fpu sse avx512f avx512_bf16 avx512_vnni", True), ("fpu amx_bf16 amx_tile", True),
                            ("fpu sse avx2 avx512f avx512bw", False)):
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(f"processor\t: 0\nmodel name\t: a CPU\nflags\t\t: {flags}\n")
        monkeypatch.setattr(builtins, "open", lambda path, *a, **k: real_open(cpuinfo if path == "/proc/cpuinfo" else path, *a, **k))
        loop.cpu_has_bf16.cache_clear()
        assert loop.cpu_has_bf16() is expected, flags
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: (_ for _ in ()).throw(FileNotFoundError(path)))
    loop.cpu_has_bf16.cache_clear()
    assert loop.cpu_has_bf16() is False  # no /proc (macOS, Windows): float32, the safe choice
    monkeypatch.undo()
    loop.cpu_has_bf16.cache_clear()


def test_bf16_autocast_on_cpu_when_asked(digits):
    epochs = []
    cfg = RunConfig(dataset="digits", epochs=1, batch_size=64, device="cpu", precision="bf16")
    model = fit(cfg, subset(digits, 300), on_epoch=lambda stats, state: epochs.append(stats))
    assert np.isfinite(epochs[0].loss)
    out = embed(model, digits.pixels[:5])
    assert out.dtype == np.float32 and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)


def test_compile_wraps_the_forward_but_checkpoints_the_plain_module():
    training = build_training(RunConfig(dataset="digits", compile=True), 1, torch.device("cpu"))
    assert training.forward is not training.model
    assert not any(name.startswith("_orig_mod") for name in training.model.state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_path_bf16_channels_last_and_data_on_the_gpu(digits):
    device = torch.device("cuda")
    training = build_training(RunConfig(dataset="digits", device="cuda"), 1, device)
    assert training.autocast_dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else None)
    assert training.channels_last
    source = PixelSource(digits.pixels, device)
    assert source.on_device and source.pixels.device.type == "cuda"
    epochs = []
    model = fit(RunConfig(dataset="digits", epochs=2, batch_size=128, device="cuda"), digits,
                on_epoch=lambda stats, state: epochs.append(stats.loss))
    assert len(epochs) == 2 and all(np.isfinite(epochs))
    test = digits.split == "test"
    p1 = retrieval_metrics(embed(model, digits.pixels[test], device), digits.labels[test])["precision_at_1"]
    assert p1 > 0.8


def test_a_long_epoch_measures_its_share_of_the_cores_again_as_it_goes(digits, monkeypatch):
    """A million images make an epoch of an hour: a share measured at its start (one thread while
    another job was ending) must not hold for all of it. With SHARE_SECONDS at 0 every step measures."""
    import core.training.loop as loop

    calls = []
    monkeypatch.setattr(loop, "use_share", lambda: calls.append(1) or 1)
    cfg = RunConfig(dataset="digits", epochs=1, batch_size=64, device="cpu", precision="fp32")
    data = subset(digits, 400)
    steps = []
    monkeypatch.setattr(loop, "SHARE_SECONDS", 3600.0)
    fit(cfg, data, on_step=lambda progress: steps.append(progress.step))
    once = len(calls)  # per epoch (and around it), none within: an hour has not passed
    calls.clear()
    monkeypatch.setattr(loop, "SHARE_SECONDS", 0.0)
    fit(cfg, data, on_step=lambda progress: steps.append(progress.step))
    assert len(steps) >= 2 * 4
    assert len(calls) >= once + len(steps) // 2 - 1  # again at every step of the epoch


_EMBED_PEAK = """
import sys
import numpy as np
from core.training.loop import embed
from models.encoders import build_encoder

def peak_mb():
    return int([line for line in open("/proc/self/status") if line.startswith("VmHWM")][0].split()[1]) // 1024

n = int(sys.argv[1])
model = build_encoder("small_cnn", 1, 128)
pixels = np.random.default_rng(0).integers(0, 255, (n, 28, 28, 1), dtype=np.uint8)
before = peak_mb()
out = embed(model, pixels, "cpu")
assert out.shape == (n, 128)
print(peak_mb() - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc (Linux)")
def test_embedding_memory_does_not_grow_with_the_images_beyond_their_output():
    """Each batch's output kept until one torch.cat held glibc's heap open between the freed
    activations: 470 MB more at 50,000 images, past 24 GB at a million. Filled in place, the peak
    grows by the (N, 128) float32 output only (20 MB at 40,000)."""
    import subprocess
    import sys

    def growth(n: int) -> int:
        done = subprocess.run([sys.executable, "-c", _EMBED_PEAK, str(n)], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=600,
                              env={**os.environ, "EMBEDDING_LAB_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-2000:]
        return int(done.stdout.split()[-1])

    small, large = growth(4_000), growth(40_000)
    assert large - small < 100, (small, large)


def test_embed_runs_under_the_encoders_own_precision_and_the_run_hands_it_on(monkeypatch, digits):
    """A run trained under bf16 autocast embeds under it too (twice the images a second on a CPU
    with bf16 instructions); one set to fp32 embeds in float32; a precision this device cannot give
    (bf16 on a GPU without it) falls back to float32 rather than failing the run's embedding."""
    import core.training.loop as loop
    from models.encoders import build_encoder, folded_for_inference, to_input

    pixels = digits.pixels[:40]
    x = to_input(torch.from_numpy(pixels), 1)
    torch.manual_seed(0)
    fp32 = build_encoder("small_cnn", 1, 16, 8, precision="fp32").eval()
    bf16 = build_encoder("small_cnn", 1, 16, 8, precision="bf16").eval()
    bf16.load_state_dict(fp32.state_dict())
    with torch.no_grad():  # embed computes with the batch norms folded into the convolutions
        plain = folded_for_inference(fp32)(x).numpy()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = folded_for_inference(bf16)(x).float().numpy()
    np.testing.assert_allclose(embed(fp32, pixels, "cpu"), plain, atol=1e-6, rtol=0)
    np.testing.assert_allclose(embed(bf16, pixels, "cpu"), autocast, atol=1e-6, rtol=0)
    assert np.abs(autocast - plain).max() > 1e-4  # the two really differ, so the asserts above tell them apart
    assert (autocast * plain).sum(1).min() > 0.99  # and only by bf16's rounding

    for precision in ("fp32", "bf16", "auto"):
        cfg = RunConfig(dataset="digits", device="cpu", precision=precision)
        assert build_training(cfg, 1, torch.device("cpu")).model.precision == precision
    with pytest.raises(ValueError, match="precision must be one of: auto, fp32, bf16; got 'fp16'"):
        build_encoder("small_cnn", 1, 16, 8, precision="fp16")

    def no_bf16(precision, device):
        raise ValueError("precision bf16 was asked for, but this GPU has no bfloat16")
    monkeypatch.setattr(loop, "resolve_precision", no_bf16)
    np.testing.assert_allclose(embed(bf16, pixels, "cpu"), plain, atol=1e-6, rtol=0)


def test_one_image_embeds_as_it_did_among_all_under_bf16(digits):
    """A search query (one image) goes through the same folded copy as the run's stored embeddings
    (all images in batches): under bf16 a convolution followed by its batch norm rounds otherwise
    than the folded convolution, and a stored image queried alone lay 0.004 from itself."""
    from models.encoders import build_encoder

    torch.manual_seed(0)
    model = build_encoder("small_cnn", 1, 16, 8, precision="bf16")
    for module in model.modules():  # batch norms as training leaves them, not the identity of a new one
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.05, 3.0)
            module.weight.data.uniform_(0.5, 2.0)
    pixels = digits.pixels[:300]
    stored = embed(model, pixels, "cpu")
    for position in (0, 7, 299):
        alone = embed(model, pixels[position:position + 1], "cpu")[0]
        assert np.linalg.norm(alone - stored[position]) < 1e-4
