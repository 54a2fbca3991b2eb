"""Decode untrusted image bytes into uint8 arrays, safely and predictably.

Every image the app sees comes from a user (upload, zip, folder), so decoding is the trust
boundary: only an explicit list of formats is opened, the file size and the pixel count are
capped before any pixel is decoded, truncated files are rejected rather than padded with grey,
and every Pillow mode is converted on purpose (16-bit, CMYK, palette with transparency, ...)
instead of relying on whatever ``convert("RGB")`` happens to do.

Arrays are always ``uint8`` of shape (H, W, C) with C = 1 (grayscale) or C = 3 (RGB).
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
import struct
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps

ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP", "BMP", "GIF"}
MAX_FILE_BYTES = 20 * 2**20
MAX_PIXELS = 40_000_000

# Pillow's default; a True here (set by some other library) would make truncated files decode
# silently with grey padding, so we pin it and refuse to decode if someone flips it back.
ImageFile.LOAD_TRUNCATED_IMAGES = False

_NOT_IMAGE = "not a recognised image (allowed: PNG, JPEG, WebP, BMP, GIF)"
_GRAY_HIGH_DEPTH = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}


class ImageRejected(Exception):
    """An input file that cannot be used; ``name`` is the file, ``reason`` says why in words."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


def human_bytes(n: float, trim: bool = False) -> str:
    """``25.0 MB`` style size; ``trim`` drops a trailing ``.0`` (used for limits: ``20 MB``)."""
    for unit, scale in (("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            text = f"{n / scale:.1f}"
            if trim and text.endswith(".0"):
                text = text[:-2]
            return f"{text} {unit}"
    return f"{int(n)} bytes"


def check_named_file(path, limit: int, what: str = "file") -> None:
    """A file a person named on the command line, checked before a byte is read: it must be a
    regular file (not a folder, a device such as /dev/zero, a pipe or a socket, which would be
    read until memory ran out) of at most `limit` bytes. ValueError naming the file and the
    reason; FileNotFoundError for a path that is not there. `what`: the file's kind, for the
    message ("image", "zip", "encoder checkpoint"). A zip is checked so and then read member by
    member from disk (core.data.ingest), never whole."""
    import stat
    from pathlib import Path

    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(info.st_mode):
        raise ValueError(f"{path} is a folder; give one {what} file")
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path} is not a regular file (a device, a pipe or a socket); give one {what} file")
    if info.st_size > limit:
        raise ValueError(f"{path}: the {what} is {human_bytes(info.st_size)}, over the {human_bytes(limit, True)} limit")


def read_named_file(path, limit: int, what: str = "file") -> bytes:
    """The bytes of a file a person named on the command line, checked (check_named_file) before
    a byte is read, and read no further than `limit` bytes."""
    from pathlib import Path

    path = Path(path)
    check_named_file(path, limit, what)
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)  # capped: the file may have grown since stat()
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if len(data) > limit:
        raise ValueError(f"{path}: the {what} grew past the {human_bytes(limit, True)} limit while it was read")
    return data


def size_reason(nbytes: int) -> str | None:
    """The rejection reason for a file of ``nbytes`` bytes, or None when it is within the cap.

    Shared with ingestion so a folder file can be refused from its size before it is read.
    """
    if nbytes > MAX_FILE_BYTES:
        return f"file is {human_bytes(nbytes)}, over the {human_bytes(MAX_FILE_BYTES, True)} limit"
    return None


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Decode one image file. Returns uint8 (H, W, 1) for grayscale or (H, W, 3) for colour.

    Raises ImageRejected with a human reason for anything unusable. Animated images give their
    first frame; EXIF orientation is applied; transparency is composited on white.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set True; refusing to decode")
    reason = size_reason(len(data))
    if reason:
        raise ImageRejected(name, reason)
    # catch_warnings is process-global in Python 3.11, so this filter is only a second line of
    # defence (another thread may reset it); the explicit MAX_PIXELS check below is the real guard.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=sorted(ALLOWED_FORMATS))
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            # Pillow refuses huge headers inside open(), before we see the size: take the pixel
            # count from its message ("Image size (400000000 pixels) exceeds ...").
            found = re.search(r"\((\d+) pixels\)", str(exc))
            raise ImageRejected(name, _bomb_reason(int(found[1]) if found else None)) from None
        except (OSError, SyntaxError, ValueError, EOFError):
            # UnidentifiedImageError (an OSError) for other formats; the rest for broken headers.
            raise ImageRejected(name, _NOT_IMAGE) from None
        with im:
            w, h = im.size
            if w <= 0 or h <= 0:
                raise ImageRejected(name, f"image has no pixels ({w}×{h})")
            if w * h > MAX_PIXELS:
                raise ImageRejected(name, _bomb_reason((w, h)))
            try:
                im.load()  # first frame only, for animated GIF/WebP/PNG
            except (Image.DecompressionBombWarning, Image.DecompressionBombError):
                raise ImageRejected(name, _bomb_reason((w, h))) from None
            except (OSError, SyntaxError, ValueError, EOFError):
                raise ImageRejected(name, "file is truncated or corrupt") from None
            im = _apply_orientation(im)
            return _to_array(im, name)


def _bomb_reason(size: tuple[int, int] | int | None) -> str:
    limit = f"{MAX_PIXELS / 1e6:g} million pixel limit (decompression bomb?)"
    if size is None:
        return f"image is over the {limit}"
    if isinstance(size, int):
        return f"image is {size / 1e6:.0f} million pixels, over the {limit}"
    return f"image is {size[0]}×{size[1]} pixels, over the {limit}"


# Where Pillow's getexif finds an orientation (TIFF, its other source, is not an allowed format).
_ORIENTATION_SOURCES = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")


def _apply_orientation(im: Image.Image) -> Image.Image:
    # A phone photo stored sideways with Orientation=6 must come out upright. Broken EXIF blocks
    # are common in the wild and must not cost the image, so failures keep the stored orientation.
    if not any(key in im.info for key in _ORIENTATION_SOURCES):
        return im  # nothing to read an orientation from (most small images): skip parsing, 1/8 of a decode
    try:
        out = ImageOps.exif_transpose(im)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError, struct.error):
        return im
    return out if out is not None else im


def _to_array(im: Image.Image, name: str) -> np.ndarray:
    """Convert any Pillow mode to (H, W, 1) or (H, W, 3) uint8, deliberately per mode.

    np.array, not np.asarray: Pillow's array interface gives read-only arrays, and callers
    (augmentation, torch.from_numpy) expect to own writable pixels.
    """
    mode = im.mode
    transparent = "transparency" in im.info
    if mode == "1":
        return np.array(im.convert("L"))[..., None]
    if mode == "L" and not transparent:
        return np.array(im)[..., None]
    if mode in ("LA", "La") or (mode == "L" and transparent):
        la = np.asarray(im.convert("LA"))
        return _on_white(la[..., :1], la[..., 1:])
    if mode in _GRAY_HIGH_DEPTH:
        return _scale_to_uint8(np.asarray(im), mode)[..., None]
    if mode in ("P", "PA", "RGBA", "RGBa") or (mode == "RGB" and transparent):
        # Palette transparency (tRNS / GIF transparent index) is only honoured via RGBA;
        # converting P straight to RGB would paint transparent pixels with the palette colour.
        if mode == "P" and not transparent:
            return np.array(im.convert("RGB"))
        rgba = np.asarray(im.convert("RGBA"))
        return _on_white(rgba[..., :3], rgba[..., 3:])
    if mode in ("RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        # Pillow's CMYK JPEG reader already undoes Adobe's inverted storage.
        return np.array(im.convert("RGB"))
    try:
        return np.array(im.convert("RGB"))
    except (ValueError, OSError):
        raise ImageRejected(name, f"unsupported image mode {mode}") from None


def _on_white(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Composite (H, W, C) over a white background with (H, W, 1) alpha; returns uint8."""
    c = color.astype(np.uint16)
    a = alpha.astype(np.uint16)
    return ((c * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def _scale_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Map a 16-bit, 32-bit int or float image to uint8 by its range, never by clipping.

    16-bit modes use the full 0..65535 range (so a dark 16-bit photo stays dark). ``I`` and ``F``
    carry no declared range: values already in 0..255 (or 0..1 for float) keep their meaning,
    values in 0..65535 are treated as 16-bit, anything else is stretched min..max.
    """
    a = arr.astype(np.float64)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode.startswith("I;16"):
        scale_lo, scale_hi = 0.0, 65535.0
    elif mode == "F" and lo >= 0 and hi <= 1:
        scale_lo, scale_hi = 0.0, 1.0
    elif lo >= 0 and hi <= 255:
        scale_lo, scale_hi = 0.0, 255.0
    elif lo >= 0 and hi <= 65535:
        scale_lo, scale_hi = 0.0, 65535.0
    else:
        scale_lo, scale_hi = lo, hi
    if not np.isfinite(scale_hi - scale_lo) or scale_hi <= scale_lo:
        return np.zeros(arr.shape, np.uint8)
    a = np.nan_to_num(a, nan=scale_lo, posinf=scale_hi, neginf=scale_lo)
    out = (a - scale_lo) * (255.0 / (scale_hi - scale_lo))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _check_pixels(pixels: np.ndarray) -> np.ndarray:
    """Accept (H, W), (H, W, 1) or (H, W, 3) uint8; return it as (H, W, C)."""
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8:
        raise TypeError("pixels must be a uint8 numpy array")
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 3) or 0 in pixels.shape:
        raise ValueError(f"pixels must be (H, W, 1) or (H, W, 3), got {pixels.shape}")
    return pixels


def _to_pil(pixels: np.ndarray) -> Image.Image:
    pixels = np.ascontiguousarray(_check_pixels(pixels))
    if pixels.shape[2] == 1:
        return Image.fromarray(pixels[..., 0], mode="L")
    return Image.fromarray(pixels, mode="RGB")


def fit_square(pixels: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to ``size`` and center-crop: (H, W, C) -> (size, size, C)."""
    if size < 1:
        raise ValueError("size must be positive")
    pixels = _check_pixels(pixels)
    channels = pixels.shape[2]
    if pixels.shape[0] == pixels.shape[1] == size:
        return np.array(pixels, order="C")  # already fitted: the resize would only copy it
    im = _to_pil(pixels)
    w, h = im.size
    side = min(w, h)
    # Cropping and scaling in one resize(box=...) call: the crop box is in source pixels (it may
    # be fractional), so the result equals resize-then-crop without materialising the big image.
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    out = im.resize((size, size), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
    return np.array(out).reshape(size, size, channels)  # writable, see _to_array


def to_png_bytes(pixels: np.ndarray) -> bytes:
    """Encode (H, W, 1) / (H, W, 3) uint8 as PNG bytes (thumbnails, artifact files)."""
    buf = io.BytesIO()
    _to_pil(pixels).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def png_data_url(pixels: np.ndarray) -> str:
    """``data:image/png;base64,...`` for a thumbnail (a Vega tooltip ``image`` field shows it)."""
    return "data:image/png;base64," + base64.b64encode(to_png_bytes(pixels)).decode("ascii")


def content_hash(pixels: np.ndarray) -> str:
    """sha256 hex of the decoded pixels and their shape: the same picture saved as PNG and BMP
    hashes the same, while equal bytes in a different shape do not."""
    return content_digest(pixels).hex()


def content_digest(pixels: np.ndarray) -> bytes:
    """content_hash's 32 bytes (an import keeps them in a fixed-width file, not as text)."""
    pixels = np.ascontiguousarray(pixels)
    h = hashlib.sha256(f"{pixels.dtype.str}{pixels.shape}".encode())
    h.update(pixels.data)
    return h.digest()
