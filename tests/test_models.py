import json

import pytest
import torch
from safetensors.torch import save_file

from models.checkpoint import CheckpointError, load_checkpoint, read_metadata, save_checkpoint
from models.encoders import build_encoder, folded_for_inference, to_input
from models.widths import DEFAULT_WIDTHS, LEGACY_WIDTHS


@pytest.mark.parametrize("name", ["vgg_grid", "vgg_cnn", "grid_cnn", "small_cnn", "resnet18"])
@pytest.mark.parametrize("channels,size", [(1, 8), (1, 28), (3, 64), (3, 33)])
def test_encoders_take_any_size_and_return_unit_vectors(name, channels, size):
    model = build_encoder(name, channels, 16).eval()
    with torch.no_grad():
        out = model(torch.randn(3, channels, size, size))
    assert out.shape == (3, 16)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))


def test_to_input_scales_and_converts_channels():
    pixels = torch.tensor([[[[0], [255]]]], dtype=torch.uint8)  # (1, 1, 2, 1)
    grey = to_input(pixels, 1)
    assert grey.shape == (1, 1, 1, 2) and grey.min() == -1 and grey.max() == 1
    assert to_input(pixels, 3).shape == (1, 3, 1, 2)
    colour = torch.zeros(1, 2, 2, 3, dtype=torch.uint8)
    assert to_input(colour, 1).shape == (1, 1, 2, 2)


def test_checkpoint_round_trip_keeps_weights_and_config(tmp_path):
    model = build_encoder("small_cnn", 1, 8)
    config = {"encoder": "small_cnn", "embedding_dim": 8, "width": DEFAULT_WIDTHS["small_cnn"], "loss": "triplet"}
    path = tmp_path / "enc.safetensors"
    save_checkpoint(path, model, config, in_channels=1)
    loaded, meta = load_checkpoint(path)
    assert meta["config"] == config and meta["in_channels"] == 1
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))


def test_a_failed_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    path = tmp_path / "enc.safetensors"
    model = build_encoder("small_cnn", 1, 8)
    config = {"encoder": "small_cnn", "embedding_dim": 8, "width": DEFAULT_WIDTHS["small_cnn"]}
    save_checkpoint(path, model, config, 1)
    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, build_encoder("small_cnn", 1, 8), config, 1)
    load_checkpoint(path)  # still the first one, whole


def test_wrong_files_get_a_clear_message_and_are_never_unpickled(tmp_path):
    pickle_file = tmp_path / "model.safetensors"
    torch.save({"weights": torch.zeros(2)}, pickle_file)  # a pickle named like a checkpoint
    with pytest.raises(CheckpointError, match="model.safetensors: not a safetensors file"):
        load_checkpoint(pickle_file)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not an encoder checkpoint written by Embedding Lab"):
        read_metadata(foreign)

    mismatched = tmp_path / "mismatched.safetensors"
    save_file({"w": torch.zeros(2)}, str(mismatched), metadata={
        "format": "embedding-lab/encoder", "format_version": "1", "in_channels": "1",
        "config": json.dumps({"encoder": "small_cnn", "embedding_dim": 8})})
    with pytest.raises(CheckpointError, match="do not fit the small_cnn encoder"):
        load_checkpoint(mismatched)

    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.safetensors"):
        load_checkpoint(empty)


# --- validate_checkpoint: every check before any allocation -----------------------------------

def _write(path, tensors, config, in_channels="1"):
    save_file(tensors, str(path), metadata={
        "format": "embedding-lab/encoder", "format_version": "1", "in_channels": in_channels,
        "config": json.dumps(config)})
    return path


def _good_state(encoder="small_cnn", channels=1, dim=8, width=None):
    """Weights as a config without a width describes them: the encoder's width from before the width
    was a setting (models.widths.LEGACY_WIDTHS), unless `width` is given."""
    width = LEGACY_WIDTHS[encoder] if width is None else width
    return {k: v.contiguous() for k, v in build_encoder(encoder, channels, dim, width).state_dict().items()}


def test_a_good_checkpoint_passes_validation_and_loads(tmp_path):
    from models.checkpoint import validate_checkpoint

    config = {"encoder": "small_cnn", "embedding_dim": 8}
    path = _write(tmp_path / "good.safetensors", _good_state(), config)
    assert validate_checkpoint(path) == read_metadata(path) == {"config": config, "in_channels": 1}
    model, _ = load_checkpoint(path)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 8)


def test_a_checkpoint_from_before_the_width_setting_loads_at_the_old_width_and_a_new_one_at_its_own(tmp_path):
    from models.checkpoint import validate_checkpoint

    old = _write(tmp_path / "old.safetensors", _good_state(), {"encoder": "small_cnn", "embedding_dim": 8})
    model, _ = load_checkpoint(old)
    assert model.features[0].out_channels == LEGACY_WIDTHS["small_cnn"] == 32
    assert DEFAULT_WIDTHS["small_cnn"] != 32  # new runs are wider, so the fallback is what loads old files
    new = _write(tmp_path / "new.safetensors", _good_state(width=48), {"encoder": "small_cnn", "embedding_dim": 8, "width": 48})
    model, _ = load_checkpoint(new)
    assert model.features[0].out_channels == 48
    x = torch.randn(2, 1, 8, 8)
    assert model(x).shape == (2, 8)
    # a config whose width does not match the weights is refused with the tensor that differs
    lying = _write(tmp_path / "lying.safetensors", _good_state(width=48), {"encoder": "small_cnn", "embedding_dim": 8})
    with pytest.raises(CheckpointError, match=r"lying.safetensors: the weights do not fit the small_cnn encoder: "
                                              r"features.0.weight is F32 \[48, 1, 3, 3\], expected F32 \[32, 1, 3, 3\]"):
        validate_checkpoint(lying)


@pytest.mark.parametrize("config,channels,message", [
    ({"encoder": "vit_huge", "embedding_dim": 8}, "1", "unknown encoder 'vit_huge'"),
    ({"embedding_dim": 8}, "1", "unknown encoder None"),
    ({"encoder": "small_cnn", "embedding_dim": 6_000_000}, "1", "embedding_dim must be a whole number from 2 to 4096, got 6000000"),
    ({"encoder": "small_cnn", "embedding_dim": 0}, "1", "got 0"),
    ({"encoder": "small_cnn", "embedding_dim": 8.5}, "1", "got 8.5"),
    ({"encoder": "small_cnn", "embedding_dim": True}, "1", "got True"),
    ({"encoder": "small_cnn", "embedding_dim": "8"}, "1", "got '8'"),
    ({"encoder": "small_cnn", "embedding_dim": 8}, "2", "in_channels must be 1 or 3, got 2"),
    ({"encoder": "small_cnn", "embedding_dim": 8}, "0", "in_channels must be 1 or 3, got 0"),
    ({"encoder": "small_cnn", "embedding_dim": 8, "width": 0}, "1", "width must be a whole number from 4 to 512, got 0"),
    ({"encoder": "small_cnn", "embedding_dim": 8, "width": 10**9}, "1", "got 1000000000"),
    ({"encoder": "small_cnn", "embedding_dim": 8, "width": "48"}, "1", "width must be a whole number from 4 to 512, got '48'"),
    ({"encoder": "small_cnn", "embedding_dim": 8, "width": None}, "1", "got None"),
])
def test_a_config_that_names_no_buildable_encoder_is_refused(tmp_path, config, channels, message):
    from models.checkpoint import validate_checkpoint

    path = _write(tmp_path / "bad.safetensors", _good_state(), config, channels)
    for check in (validate_checkpoint, load_checkpoint):
        with pytest.raises(CheckpointError) as caught:
            check(path, "upload.safetensors")
        assert str(caught.value).startswith("upload.safetensors: ")
        assert message in str(caught.value)


def test_missing_extra_and_misshapen_tensors_are_named(tmp_path):
    from models.checkpoint import validate_checkpoint

    config = {"encoder": "small_cnn", "embedding_dim": 8}
    missing = _good_state()
    del missing["head.net.2.bias"]
    extra = dict(_good_state(), **{"head.net.4.weight": torch.zeros(3)})
    wrong_shape = dict(_good_state(), **{"head.net.2.weight": torch.zeros(9, 128)})
    wrong_dtype = dict(_good_state(), **{"head.net.2.bias": torch.zeros(8, dtype=torch.float16)})
    other_encoder = _good_state("small_cnn", 1, 16)  # a 16-d head where the config says 8
    cases = [
        (missing, "1 tensors are missing (head.net.2.bias)"),
        (extra, "1 tensors are not part of it (head.net.4.weight)"),
        (wrong_shape, "head.net.2.weight is F32 [9, 128], expected F32 [8, 128]"),
        (wrong_dtype, "head.net.2.bias is F16 [8], expected F32 [8]"),
        (other_encoder, "expected F32 [8, 128]"),
    ]
    for i, (tensors, message) in enumerate(cases):
        path = _write(tmp_path / f"case{i}.safetensors", tensors, config)
        for check in (validate_checkpoint, load_checkpoint):
            with pytest.raises(CheckpointError) as caught:
                check(path)
            assert str(caught.value).startswith(f"case{i}.safetensors: the weights do not fit the small_cnn encoder")
            assert message in str(caught.value)


def test_nan_or_infinite_weights_are_counted_and_refused(tmp_path):
    from models.checkpoint import validate_checkpoint

    tensors = _good_state()
    total = sum(v.numel() for v in tensors.values() if v.is_floating_point())
    tensors["head.net.2.weight"][0, :3] = float("nan")
    tensors["features.0.weight"][0, 0, 0, 0] = float("inf")
    path = _write(tmp_path / "nan.safetensors", tensors, {"encoder": "small_cnn", "embedding_dim": 8})
    for check in (validate_checkpoint, load_checkpoint):
        with pytest.raises(CheckpointError, match=rf"^nan.safetensors: 4 of {total} weights are NaN or infinite$"):
            check(path)


_PEAK_RSS_SCRIPT = """
import resource, sys
import torch, models.encoders  # imported before the measurement: only validation is measured
from models.checkpoint import CheckpointError, validate_checkpoint
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    validate_checkpoint(sys.argv[1])
    outcome = "accepted"
except CheckpointError as exc:
    outcome = str(exc)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024)  # ru_maxrss is in KiB on Linux
print(outcome)
"""


def test_a_tiny_file_claiming_a_huge_embedding_is_refused_without_allocating(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    path = _write(tmp_path / "huge.safetensors", {"w": torch.zeros(1)},
                  {"encoder": "small_cnn", "embedding_dim": 6_000_000})
    assert path.stat().st_size < 400  # the whole attack is a few hundred bytes
    # building this encoder would take 128 × 6,000,000 float32 weights: about 3 GB
    result = subprocess.run([sys.executable, "-c", _PEAK_RSS_SCRIPT, str(path)], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert result.returncode == 0, result.stderr
    growth, outcome = result.stdout.strip().splitlines()
    assert outcome.startswith("huge.safetensors: embedding_dim must be a whole number from 2 to 4096")
    assert int(growth) < 100 * 2**20


def test_reading_metadata_does_not_import_torch(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    path = _write(tmp_path / "good.safetensors", _good_state(), {"encoder": "small_cnn", "embedding_dim": 8})
    script = ("import sys\nfrom models.checkpoint import read_metadata\n"
              f"print(read_metadata({str(path)!r})['config']['encoder'], 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["small_cnn", "False"]


def test_a_checkpoint_is_written_through_a_temp_file_named_with_the_pid(tmp_path, monkeypatch):
    import os

    import safetensors.torch

    seen = []
    real_save = safetensors.torch.save_file

    def spying_save(tensors, filename, metadata=None):
        seen.append(os.path.basename(filename))
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", spying_save)
    save_checkpoint(tmp_path / "enc.safetensors", build_encoder("small_cnn", 1, 8), {"encoder": "small_cnn", "embedding_dim": 8}, 1)
    assert seen == [f"enc.safetensors.{os.getpid()}.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["enc.safetensors"]


@pytest.mark.parametrize("name", ["vgg_grid", "vgg_cnn", "grid_cnn", "small_cnn", "resnet18"])
def test_folding_the_batch_norms_keeps_the_embeddings(name):
    """embed's inference copy (batch norms folded into their convolutions) gives the model's own
    eval-mode embeddings, keeps no batch norm, and leaves the model as it was."""
    torch.manual_seed(0)
    model = build_encoder(name, 3, 16)
    model.train()
    model(torch.randn(8, 3, 20, 20))  # running statistics away from their initial 0 and 1
    images = torch.randn(5, 3, 20, 20)
    folded = folded_for_inference(model)
    assert model.training and any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        expected = model.eval()(images)
        assert torch.allclose(folded(images), expected, atol=1e-5)


def test_the_small_cnn_pools_before_its_relu_with_the_same_outputs_and_gradients():
    """Max-pooling and ReLU commute, so pooling first (a quarter of the ReLU's work) keeps what
    a stored encoder computes: the same embeddings and gradients as conv → BN → ReLU → pool."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = build_encoder("small_cnn", 1, 32).train()
    x = torch.randn(16, 1, 28, 28)

    def reference(images):
        out = images
        layers = list(model.features)
        convs = [i for i, layer in enumerate(layers) if isinstance(layer, torch.nn.Conv2d)]
        for n, i in enumerate(convs):
            out = F.relu(layers[i + 1](layers[i](out)))
            if n < len(convs) - 1:
                out = F.max_pool2d(out, 2)
        return model.head(F.adaptive_avg_pool2d(out, 1).flatten(1))

    names = [name for name, _ in model.named_parameters()]
    assert names[:2] == ["features.0.weight", "features.1.weight"]  # stored checkpoints keep their keys
    order = [type(layer).__name__ for layer in model.features][:4]
    assert order == ["Conv2d", "BatchNorm2d", "_HalveIfLarge", "ReLU"]
    ours = model(x)
    grads = torch.autograd.grad(ours.sum(), list(model.parameters()))
    theirs = reference(x)
    expected = torch.autograd.grad(theirs.sum(), list(model.parameters()))
    torch.testing.assert_close(ours, theirs)
    for got, want, name in zip(grads, expected, names):
        torch.testing.assert_close(got, want, msg=name)


def test_the_grid_cnn_keeps_where_a_feature_is_and_its_head_does_not_grow_with_the_image():
    """The grid head sees a 3×3 map: two images whose features differ only in where they are give
    different embeddings (global pooling cannot tell them apart), and any image size gives the
    same head."""
    torch.manual_seed(0)
    grid, pooled = build_encoder("grid_cnn", 1, 16, 8).eval(), build_encoder("small_cnn", 1, 16, 8).eval()
    # features that differ only in where they are: the same map, its rows rolled by one grid cell
    with torch.no_grad():
        features = torch.randn(1, 32, 3, 3)
        moved = features.roll(1, dims=2)
        assert not torch.allclose(grid.head(features.flatten(1)), grid.head(moved.flatten(1)))
        assert torch.allclose(pooled.head(features.mean((2, 3))), pooled.head(moved.mean((2, 3))))
    heads = {tuple(build_encoder("grid_cnn", 1, 16, 8).head.net[0].weight.shape) for _ in range(2)}
    assert heads == {(512, 32 * 9)}
    for size in (8, 28, 100):
        with torch.no_grad():
            assert grid(torch.randn(2, 1, size, size)).shape == (2, 16)


@pytest.mark.parametrize("name", ["vgg_grid", "vgg_cnn", "grid_cnn", "small_cnn", "resnet18"])
def test_a_mirror_averaged_encoder_embeds_an_image_and_its_mirror_alike_in_eval_mode_only(name):
    torch.manual_seed(0)
    model = build_encoder(name, 1, 16, 8, mirror_average=True)
    x = torch.randn(4, 1, 20, 20)
    x[..., :7] += 2  # brighter on the left: noise alone is nearly mirror-symmetric to an untrained VGG stack
    with torch.no_grad():
        model.eval()
        both = model(x)
        torch.testing.assert_close(both, model(x.flip(-1)), atol=1e-5, rtol=0)
        torch.testing.assert_close(both.norm(dim=1), torch.ones(4))
        own, mirrored = model.embed_images(x), model.embed_images(x.flip(-1))
        torch.testing.assert_close(both, torch.nn.functional.normalize(own + mirrored, dim=1), atol=1e-5, rtol=0)
        assert not torch.allclose(own, mirrored, atol=1e-3)  # the encoder alone is not mirror-invariant
        folded = folded_for_inference(model)
        torch.testing.assert_close(folded(x), both, atol=1e-4, rtol=0)  # embed's inference copy keeps it
    model.train()
    out = model(x)  # training sees the image alone (its batch norms see this batch only)
    assert out.shape == (4, 16) and not torch.allclose(out, model(x.flip(-1)), atol=1e-3)


def test_a_checkpoint_embeds_with_the_mirror_average_when_its_run_flipped_and_an_old_one_does_not(tmp_path):
    torch.manual_seed(0)
    model = build_encoder("grid_cnn", 1, 8, 8)
    base = {"encoder": "grid_cnn", "embedding_dim": 8, "width": 8}
    x = torch.randn(3, 1, 28, 28)
    for augment, mirrored in (("flip+erase", True), ("flip", True), ("erase", False), ("none", False), (None, False)):
        config = dict(base, augment=augment) if augment else base  # None: written before the setting
        path = tmp_path / f"{augment}.safetensors"
        save_checkpoint(path, model, config, in_channels=1)
        loaded, _ = load_checkpoint(path)
        assert loaded.mirror_average is mirrored
        with torch.no_grad():
            assert torch.allclose(loaded(x), loaded(x.flip(-1)), atol=1e-5) is mirrored
    bad = tmp_path / "bad.safetensors"
    save_checkpoint(bad, model, dict(base, augment="rotate"), in_channels=1)
    with pytest.raises(CheckpointError, match="bad.safetensors: augment must be one of: none, flip, erase, flip\\+erase; "
                                              "got 'rotate'"):
        load_checkpoint(bad)


def test_a_checkpoint_embeds_under_its_runs_precision_and_an_old_or_unknown_one_under_auto(tmp_path):
    torch.manual_seed(0)
    model = build_encoder("small_cnn", 1, 8, 8)
    base = {"encoder": "small_cnn", "embedding_dim": 8, "width": 8}
    for stored, carried in (("fp32", "fp32"), ("bf16", "bf16"), ("auto", "auto"), (None, "auto"),
                            ("fp16", "auto"), (["bf16"], "auto")):
        config = base if stored is None else dict(base, precision=stored)  # None: before the setting
        path = tmp_path / "encoder.safetensors"
        save_checkpoint(path, model, config, in_channels=1)
        loaded, _ = load_checkpoint(path)
        assert loaded.precision == carried
        assert torch.equal(loaded.state_dict()["head.net.0.weight"], model.state_dict()["head.net.0.weight"])
