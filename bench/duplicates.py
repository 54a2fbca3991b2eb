"""What finding duplicates costs and finds on Fashion-MNIST's 70,000 images (core.data.duplicates).

Sections (all but `faiss` by default; --sections picks some):

pixels      find_in_pixels at the default threshold: wall and CPU seconds, exact and near groups,
            test images with a training copy, groups whose labels disagree, peak RSS.
exact       the range search (core.data.duplicates.near_pairs) against brute force on a 10,000-image sample,
            at a threshold of 0.1 (at 0.05 a sample holds almost no pair): the same pairs, and both times.
copies      the pixel measure between 5,000 images and their copies: re-encoded as JPEG at quality
            90, 75, 50; moved by one pixel (black edge); both. median, p99, p99.9, max.
thresholds  pairs, images in near groups and the largest group at thresholds 0.03 to 0.1 (one
            search at 0.1, its pairs cut at each).
embeddings  with --embeddings PATH.npy (a run's stored embeddings of Fashion-MNIST): find_in_embeddings
            at thresholds 0.005, 0.01, 0.02: seconds, near groups and their images.
faiss       faiss's exhaustive range search (IndexFlatL2) over the plain descriptors, one set of
            the five: the alternative this module replaces.

    python bench/duplicates.py [--sections pixels,exact] [--embeddings PATH.npy]

Prints one JSON object per line.

Measured on the 2-core dev machine shared with other workers (load average 3.4–9.6), 2026-12-03:
  pixels: 27.0 s wall at load 9.6 (10.0 CPU-s), 9.3–11.7 s in a profile at load 3.5–7.6; 0 exact
    groups, 62 near groups (136 images), 18 test images with a training copy, 0 groups whose labels
    disagree; the search alone 4.9 CPU-s, 93,362 candidates checked in full for 88 pairs
  copies: JPEG 90 median 0.008, max 0.042; 75 median 0.018, p99 0.053, max 0.101; 50 median 0.032,
    p99 0.090; a one-pixel shift 0 (any edge fill)
  thresholds: 0.05: 88 pairs, 62 groups, largest 4; 0.07: 418 pairs, largest 45; 0.1: 7,670 pairs,
    841 groups, largest 1,444
  embeddings (a one-epoch small CNN, P@1 0.858): 3.0 s; 0.005: 16 groups (35 images); 0.01: 234
    (1,134); 0.02: 1,112 (7,979)
  faiss: range search of one set of 70,000 × 256: 66–93 s on one or two threads (11 s at 16 dims)
"""
from __future__ import annotations

import argparse
import io
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.data import duplicates  # noqa: E402
from core.data.datasets import load_builtin  # noqa: E402
from core.data.duplicates.near_pairs import pairs_within  # noqa: E402

SECTIONS = ("pixels", "exact", "copies", "thresholds", "embeddings")
RADIUS = 0.1  # of the exact section


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def timed(call):
    wall, cpu = time.perf_counter(), time.process_time()
    result = call()
    return result, round(time.perf_counter() - wall, 2), round(time.process_time() - cpu, 2)


def pixels_section(pixels, labels, split, classes) -> None:
    finding, wall, cpu = timed(lambda: duplicates.find_in_pixels(pixels))
    found = duplicates.report(finding, 0, "fashion-mnist", [str(i) for i in range(len(pixels))], labels.tolist(),
                              split.tolist(), classes)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    emit(section="pixels", wall_s=wall, cpu_s=cpu, peak_rss_mb=peak,
         **{k: v for k, v in found.summary().items() if k not in ("dataset", "dataset_id", "run_id", "seconds")})


def exact_section(pixels) -> None:
    sample = np.sort(np.random.default_rng(0).choice(len(pixels), 10_000, replace=False))
    sets = list(duplicates.descriptor_sets(np.asarray(pixels[sample])))
    found, wall, _ = timed(lambda: pairs_within(sets[0], RADIUS, sets))

    def brute():
        plain = sets[0]
        pairs = set()
        for moved in sets:
            for start in range(0, len(plain), 2000):
                block = moved[start:start + 2000]
                squared = (block ** 2).sum(1)[:, None] + (plain ** 2).sum(1)[None, :] - 2 * block @ plain.T
                q, i = np.nonzero(squared <= RADIUS ** 2 + 1e-4)
                q = q + start
                d = np.linalg.norm(moved[q] - plain[i], axis=1)
                keep = (d <= RADIUS) & (q != i)
                pairs |= {(min(a, b), max(a, b)) for a, b in zip(q[keep].tolist(), i[keep].tolist())}
        return pairs

    truth, brute_wall, _ = timed(brute)
    emit(section="exact", images=len(sample), pairs=len(found), brute_force_pairs=len(truth),
         same=truth == set(zip(found.a.tolist(), found.b.tolist())), search_s=wall, brute_force_s=brute_wall)


def copies_section(pixels) -> None:
    from PIL import Image

    def jpeg(image, quality):
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0]).save(buffer, "JPEG", quality=quality)
        return np.asarray(Image.open(io.BytesIO(buffer.getvalue())))[..., None]

    sample = np.asarray(pixels[np.random.default_rng(3).choice(len(pixels), 5000, replace=False)])
    moved = np.zeros_like(sample)
    moved[:, :, 1:] = sample[:, :, :-1]
    variants = {"jpeg90": [jpeg(p, 90) for p in sample], "jpeg75": [jpeg(p, 75) for p in sample],
                "jpeg50": [jpeg(p, 50) for p in sample], "shift": moved, "shift+jpeg75": [jpeg(p, 75) for p in moved]}
    sets = list(duplicates.descriptor_sets(sample))
    for name, copies in variants.items():
        copied = list(duplicates.descriptor_sets(np.stack(copies)))
        distance = np.min([np.linalg.norm(a - copied[0], axis=1) for a in sets]
                          + [np.linalg.norm(b - sets[0], axis=1) for b in copied], axis=0)
        emit(section="copies", copy=name, median=round(float(np.median(distance)), 4),
             p99=round(float(np.quantile(distance, 0.99)), 4), p999=round(float(np.quantile(distance, 0.999)), 4),
             max=round(float(distance.max()), 4))


def thresholds_section(pixels) -> None:
    finding = duplicates.find_in_pixels(pixels, 0.1)
    pairs = finding.pairs
    for threshold in (0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1):
        keep = pairs.distance <= threshold
        cut = type(pairs)(pairs.a[keep], pairs.b[keep], pairs.distance[keep])
        groups = duplicates.near_groups(len(pixels), finding.exact, cut)
        emit(section="thresholds", threshold=threshold, pairs=int(keep.sum()), near_groups=len(groups),
             images=int(sum(len(g) for g in groups)), largest=int(max((len(g) for g in groups), default=0)))


def embeddings_section(pixels, path: Path) -> None:
    embeddings = np.load(path)
    for threshold in (0.005, 0.01, 0.02):
        finding, wall, cpu = timed(lambda: duplicates.find_in_embeddings(pixels, embeddings, threshold))
        emit(section="embeddings", threshold=threshold, wall_s=wall, cpu_s=cpu, near_groups=len(finding.near),
             images=int(sum(len(g) for g in finding.near)))


def faiss_section(pixels) -> None:
    import faiss

    plain = next(duplicates.descriptor_sets(pixels))
    index = faiss.IndexFlatL2(plain.shape[1])
    index.add(plain)
    (limits, _, _), wall, cpu = timed(lambda: index.range_search(plain, duplicates.PIXEL_THRESHOLD ** 2))
    emit(section="faiss", rows=len(plain), dims=plain.shape[1], wall_s=wall, cpu_s=cpu,
         pairs=int((limits[-1] - len(plain)) // 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--embeddings", type=Path)
    args = parser.parse_args()
    pixels, labels, split, classes = load_builtin("fashion-mnist")
    for section in args.sections.split(","):
        if section == "embeddings":
            if args.embeddings is not None:
                embeddings_section(pixels, args.embeddings)
        elif section in ("exact", "copies", "thresholds", "faiss"):
            globals()[f"{section}_section"](pixels)
        elif section == "pixels":
            pixels_section(pixels, labels, split, classes)
        else:
            raise SystemExit(f"unknown section {section!r}; choose from {', '.join(SECTIONS + ('faiss',))}")


if __name__ == "__main__":
    main()
