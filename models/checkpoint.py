"""Encoder checkpoints in safetensors with the run config in the metadata, and the training state a
resumed run continues from (weights, optimizer state, epoch, step, RNG): tensors in safetensors,
everything else as JSON in its metadata. Nothing is unpickled."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import safe_open

# torch is imported inside the functions that need it, so reading metadata (and catching
# CheckpointError in a page) stays light

FORMAT = "embedding-lab/encoder"
FORMAT_VERSION = "1"
STATE_FORMAT = "embedding-lab/training-state"
STATE_FORMAT_VERSION = "1"


class CheckpointError(Exception):
    """A file that is not an encoder checkpoint this app wrote; the message names it and why."""


def save_checkpoint(path: Path, model, config: dict[str, Any], in_channels: int) -> None:
    """Write atomically: a temporary file, then rename, so the previous checkpoint survives a crash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(config),
        "in_channels": str(in_channels),
    }
    _save_atomic(path, tensors, metadata)


def _save_atomic(path: Path, tensors: dict, metadata: dict[str, str]) -> None:
    """safetensors to a temporary file, flushed to disk, then renamed over `path`: a crash or
    an exception at any point leaves the previous file whole."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_metadata(path: Path, display_name: str | None = None) -> dict[str, Any]:
    """The checkpoint's config and channels; CheckpointError if the file is not ours."""
    name = display_name or Path(path).name
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:  # safetensors raises its own error, OSError, ValueError… by case
        raise CheckpointError(f"{name}: not a safetensors file ({_short(exc)})") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{name}: a safetensors file, but not an encoder checkpoint written by Embedding Lab")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{name}: checkpoint format version {metadata.get('format_version')!r} is not supported")
    try:
        config = json.loads(metadata["config"])
        in_channels = int(metadata["in_channels"])
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{name}: the checkpoint's metadata is damaged ({_short(exc)})") from None
    return {"config": config, "in_channels": in_channels}


def load_checkpoint(path: Path, display_name: str | None = None):
    """(encoder in eval mode, metadata). Raises CheckpointError with the file's name and the reason."""
    from safetensors.torch import load_file

    from models.encoders import build_encoder

    name = display_name or Path(path).name
    meta = read_metadata(path, name)
    config = meta["config"]
    try:
        model = build_encoder(config["encoder"], meta["in_channels"], int(config["embedding_dim"]))
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{name}: the checkpoint's config does not describe an encoder ({_short(exc)})") from None
    state = load_file(str(path))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{name}: the weights do not fit the {config['encoder']} encoder ({_short(exc)})") from None
    return model.eval(), meta


def save_training_state(path: Path, model, optimizer, info: dict[str, Any]) -> None:
    """Everything a resumed run needs, in one file written atomically.

    Tensors: the model's state ("model.NAME"), the optimizer's per-parameter state
    ("optimizer.INDEX.NAME") and the torch CPU RNG ("rng.torch"). Metadata JSON: `info` (epoch,
    step, config, …), the optimizer's param groups and its non-tensor state. One file, so the
    weights and the optimizer state can never come from two different epochs.
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    optimizer_state = optimizer.state_dict()
    plain_state: dict[str, dict[str, Any]] = {}
    for index, values in optimizer_state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                plain_state.setdefault(str(index), {})[name] = value
    tensors["rng.torch"] = torch.get_rng_state()
    metadata = {
        "format": STATE_FORMAT,
        "format_version": STATE_FORMAT_VERSION,
        "info": json.dumps(info),
        "optimizer": json.dumps({"param_groups": optimizer_state["param_groups"], "plain_state": plain_state}),
    }
    _save_atomic(path, tensors, metadata)


def read_training_state_info(path: Path) -> dict[str, Any]:
    """The `info` a training state was saved with (epoch, step, …), without loading tensors or
    torch. CheckpointError when the file is missing or not a training state."""
    metadata = _state_metadata(Path(path))
    try:
        return json.loads(metadata["info"])
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{Path(path).name}: the training state's metadata is damaged ({_short(exc)})") from None


def load_training_state(path: Path, model, optimizer) -> dict[str, Any]:
    """Load weights, optimizer state and the torch RNG saved by `save_training_state` into
    `model` and `optimizer` (built as for the saved run); returns the saved `info`."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    metadata = _state_metadata(path)
    try:
        info = json.loads(metadata["info"])
        saved_optimizer = json.loads(metadata["optimizer"])
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path.name}: the training state's metadata is damaged ({_short(exc)})") from None
    tensors = load_file(str(path))
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in saved_optimizer["plain_state"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [dict(group, betas=tuple(group["betas"])) if "betas" in group else group  # JSON made it a list
              for group in saved_optimizer["param_groups"]]
    try:
        model.load_state_dict(weights, strict=True)
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path.name}: the training state does not fit this run's model ({_short(exc)})") from None
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    return info


def _state_metadata(path: Path) -> dict[str, str]:
    if not path.exists():
        raise CheckpointError(f"{path.name}: there is no training state to resume from")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:
        raise CheckpointError(f"{path.name}: not a safetensors file ({_short(exc)})") from None
    if metadata.get("format") != STATE_FORMAT or metadata.get("format_version") != STATE_FORMAT_VERSION:
        raise CheckpointError(f"{path.name}: not a training state written by this version of Embedding Lab")
    return metadata


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]
