"""Encoder checkpoints in safetensors with the run config in the metadata. Nothing is unpickled."""
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


class CheckpointError(Exception):
    """A file that is not an encoder checkpoint this app wrote; the message names it and why."""


def save_checkpoint(path: Path, model, config: dict[str, Any], in_channels: int) -> None:
    """Write atomically: a temporary file, then rename, so the previous checkpoint survives a crash."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(config),
        "in_channels": str(in_channels),
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


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


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]
