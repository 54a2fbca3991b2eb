"""Duplicate images and train/test leakage: exact copies, near copies, and what they do to a split.

Three questions about a dataset, asked of its pixels (or, with a run, of its embeddings):

- **Exact copies**: images whose decoded pixel arrays are identical (a hash of each stored array).
  An import stores an identical file once (the images table's sha256 is the hash of the decoded
  picture before it is shrunk, core.data.images.content_hash), but two different files can shrink
  to the same stored pixels, and the built-in datasets keep every image they ship as its own row
  (their sha256 column holds a checksum with the position appended), so copies can be stored.
- **Near copies**: pairs closer than a threshold, joined into groups (connected components: a
  union-find over the pairs). Without a run, the distance is between pixel descriptors that
  ignore a one-pixel shift and survive JPEG re-encoding (below); with a run, it is the euclidean
  distance between the run's L2-normalised embeddings.
- **Leakage**: test images with a copy (exact, or near within the threshold) in the training
  split; retrieval metrics computed on them are inflated. And groups whose members disagree on
  their label (one of them is probably mislabelled).

**The pixel descriptor.** The image in grey, sampled on a 16 × 16 grid with a Gaussian of σ = half
a grid cell, over the image less a one-pixel border; then mean-centred and L2-normalised, so a
brighter or higher-contrast copy matches too (an image of one flat colour has no direction and
describes as zero: flat images all match each other). The distance between two images is the
smallest euclidean distance between one's descriptor and the other's taken over a window moved
by up to one pixel in each direction (9 offsets; one image's 5 offsets against the other's plain
descriptor, both ways round). A copy shifted by one pixel, whatever fills the new edge, is then at
distance 0, because the window moved with it.

Measured on Fashion-MNIST's 70,000 images (28 × 28): a copy re-encoded as JPEG lies at median
0.008 (quality 90), 0.018 (75), 0.032 (50); at most 0.042 at quality 90, and 99% of copies at quality
75 lie within 0.053 (5,000 images each). Pairs of distinct images in the dataset: 88 pairs within 0.05
(mostly the same garment photographed twice, and near-identical plain trousers), 418 within 0.07
and 7,670 within 0.1, where plain trousers and shirts of the same cut chain into groups of
hundreds. So the default threshold is PIXEL_THRESHOLD = 0.05: every shifted copy, every JPEG at
quality 90 and most at 75, few look-alikes. Finer grids were less discriminating per unit of JPEG
noise (28 × 28: 1% of images have a different image within 0.11 while JPEG at 75 reaches 0.12),
coarser ones confuse distinct garments (8 × 8: 1% within 0.027).

**By a run's embeddings** the encoder decides what is near. On a one-epoch small CNN of
Fashion-MNIST (Precision@1 0.858), a JPEG copy at quality 75 moved median 0.036 and a one-pixel
shift 0.12, while half the images have another within 0.040: such an encoder does not see copies
as closer than look-alikes, so the embedding threshold finds what it cannot tell apart. The
default EMBEDDING_THRESHOLD = 0.01 gave 234 groups (1,134 images) there; 0.005 gave 16, 0.02 gave 1,112.

Cost on the 2-core dev machine (load average 4.6, bench/duplicates.py): Fashion-MNIST's 70,000
images by pixels 7.1 s (6.8 CPU-s: descriptors, the exact range search of core.data.near_pairs,
the groups); by 128-dimensional embeddings 3.4–3.9 CPU-s.
"""
from __future__ import annotations

import hashlib
import itertools
import math
import time
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np

from core.data.near_pairs import NearPairs, pairs_within

DESCRIPTOR_SIDE = 16  # the grid the grey image is sampled on: a 256-number descriptor
DESCRIPTOR_SIGMA = 0.5  # the sampling Gaussian's σ, in grid cells
SHIFT = 1  # pixels a copy may be moved by and still match exactly
# one image's window offsets (dy, dx); the other image's mirror offsets are compared the other way round
OFFSETS = ((0, 0), (0, 1), (1, -1), (1, 0), (1, 1))
DESCRIPTOR_VERSION = 1  # part of a stored finding's name: a finding of another descriptor is not reused
PIXEL_THRESHOLD = 0.05
EMBEDDING_THRESHOLD = 0.01
_CHUNK = 8192  # images described at a time


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


# ---------------------------------------------------------------- what was found, before names and labels


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


# ---------------------------------------------------------------- the report: names, labels, splits, leakage


@dataclass(frozen=True)
class Member:
    """One image of a group: its position in the dataset, file name, label name (None when
    unlabeled), split, distance to the group's first member, and distance to its nearest other member."""

    position: int
    name: str
    label: Optional[str]
    split: str
    distance: float
    link: float


@dataclass(frozen=True)
class Group:
    """Exact copies (kind "exact", every distance 0) or near copies (kind "near") of one picture."""

    kind: str
    members: tuple[Member, ...]

    @property
    def positions(self) -> list[int]:
        return [member.position for member in self.members]

    @property
    def labels_disagree(self) -> bool:
        """Whether two members carry different labels (unlabeled members are left out)."""
        return len({member.label for member in self.members if member.label is not None}) > 1

    @property
    def spans_splits(self) -> bool:
        """Whether the group has members in both the training and the test split."""
        return {"train", "test"} <= {member.split for member in self.members}


@dataclass(frozen=True)
class DuplicateReport:
    """What `python -m core duplicates` prints and the Data page shows.

    leaked_test: positions of the test images within the threshold of a training image (an exact
    copy, or a near copy by the measure); retrieval metrics counted on them are inflated."""

    dataset_id: int
    dataset: str
    run_id: Optional[int]
    measure: str  # "pixels" or "embeddings"
    threshold: float
    n_images: int
    exact: tuple[Group, ...]
    near: tuple[Group, ...]
    leaked_test: tuple[int, ...]
    seconds: float  # what finding them took (when it was computed, not when it was read back)

    @property
    def label_disagreements(self) -> tuple[Group, ...]:
        return tuple(group for group in self.exact + self.near if group.labels_disagree)

    def summary(self) -> dict:
        return {
            "dataset": self.dataset, "dataset_id": self.dataset_id, "run_id": self.run_id, "measure": self.measure,
            "threshold": self.threshold, "images": self.n_images,
            "exact_groups": len(self.exact), "exact_images": sum(len(g.members) for g in self.exact),
            "near_groups": len(self.near), "near_images": sum(len(g.members) for g in self.near),
            "test_images_with_training_copy": len(self.leaked_test),
            "label_disagreeing_groups": len(self.label_disagreements),
            "seconds": round(self.seconds, 3),
        }

    def to_dict(self) -> dict:
        """The summary, the groups and the leaked test positions, as JSON-ready values."""
        def group(g: Group) -> dict:
            return {"kind": g.kind, "labels_disagree": g.labels_disagree, "spans_splits": g.spans_splits,
                    "members": [{"position": m.position, "name": m.name, "label": m.label, "split": m.split,
                                 "distance": round(m.distance, 6), "link": round(m.link, 6)} for m in g.members]}

        return {**self.summary(), "exact": [group(g) for g in self.exact], "near": [group(g) for g in self.near],
                "leaked_test": list(self.leaked_test)}


def leaked_test(finding: Finding, split: np.ndarray) -> np.ndarray:
    """Positions of test images with a training image within the threshold. split: (N,) "train"/"test"."""
    n = finding.n_images
    owner = representatives(n, finding.exact)
    train = split == "train"
    copies_train = np.zeros(n, dtype=bool)  # per representative: its exact copies include a training image
    np.logical_or.at(copies_train, owner, train)
    partner_train = np.zeros(n, dtype=bool)  # per representative: a near copy's copies do
    a, b = finding.pairs.a, finding.pairs.b
    partner_train[a[copies_train[b]]] = True
    partner_train[b[copies_train[a]]] = True
    return np.flatnonzero((split == "test") & (copies_train[owner] | partner_train[owner]))


def report(finding: Finding, dataset_id: int, dataset: str, names: Sequence[str], labels: Sequence[Optional[int]],
           split: Sequence[str], classes: Sequence[str], run_id: Optional[int] = None) -> DuplicateReport:
    """The finding with each member's name, label name and split (the image table's, by position)."""
    if not len(names) == len(labels) == len(split) == finding.n_images:
        raise ValueError(f"the finding covers {finding.n_images} images but the dataset has {len(names)}")
    split = np.asarray(split)

    def member(position: int, distance: float, link: float) -> Member:
        label = labels[position]
        return Member(position, names[position], None if label is None else str(classes[label]), str(split[position]),
                      float(distance), float(link))

    exact = tuple(Group("exact", tuple(member(int(p), 0.0, 0.0) for p in group)) for group in finding.exact)
    near = tuple(Group("near", tuple(member(int(p), d, l) for p, d, l in zip(group, distance, link)))
                 for group, distance, link in zip(finding.near, finding.distance, finding.link))
    return DuplicateReport(dataset_id, dataset, run_id, finding.measure, finding.threshold, finding.n_images,
                           exact, near, tuple(int(p) for p in leaked_test(finding, split)), finding.seconds)


EXCLUSIONS = {
    "copies": "every member of each group but its first (the lowest position): one image of each picture is kept",
    "leaks": "the test images with a copy in the training split",
}


def positions_to_exclude(found: DuplicateReport, what: str = "copies") -> list[int]:
    """The image positions an "Exclude duplicates" edit would remove (sorted): see EXCLUSIONS.
    A near group contains its exact copies, so "copies" reads the groups that overlap as one."""
    if what not in EXCLUSIONS:
        raise ValueError(f"unknown exclusion {what!r}; choose one of: {', '.join(EXCLUSIONS)}")
    if what == "leaks":
        return sorted(found.leaked_test)
    in_near = {p for group in found.near for p in group.positions}
    keep_first = [group.positions for group in found.near]
    keep_first += [group.positions for group in found.exact if group.positions[0] not in in_near]
    return sorted(p for positions in keep_first for p in positions[1:])
