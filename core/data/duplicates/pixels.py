"""The pixel side of duplicate finding: a hash of each stored image for exact copies, and the
descriptor that near copies are compared by (see the package's docstring for its design and the
measurements behind it)."""
from __future__ import annotations

import hashlib
from typing import Iterator, Sequence

import numpy as np

DESCRIPTOR_SIDE = 16  # the grid the grey image is sampled on: a 256-number descriptor
DESCRIPTOR_SIGMA = 0.5  # the sampling Gaussian's σ, in grid cells
SHIFT = 1  # pixels a copy may be moved by and still match exactly
# one image's window offsets (dy, dx); the other image's mirror offsets are compared the other way round
OFFSETS = ((0, 0), (0, 1), (1, -1), (1, 0), (1, 1))
DESCRIPTOR_VERSION = 1  # part of a stored finding's name: a finding of another descriptor is not reused
_CHUNK = 8192  # images described at a time


# ---------------------------------------------------------------- exact copies


def pixel_hashes(pixels: np.ndarray) -> list[bytes]:
    """A 16-byte BLAKE2b digest of each image's stored pixel array (its bytes and shape). Shape: (N, H, W, C) in."""
    shape = f"{pixels.shape[1:]}".encode()
    return [hashlib.blake2b(shape + np.ascontiguousarray(image).tobytes(), digest_size=16).digest() for image in pixels]


def exact_groups(pixels: np.ndarray) -> list[np.ndarray]:
    """Positions of the images whose pixels are identical, one sorted array per group of two or
    more, groups in order of their first position. 70,000 Fashion-MNIST images: 0.2 s."""
    first: dict[bytes, int] = {}
    members: dict[int, list[int]] = {}
    for position, digest in enumerate(pixel_hashes(pixels)):
        seen = first.setdefault(digest, position)
        if seen != position:
            members.setdefault(seen, [seen]).append(position)
    return [np.array(members[key], dtype=np.int64) for key in sorted(members)]


def representatives(n: int, groups: Sequence[np.ndarray]) -> np.ndarray:
    """Each image's representative: the first member of its exact group, else itself. Shape (n,)."""
    owner = np.arange(n, dtype=np.int64)
    for group in groups:
        owner[group] = group[0]
    return owner


# ---------------------------------------------------------------- the pixel descriptor


def _sampling(side: int, offset: int) -> np.ndarray:
    """(DESCRIPTOR_SIDE, side): Gaussian weights that sample a window of the image, less SHIFT
    pixels on each side, moved by `offset` pixels; each row sums to 1."""
    window = side - 2 * SHIFT
    cell = window / DESCRIPTOR_SIDE
    low = SHIFT + offset
    centres = low + (np.arange(DESCRIPTOR_SIDE) + 0.5) * cell - 0.5
    columns = np.arange(low, low + window)
    weights = np.exp(-((columns[None, :] - centres[:, None]) ** 2) / (2 * (DESCRIPTOR_SIGMA * cell) ** 2))
    sampling = np.zeros((DESCRIPTOR_SIDE, side), dtype=np.float32)
    sampling[:, low:low + window] = weights / weights.sum(axis=1, keepdims=True)
    return sampling


def pixel_descriptors(pixels: np.ndarray, offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """(N, 256) float32 rows of unit length (or zero for a flat image): the images' descriptors
    with the window moved by `offset` = (dy, dx) pixels, each from -SHIFT to SHIFT.
    Shape: (N, H, W, C) uint8 in, H and W at least 3."""
    return next(descriptor_sets(pixels, [offset]))


def descriptor_sets(pixels: np.ndarray, offsets: Sequence[tuple[int, int]] = OFFSETS) -> Iterator[np.ndarray]:
    """pixel_descriptors for each offset in turn, each computed when it is asked for (five sets of
    70,000 would hold 360 MB at once)."""
    if pixels.ndim != 4:
        raise ValueError(f"expected (N, H, W, C) images, got shape {pixels.shape}")
    height, width = pixels.shape[1:3]
    if min(height, width) < 2 * SHIFT + 1:
        raise ValueError(f"images must be at least {2 * SHIFT + 1} pixels on a side to describe, got {height}×{width}")
    for dy, dx in offsets:
        rows, columns = _sampling(height, dy), _sampling(width, dx).T
        out = np.empty((len(pixels), DESCRIPTOR_SIDE * DESCRIPTOR_SIDE), dtype=np.float32)
        for start in range(0, len(pixels), _CHUNK):
            grey = np.asarray(pixels[start:start + _CHUNK], dtype=np.float32).mean(axis=3)
            n = len(grey)
            # two plain matrix products (not n small ones): columns first, then rows
            across = (grey.reshape(n * height, width) @ columns).reshape(n, height, DESCRIPTOR_SIDE)
            out[start:start + n] = (rows @ across).reshape(n, -1) if n < 64 else np.ascontiguousarray(
                (across.transpose(0, 2, 1).reshape(n * DESCRIPTOR_SIDE, height) @ rows.T)
                .reshape(n, DESCRIPTOR_SIDE, DESCRIPTOR_SIDE).transpose(0, 2, 1)).reshape(n, -1)
        out -= out.mean(axis=1, keepdims=True)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        flat = norms[:, 0] <= 1e-6 * DESCRIPTOR_SIDE
        np.divide(out, norms, out=out, where=~flat[:, None])
        out[flat] = 0.0
        yield out


def pixel_distance(first: np.ndarray, others: np.ndarray) -> np.ndarray:
    """The pixel measure between one image (H, W, C) and each of `others` (M, H, W, C): shape (M,)."""
    first = np.asarray(first)[None]
    best = np.full(len(others), np.inf, dtype=np.float32)
    plain_first, plain_others = pixel_descriptors(first)[0], pixel_descriptors(others)
    for offset in OFFSETS:
        moved_first, moved_others = pixel_descriptors(first, offset)[0], pixel_descriptors(others, offset)
        best = np.minimum(best, np.linalg.norm(moved_first - plain_others, axis=1))
        best = np.minimum(best, np.linalg.norm(moved_others - plain_first, axis=1))
    return best
