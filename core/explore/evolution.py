"""The embedding space across epochs: a fixed probe set embedded at the end of every epoch, and
its maps laid out in aligned coordinates, so a person can follow one point (one image) from
frame to frame and watch the classes pull apart.

Files of run <id> (relative to the data home):

- `runs/<id>/probe/positions.npy`: the probe's dataset positions (int64), written once;
- `runs/<id>/probe/epoch-<N>.npy`: the probe's embeddings (float16) after epoch N, row i being
  image positions[i];
- `runs/<id>/evolution.npy`: the aligned maps (E, n_probe, 2) float32, frame e the e-th stored
  epoch, row i being probe image i in every frame; `evolution.json` beside it names each frame's
  epoch and its Precision@1 on the probe.

The worker calls `store_probe` at the end of each epoch; `python -m core project` runs
`core.runs.worker.compute_evolution` (method "evolution") after the run's map.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from storage import artifacts
from storage.run_files import EVOLUTION_FILE, EVOLUTION_INFO, PROBE_FOLDER, RunFiles

PROBE_MAX = 10_000  # images in the probe at most (a fixed seeded sample of bigger test sets)
PROBE_SEED = 0
POSITIONS_FILE = "positions.npy"

# The job's parameters (its ProjectionRow's key). The last epoch is laid out as the run's map is
# (core.explore.projection.layout_plan); each earlier one starts from the layout of the epoch after it and
# runs `refine_epochs` layout epochs, then is aligned to it by a similarity transform. See
# bench/evolution.py for the measurements behind refine_epochs.
EVOLUTION_PARAMS = {"n_neighbors": 15, "min_dist": 0.1, "refine_epochs": 60}

ProgressFn = Callable[[str, Optional[float], str], None]


def probe_folder(run_id: int) -> str:
    return RunFiles(run_id).probe_folder


def probe_positions(split: np.ndarray, max_points: int = PROBE_MAX, seed: int = PROBE_SEED,
                    excluded: Optional[np.ndarray] = None) -> np.ndarray:
    """The dataset positions of the probe, ascending: the test images (all images when there are
    none), a fixed seeded sample of them when there are more than max_points; never an image the
    dataset's version excludes (`excluded`, (N,) bool)."""
    split = np.asarray(split)
    used = np.ones(len(split), dtype=bool) if excluded is None else ~np.asarray(excluded, dtype=bool)
    pool = np.flatnonzero((split == "test") & used)
    if len(pool) == 0:
        pool = np.flatnonzero(used)
    if len(pool) > max_points:
        pool = np.sort(np.random.default_rng(seed).choice(pool, size=max_points, replace=False))
    return pool.astype(np.int64)


def precision_at_1(embeddings: np.ndarray, labels: Optional[np.ndarray]) -> Optional[float]:
    """Precision@1 of the probe, each image a query against the others, as
    core.explore.metrics.retrieval_metrics counts it (queries alone in their class skipped) but with one
    2-NN search instead of a full ranking. None where that metric would refuse: no labels, fewer
    than two classes, no class with two images, or NaN or infinite embeddings."""
    from core.explore.search import as_normalised_float32, nonfinite_rows

    if labels is None or len(labels) < 2 or nonfinite_rows(embeddings):
        return None
    labels = np.asarray(labels)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    usable = counts[inverse] > 1
    if len(counts) < 2 or not usable.any():
        return None
    nearest = _nearest_other(as_normalised_float32(embeddings))
    return float((labels[nearest] == labels)[usable].mean())


NEAREST_CHUNK = 512  # queries per product: (512, N) float32, 20 MB at N = 10,000


def _nearest_other(vectors: np.ndarray) -> np.ndarray:
    """Each row's most similar other row (cosine; ties: the lowest index), exactly, by blocks of
    one matrix product and an argmax. The similarity is symmetric, so each block of rows is
    multiplied only with itself and the rows after it: its argmax along rows answers its own
    rows, and along columns offers each later row its best among this block. Half the products
    of a full square; on 10,000 probe embeddings on two cores 0.12 s against 0.26 s for the full
    square and about 0.5 s for faiss's exact 2-NN search (which also sorts each query itself
    back out of its results). Blocks come in ascending order and a later offer replaces an
    earlier one only when strictly more similar, so a tie keeps the lowest index."""
    import torch

    from core.threads import use_share

    use_share()
    x = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    n = len(x)
    best = torch.full((n,), -torch.inf)
    nearest = torch.zeros(n, dtype=torch.int64)
    block = torch.empty(min(NEAREST_CHUNK, n), n)  # one buffer for every product

    def offer(rows: slice, similarity: torch.Tensor, candidate: torch.Tensor) -> None:
        better = similarity > best[rows]
        best[rows] = torch.where(better, similarity, best[rows])
        nearest[rows] = torch.where(better, candidate, nearest[rows])

    with torch.no_grad():
        for start in range(0, n, NEAREST_CHUNK):
            stop = min(start + NEAREST_CHUNK, n)
            similarity = block[:stop - start, :n - start]  # these rows against every row from `start` on
            torch.mm(x[start:stop], x[start:].T, out=similarity)
            similarity.diagonal().fill_(-torch.inf)  # not itself
            column = similarity.argmax(dim=1)
            offer(slice(start, stop), similarity.gather(1, column[:, None]).squeeze(1), column + start)
            if stop < n:
                later = similarity[:, stop - start:]
                row = later.argmax(dim=0)
                offer(slice(stop, n), later.gather(0, row[None]).squeeze(0), row + start)
    return nearest.numpy()


@dataclass
class StagedProbe:
    """One epoch's probe files, written into the worker's staging folder; `move_into_place` once
    the epoch's rows are committed under the ownership check (as the checkpoint is)."""

    precision_at_1: Optional[float]
    seconds: float
    moves: list[tuple[Path, Path]] = field(default_factory=list)

    def move_into_place(self) -> None:
        for source, target in self.moves:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)


def store_probe(staging: Path, run_id: int, epoch: int, model, data) -> StagedProbe:
    """Embed the probe with `model` as it stands (its train/eval mode is restored afterwards),
    stage `epoch-<epoch>.npy` (and `positions.npy` the first time) in `staging`, and measure the
    epoch's Precision@1 on it (labelled datasets). data: core.data.datasets.DatasetArrays."""
    from core.training.loop import embed

    started = time.perf_counter()
    positions = probe_positions(data.split, excluded=data.excluded)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = "cpu"
    was_training = model.training
    try:
        embeddings = embed(model, data.pixels[positions], device)
    finally:
        model.train(was_training)
    embeddings = embeddings.astype(np.float16)  # as stored: the stored file gives back the same P@1
    labels = None if data.labels is None else np.asarray(data.labels)[positions]
    p1 = precision_at_1(embeddings.astype(np.float32), labels)
    folder = artifacts.absolute(probe_folder(run_id))
    staged = staging / PROBE_FOLDER
    staged.mkdir(parents=True, exist_ok=True)
    moves = []
    if not (folder / POSITIONS_FILE).exists():
        artifacts.save_array_atomic(staged / POSITIONS_FILE, positions)
        moves.append((staged / POSITIONS_FILE, folder / POSITIONS_FILE))
    name = f"epoch-{int(epoch)}.npy"
    artifacts.save_array_atomic(staged / name, embeddings)
    moves.append((staged / name, folder / name))
    return StagedProbe(p1, time.perf_counter() - started, moves)


def probe_epochs(run_id: int) -> list[int]:
    """The epochs whose probe embeddings run `run_id` stored, ascending ([] for none)."""
    folder = artifacts.absolute(probe_folder(run_id))
    if not (folder / POSITIONS_FILE).exists():
        return []
    found = (re.fullmatch(r"epoch-(\d+)\.npy", p.name) for p in folder.glob("epoch-*.npy"))
    return sorted(int(m.group(1)) for m in found if m)


def load_probe(run_id: int, epochs: Optional[Sequence[int]] = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """(positions, [embeddings float32 of each epoch]) of the run's probe; LookupError when none."""
    epochs = probe_epochs(run_id) if epochs is None else list(epochs)
    if not epochs:
        raise LookupError(f"run {run_id} stored no probe embeddings (it trained before they were kept, "
                          "or it is not a training run)")
    folder = artifacts.absolute(probe_folder(run_id))
    positions = np.load(folder / POSITIONS_FILE)
    frames = [np.load(folder / f"epoch-{e}.npy").astype(np.float32) for e in epochs]
    for epoch, frame in zip(epochs, frames):
        if frame.shape[0] != len(positions):
            raise ValueError(f"run {run_id}'s probe of epoch {epoch} holds {frame.shape[0]} images, "
                             f"not the {len(positions)} of its positions file")
    return positions, frames


# ------------------------------------------------------------------ aligned maps across epochs


def similarity_align(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """`source` (N, 2) moved by the translation, rotation (or reflection) and uniform scale that
    bring it closest to `target` in least squares (orthogonal Procrustes with scaling)."""
    source = np.asarray(source, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    mu_s, mu_t = source.mean(axis=0), target.mean(axis=0)
    a, b = source - mu_s, target - mu_t
    u, s, vt = np.linalg.svd(a.T @ b)
    norm = float((a * a).sum())
    scale = float(s.sum()) / norm if norm > 0 else 1.0
    return scale * a @ (u @ vt) + mu_t


def consecutive_displacement(frames: np.ndarray) -> np.ndarray:
    """(E − 1,) how far points move from each frame to the next, with no credit for what a
    similarity transform explains: frame e is similarity-aligned to frame e + 1, then the mean
    distance a point moves is divided by frame e + 1's RMS radius."""
    steps = []
    for before, after in zip(frames[:-1], frames[1:]):
        after = np.asarray(after, dtype=np.float64)
        radius = float(np.sqrt(((after - after.mean(axis=0)) ** 2).sum(axis=1).mean())) or 1.0
        moved = np.linalg.norm(similarity_align(before, after) - after, axis=1)
        steps.append(moved.mean() / radius)
    return np.asarray(steps)


def aligned_maps(frames: Sequence[np.ndarray], n_neighbors: int = 15, min_dist: float = 0.1,
                 refine_epochs: int = 60, labels: Optional[Sequence[str]] = None,
                 on_progress: Optional[ProgressFn] = None) -> np.ndarray:
    """(E, N, 2) float32 maps of E embeddings (N, d) of the same N points, in aligned coordinates.

    The last frame is the run's kind of UMAP map (core.explore.projection.project_umap). Going back in
    time, each frame starts from the layout of the frame after it and takes `refine_epochs`
    layout epochs on its own k-NN graph, then is moved by the similarity transform that best
    fits it onto that next frame. So a point moves only as far as its neighbourhood changed, and
    row i is point i in every frame. labels: what progress messages call each frame.

    on_progress(phase, fraction, message): core.explore.projection's phases for the last frame
    (importing, compiling, neighbours, layout), then "frames" with the fraction of frames done.
    """
    from core.explore.projection import project_umap

    report = on_progress or (lambda phase, fraction, message: None)
    frames = [np.ascontiguousarray(f, dtype=np.float32) for f in frames]
    if not frames:
        return np.zeros((0, 0, 2), dtype=np.float32)
    n = len(frames[0])
    if any(len(f) != n for f in frames):
        raise ValueError("every frame must hold the same points: " + ", ".join(str(len(f)) for f in frames))
    names = list(labels) if labels is not None else [f"frame {i + 1}" for i in range(len(frames))]
    total = len(frames)

    def quiet_done(phase, fraction, message):
        if phase != "done":
            report(phase, fraction, message)

    out = np.zeros((total, n, 2), dtype=np.float32)
    out[-1] = project_umap(frames[-1], n_neighbors=n_neighbors, min_dist=min_dist, on_progress=quiet_done)
    report("frames", None, f"laying out {total} epochs")
    report("frames", 1 / total, f"{names[-1]}: 1 of {total}")
    for done, e in enumerate(range(total - 2, -1, -1), start=2):
        if n > 2:
            layout = project_umap(frames[e], n_neighbors=n_neighbors, min_dist=min_dist,
                                  init=out[e + 1], n_epochs=refine_epochs)
        else:
            layout = out[e + 1]
        out[e] = similarity_align(layout, out[e + 1])
        report("frames", done / total, f"{names[e]}: {done} of {total}")
    return out


def stage_evolution(engine, run_id: int, params: dict, staging: Path, on_progress: ProgressFn) -> list[tuple[Path, str]]:
    """The evolution job's work (core.runs.worker.compute_evolution): lay out the probe of every
    stored epoch with `aligned_maps`, write evolution.npy and evolution.json into `staging`, and
    name where each goes (relative to the data home)."""
    from sqlalchemy import select

    from core.explore.search import nonfinite_rows
    from storage.db import transaction
    from storage.schema import EpochRow

    with transaction(engine) as session:
        stored = {row.epoch: row.probe_precision_at_1
                  for row in session.scalars(select(EpochRow).where(EpochRow.run_id == run_id))}
    epochs = [e for e in probe_epochs(run_id) if e in stored]
    if not epochs:
        raise LookupError(f"run {run_id} stored no probe embeddings (it trained before they were kept, "
                          "or it is not a training run)")
    on_progress("loading", None, f"reading the probe's embeddings of {len(epochs)} epochs")
    positions, frames = load_probe(run_id, epochs)
    for epoch, frame in zip(epochs, frames):
        bad = nonfinite_rows(frame)
        if bad:
            raise ValueError(f"the probe's embeddings of epoch {epoch} are NaN or infinite for {bad} images; "
                             "the encoder had diverged then")
    maps = aligned_maps(frames, n_neighbors=params["n_neighbors"], min_dist=params["min_dist"],
                        refine_epochs=params["refine_epochs"], labels=[f"epoch {e}" for e in epochs],
                        on_progress=on_progress)
    staging.mkdir(parents=True, exist_ok=True)
    artifacts.save_array_atomic(staging / EVOLUTION_FILE, maps)
    info = {"epochs": epochs, "precision_at_1": [stored[e] for e in epochs], "n_probe": int(len(positions))}
    temp = staging / f"{EVOLUTION_INFO}.tmp"
    temp.write_text(json.dumps(info))
    os.replace(temp, staging / EVOLUTION_INFO)
    files = RunFiles(run_id)
    return [(staging / EVOLUTION_FILE, files.evolution), (staging / EVOLUTION_INFO, files.evolution_info)]


@dataclass
class Evolution:
    """A run's stored map across epochs: maps (E, n, 2), row i of every frame being image
    positions[i]; each frame's epoch and its Precision@1 on the probe (None when unlabelled)."""

    positions: np.ndarray
    maps: np.ndarray
    epochs: list[int]
    precision_at_1: list[Optional[float]]


def load_evolution(path: str) -> Evolution:
    """The map across epochs stored at `path` (the job row's, relative to the data home), with
    its positions and evolution.json; LookupError or ValueError with a sentence when a file is
    gone or does not match."""
    where = artifacts.absolute(path)
    try:
        maps = np.load(where)
        info = json.loads((where.parent / EVOLUTION_INFO).read_text())
        positions = np.load(where.parent / PROBE_FOLDER / POSITIONS_FILE)
    except (OSError, ValueError) as exc:
        raise LookupError(f"the map across epochs at {path} cannot be read ({exc})") from None
    if maps.ndim != 3 or maps.shape[0] != len(info["epochs"]) or maps.shape[1] != len(positions):
        raise ValueError(f"the map across epochs at {path} holds {maps.shape} coordinates, which do not match "
                         f"its {len(info['epochs'])} epochs of {len(positions)} probe images")
    return Evolution(positions, maps, list(info["epochs"]), list(info["precision_at_1"]))
