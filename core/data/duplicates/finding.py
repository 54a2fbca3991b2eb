"""What was found, as positions and distances before names and labels: exact groups by pixel
hash, near pairs within a threshold (core.data.duplicates.near_pairs) joined into groups."""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from core.data.duplicates.near_pairs import NearPairs, pairs_within
from core.data.duplicates.pixels import exact_groups, pixel_distance, descriptor_sets, representatives

PIXEL_THRESHOLD = 0.05
EMBEDDING_THRESHOLD = 0.01


def check_threshold(value) -> float:
    """The threshold as a float; ValueError with a sentence unless it is a number above 0 and at most 2
    (both measures are distances between unit vectors, which are at most 2 apart)."""
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or not 0 < number <= 2:
        raise ValueError(f"the threshold must be a positive number at most 2 (a distance between unit vectors, "
                         f"e.g. {PIXEL_THRESHOLD}), got {value!r}")
    return number



@dataclass(frozen=True)
class Finding:
    """Duplicates as positions and distances only (labels and splits are read when reported, so a
    stored finding stays true when a dataset version relabels images).

    exact: positions per exact group (sorted). near: positions per near group (sorted: the first
    member is the lowest position), with each member's distance to the first (`distance`) and to
    its nearest other member (`link`: at most the threshold, unless it is an exact copy of a member,
    when it is 0). pairs: the pairs of distinct pictures within the threshold (positions of their
    exact groups' first members), which leakage is counted from."""

    measure: str
    threshold: float
    n_images: int
    exact: list[np.ndarray]
    near: list[np.ndarray]
    distance: list[np.ndarray]
    link: list[np.ndarray]
    pairs: NearPairs
    seconds: float


def near_groups(n: int, exact: Sequence[np.ndarray], pairs: NearPairs) -> list[np.ndarray]:
    """The connected components of the pairs (over representatives) with their exact copies added:
    sorted positions per group, groups in order of their first position. A union-find with path
    halving; pairs (a, b) are positions."""
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(pairs.a.tolist(), pairs.b.tolist()):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    copies = {int(group[0]): group for group in exact}
    groups: dict[int, list[int]] = {}
    for member in parent:
        groups.setdefault(root(member), []).append(member)
    out = []
    for members in groups.values():
        positions = np.concatenate([copies.get(m, np.array([m], dtype=np.int64)) for m in members])
        out.append(np.sort(positions))
    return sorted(out, key=lambda g: int(g[0]))


def find_in_pixels(pixels: np.ndarray, threshold: float = PIXEL_THRESHOLD) -> Finding:
    """Exact and near copies by the pixel measure. Shape: (N, H, W, C) uint8 in (a memory map is fine)."""
    started = time.perf_counter()
    threshold = check_threshold(threshold)
    exact = exact_groups(pixels)
    owner = representatives(len(pixels), exact)
    reps = np.flatnonzero(owner == np.arange(len(pixels)))
    rep_pixels = np.asarray(pixels[reps]) if len(reps) < len(pixels) else pixels
    sets = descriptor_sets(rep_pixels)
    plain = next(sets)
    found = pairs_within(plain, threshold, itertools.chain([plain], sets))
    del plain
    pairs = NearPairs(reps[found.a], reps[found.b], found.distance)
    groups = near_groups(len(pixels), exact, pairs)

    def measure(first: int, members: np.ndarray) -> np.ndarray:
        return pixel_distance(pixels[first], np.asarray(pixels[members]))

    return _finding("pixels", threshold, len(pixels), exact, groups, pairs, owner, measure,
                    time.perf_counter() - started)


def find_in_embeddings(pixels: np.ndarray, embeddings: np.ndarray, threshold: float = EMBEDDING_THRESHOLD) -> Finding:
    """Exact copies by their pixels, near copies by the euclidean distance between L2-normalised
    embeddings (N, d); a row of NaN or infinity has no near copy."""
    started = time.perf_counter()
    threshold = check_threshold(threshold)
    if len(embeddings) != len(pixels):
        raise ValueError(f"the run has {len(embeddings)} embeddings but its dataset has {len(pixels)} images")
    vectors = np.asarray(embeddings, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = (vectors / np.where(norms > 0, norms, 1.0)).astype(np.float32)
    exact = exact_groups(pixels)
    owner = representatives(len(pixels), exact)
    reps = np.flatnonzero(owner == np.arange(len(pixels)))
    found = pairs_within(unit[reps], threshold)
    pairs = NearPairs(reps[found.a], reps[found.b], found.distance)
    groups = near_groups(len(pixels), exact, pairs)

    def measure(first: int, members: np.ndarray) -> np.ndarray:
        return np.linalg.norm(unit[members] - unit[first], axis=1)

    return _finding("embeddings", threshold, len(pixels), exact, groups, pairs, owner, measure,
                    time.perf_counter() - started)


def _finding(measure_name, threshold, n, exact, groups, pairs, owner, measure, seconds) -> Finding:
    """Each near group's distances: to its first member (measured) and to its nearest other
    member (from the pairs, 0 for an exact copy of another member)."""
    nearest: dict[int, float] = {}
    for a, b, d in zip(pairs.a.tolist(), pairs.b.tolist(), pairs.distance.tolist()):
        nearest[a] = min(nearest.get(a, math.inf), d)
        nearest[b] = min(nearest.get(b, math.inf), d)
    copies = {int(group[0]): len(group) for group in exact}
    distance, link = [], []
    for group in groups:
        distance.append(np.asarray(measure(int(group[0]), group), dtype=np.float32))
        link.append(np.array([0.0 if copies.get(int(owner[m]), 1) > 1 else nearest.get(int(owner[m]), math.inf)
                              for m in group], dtype=np.float32))
    return Finding(measure_name, threshold, n, exact, groups, distance, link, pairs, seconds)
