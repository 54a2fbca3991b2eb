"""A million images on one machine, phase by phase: time, peak memory and quality of each.

    python bench/scale.py [--sizes 100000,1000000] [--phases import,train,embed,statistics,map,search,export]
                          [--workdir DIR] [--source folder|zip] [--keep]

For each size N it writes N synthetic 28×28 grayscale PNGs in ten class folders (or a zip of them:
--source zip; a zip holds at most core.data.ingest.MAX_MEMBERS files) under --workdir (default: a new
folder in /tmp, removed at the end unless --keep), each class a sinusoid of its own frequency and
angle plus per-image noise, so that every image is distinct and a model can learn the classes.
Then it runs each phase in a process of its own (so each phase's peak RSS is its own: os.wait4's
ru_maxrss of that process), each through the product's own functions on a data home of its own:

import      core.data.importing.import_paths of the folder (or zip), image size 28: images/s
train       core.runs.jobs.create_training_run + core.runs.worker.execute_run (no map), one epoch
            (--epochs) of the default recipe (small_cnn, triplet, pk sampler, batch 256); the run ends
            with the product's own embedding of every image and its test metrics: loss, P@1
embed       an embedding run of the trained encoder (core.runs.jobs.create_embedding_run +
            execute_run): the whole dataset through the encoder, images/s
statistics  core.runs.worker.compute_statistics on the trained run (each image's AP and
            neighbours, label errors, the search index past APPROXIMATE_ABOVE): P@1 and MAP@R
            from the run's metrics
map         core.runs.worker.compute_projection (UMAP with the product's defaults)
search      core.explore.service.search_by_image: 100 queries (image files of the dataset) against the
            run's index, k=10; ms per query and P@1 of the queries' nearest other image
export      core.explore.export.export_run as parquet: rows, MB
explore     not run here: bench/explore.py's `browser` section times the Explore page's first paint in
            headless Chromium on a stored run; say so in the JSON (skipped, with the reason)

Prints one JSON line per phase and size: {"phase", "n", "seconds", "peak_rss_mb", ...the phase's figure}.
A phase that fails prints {"phase", "n", "error"} and the phases that need it are skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("import", "train", "embed", "statistics", "map", "search", "export", "explore")
SIDE = 28
CLASSES = 10


# ---------------------------------------------------------------- synthetic images

def png_bytes(pixels: np.ndarray) -> bytes:
    """A grayscale (H, W) uint8 array as a PNG, written by hand (zlib level 1): 3× faster than
    Pillow's encoder for tiny images, and a valid PNG that the import decodes with Pillow."""
    h, w = pixels.shape
    raw = np.zeros((h, w + 1), np.uint8)
    raw[:, 1:] = pixels  # filter byte 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw.tobytes(), 1)) + chunk(b"IEND", b""))


def synthetic_batches(n: int, side: int = SIDE, seed: int = 0, batch: int = 4096):
    """(index, class, (side, side) uint8 image) for n images: class c is a sinusoid of frequency and
    angle of its own; uniform noise makes every image distinct (no duplicates to skip)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    for start in range(0, n, batch):
        k = min(batch, n - start)
        classes = np.arange(start, start + k) % CLASSES
        angle = classes[:, None, None] * (np.pi / CLASSES)
        freq = 0.25 + 0.08 * classes[:, None, None]
        wave = np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)))
        images = np.clip(110 + 90 * wave + rng.integers(-40, 41, (k, side, side)), 0, 255).astype(np.uint8)
        for j in range(k):
            yield start + j, int(classes[j]), images[j]


def write_folder(root: Path, n: int, side: int = SIDE, seed: int = 0) -> Path:
    """n PNGs in root/class0 … root/class9."""
    for c in range(CLASSES):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i, c, image in synthetic_batches(n, side, seed):
        with open(root / f"class{c}" / f"{i:07d}.png", "wb") as handle:
            handle.write(png_bytes(image))
    return root


def write_zip(path: Path, n: int, side: int = SIDE, seed: int = 0) -> Path:
    """n PNGs in class folders inside one zip (stored: PNGs are compressed already)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for i, c, image in synthetic_batches(n, side, seed):
            zf.writestr(f"class{c}/{i:07d}.png", png_bytes(image))
    return path
