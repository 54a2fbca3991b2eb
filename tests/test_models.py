import json

import pytest
import torch
from safetensors.torch import save_file

from models.checkpoint import CheckpointError, load_checkpoint, read_metadata, save_checkpoint
from models.encoders import build_encoder, to_input


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
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
    config = {"encoder": "small_cnn", "embedding_dim": 8, "loss": "triplet"}
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
    save_checkpoint(path, model, {"encoder": "small_cnn", "embedding_dim": 8}, 1)
    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, build_encoder("small_cnn", 1, 8), {"encoder": "small_cnn", "embedding_dim": 8}, 1)
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
