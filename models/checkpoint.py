"""Encoder checkpoints in safetensors with the run config in the metadata, and the training state a
resumed run continues from (weights, optimizer state, epoch, step, RNG): tensors in safetensors,
everything else as JSON in its metadata. Nothing is unpickled."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from safetensors import safe_open

from models.widths import (DEFAULT_WIDTHS, augment_problem, mirror_averaged, stored_augment, stored_precision,
                           stored_width, width_problem)

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

    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # the pid lets clean_leftovers spot a dead writer's
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


KNOWN_ENCODERS = tuple(DEFAULT_WIDTHS)  # what models.encoders.build_encoder builds
EMBEDDING_DIM_RANGE = (2, 4096)
# torch dtype name → the dtype string safetensors writes in its header
_SAFETENSORS_DTYPES = {
    "float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}


def validate_checkpoint(path: Path, display_name: str | None = None) -> dict[str, Any]:
    """read_metadata's dict, once the file is known to hold exactly the weights its config implies.

    Checked in order, each before anything is allocated for the next: the format and version;
    the config's encoder, embedding_dim (an int from 2 to 4096) and in_channels (1 or 3); the
    tensor names, shapes and dtypes in the safetensors header against the encoder built on torch's
    "meta" device (no memory); only then the tensors are read and refused if any value is NaN or
    infinite. Raises CheckpointError whose message starts with the file's display name.
    """
    meta, _ = _validated(Path(path), display_name or Path(path).name)
    return meta


def _validated(path: Path, name: str):
    """(metadata, the loaded tensors) of a checkpoint that passed every check of validate_checkpoint."""
    meta = read_metadata(path, name)
    config, in_channels = meta["config"], meta["in_channels"]
    if not isinstance(config, dict):
        raise CheckpointError(f"{name}: the checkpoint's config is not a JSON object")
    encoder = config.get("encoder")
    if encoder not in KNOWN_ENCODERS:
        raise CheckpointError(
            f"{name}: unknown encoder {encoder!r} in the checkpoint's config; this app builds {', '.join(KNOWN_ENCODERS)}")
    dim = config.get("embedding_dim")
    low, high = EMBEDDING_DIM_RANGE
    if isinstance(dim, bool) or not isinstance(dim, int) or not low <= dim <= high:
        raise CheckpointError(f"{name}: embedding_dim must be a whole number from {low} to {high}, got {dim!r}")
    if in_channels not in (1, 3):
        raise CheckpointError(f"{name}: in_channels must be 1 or 3, got {in_channels}")
    width = stored_width(config)
    problem = width_problem(width) or augment_problem(stored_augment(config))
    if problem:
        raise CheckpointError(f"{name}: {problem}")

    import torch

    from models.encoders import build_encoder

    with torch.device("meta"):  # shapes and dtypes only: no memory is allocated for the weights
        skeleton = build_encoder(encoder, in_channels, dim, width)
    expected = {key: (tuple(value.shape), _SAFETENSORS_DTYPES.get(str(value.dtype).removeprefix("torch."), str(value.dtype)))
                for key, value in skeleton.state_dict().items()}
    try:
        with safe_open(str(path), framework="numpy") as handle:  # reads the header only
            found = {key: (tuple(handle.get_slice(key).get_shape()), handle.get_slice(key).get_dtype())
                     for key in handle.keys()}
    except Exception as exc:
        raise CheckpointError(f"{name}: the tensor header cannot be read ({_short(exc)})") from None
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing:
        raise CheckpointError(
            f"{name}: the weights do not fit the {encoder} encoder: {len(missing)} tensors are missing ({_listed(missing)})")
    if extra:
        raise CheckpointError(
            f"{name}: the weights do not fit the {encoder} encoder: {len(extra)} tensors are not part of it ({_listed(extra)})")
    for key, (shape, dtype) in expected.items():
        if found[key] != (shape, dtype):
            raise CheckpointError(
                f"{name}: the weights do not fit the {encoder} encoder: {key} is {_describe(*found[key])}, "
                f"expected {_describe(shape, dtype)}")

    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"{name}: the weights cannot be read ({_short(exc)})") from None
    bad = total = 0
    for value in tensors.values():
        if value.is_floating_point():
            total += value.numel()
            bad += int((~torch.isfinite(value)).sum())
    if bad:
        raise CheckpointError(f"{name}: {bad} of {total} weights are NaN or infinite")
    return meta, tensors


def _listed(keys: list[str], most: int = 3) -> str:
    return ", ".join(keys[:most]) + (f" and {len(keys) - most} more" if len(keys) > most else "")


def _describe(shape: tuple, dtype: str) -> str:
    return f"{dtype} {list(shape)}"


def load_checkpoint(path: Path, display_name: str | None = None):
    """(encoder in eval mode, metadata). Validates the file first (validate_checkpoint), so a
    checkpoint that does not fit is refused before any memory is spent on it."""
    from models.encoders import build_encoder

    name = display_name or Path(path).name
    meta, state = _validated(Path(path), name)
    config = meta["config"]
    model = build_encoder(config["encoder"], meta["in_channels"], config["embedding_dim"], stored_width(config),
                          mirror_averaged(stored_augment(config)), stored_precision(config))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # validated above; kept so a surprise still reads as one sentence
        raise CheckpointError(f"{name}: the weights do not fit the {config['encoder']} encoder ({_short(exc)})") from None
    return model.eval(), meta


def save_training_state(path: Path, model, optimizer, info: dict[str, Any],
                        extra: Optional[dict[str, Any]] = None) -> None:
    """Everything a resumed run needs, in one file written atomically.

    Tensors: the model's state ("model.NAME"), the optimizer's per-parameter state
    ("optimizer.INDEX.NAME"), the torch CPU RNG ("rng.torch") and the caller's `extra` tensors
    ("extra.NAME": a cross-batch memory). Metadata JSON: `info` (epoch,
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
    tensors.update({f"extra.{k}": v.detach().to("cpu").contiguous() for k, v in (extra or {}).items()})
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


def load_training_state(path: Path, model, optimizer, extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Load weights, optimizer state and the torch RNG saved by `save_training_state` into
    `model` and `optimizer` (built as for the saved run); returns the saved `info`. `extra`, a
    dict, receives the saved extra tensors by name."""
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
    _match_parameter_layouts(optimizer)
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    if extra is not None:
        extra.update({k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")})
    return info


def _match_parameter_layouts(optimizer) -> None:
    """Give each per-parameter state tensor (Adam's moments) its parameter's memory layout.

    The file holds them contiguous; the encoder's weights are channels-last. A fused optimizer
    steps over the raw memory of a parameter, its gradient and its moments together, so a moment
    in another layout is paired with the wrong weights: a resumed run trained differently from
    the uninterrupted one (5% apart in loss after one epoch) until this was done."""
    import torch

    for group in optimizer.param_groups:
        for param in group["params"]:
            values = optimizer.state.get(param, {})
            for name, value in values.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                    values[name] = torch.empty_like(param, dtype=value.dtype).copy_(value)


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
