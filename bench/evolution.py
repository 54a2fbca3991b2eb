"""The embedding space across epochs: what the probe costs per epoch, and what the aligned maps
cost and how still they are, against independent UMAP fits (and umap-learn's AlignedUMAP).

Trains RunConfig's default encoder on Fashion-MNIST (a train subset, for time; the probe is the 10,000 test
images) for --epochs epochs with core.explore.evolution.store_probe at each epoch's end, as the worker
does; then lays the probe's epochs out with core.explore.evolution.aligned_maps for each --refine value,
and with one independent core.explore.projection.project_umap per epoch. For each: seconds, the mean
consecutive displacement (core.explore.evolution.consecutive_displacement: after the best similarity
transform, in RMS radii of the next frame) and the trustworthiness of every frame against its
own epoch's embeddings (3,000-point subsample, 10 neighbours), so stillness bought with a wrong
map shows. --aligned-umap adds umap-learn's AlignedUMAP (identity relations).

    python bench/evolution.py [--epochs 8] [--train 12000] [--refine 30,60,100] [--aligned-umap]

The probe sequence is kept in --cache (default /tmp/evolution-probe.npz) for later runs.
Prints one JSON object per line. Numba is warmed up first (a map of 500 points), so the figures
are those of the `project` process after its map.

Measured on the 2-core dev machine (shared with other work), 8 epochs of 12,000 train images, the
10,000 test images as the probe, 64-d (mean step: RMS radii; T: trustworthiness per frame):
  probe per epoch (embed + P@1): 2.5-3.6 s at load 0.2-2 (epochs of 5-7 s), 5.7-11.6 s at load 5+
  aligned, refine 30: 26.6 s for 8 frames, mean step 0.151, T 0.986-0.989
  aligned, refine 60: 26.2 s, mean step 0.149, T 0.987-0.990
  independent fits: 89.6 s, mean step 0.454, T 0.988-0.992
  same epoch laid out again from its own map (the noise floor): step 0.10-0.13 whatever the
  learning rate (1.0, 0.5, 0.25, 0.05) or refine epochs (30-100); so refine 60, learning rate 1
  2,000 probe images: aligned 8.8 s (step 0.171), independent 27.8 s (step 0.459)
  AlignedUMAP (umap-learn 0.5.12): killed unfinished after 15 min at 10,000 points and after
  10 min at 2,000 points (load 5-7)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

TRUST_SAMPLE = 3000


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def probe_sequence(epochs: int, train: int, cache: Path) -> tuple[np.ndarray, list[np.ndarray], list]:
    if cache.exists():
        saved = np.load(cache)
        frames = [saved[f"e{i}"] for i in range(int(saved["count"]))]
        emit(what="probe", cached=str(cache), epochs=len(frames))
        return saved["labels"], frames, list(saved["p1"])
    from core.training.config import RunConfig
    from core.data.datasets import DatasetArrays, load_builtin
    from core.explore.evolution import probe_positions, store_probe
    from core.training.loop import fit

    pixels, labels, split, classes = load_builtin("fashion-mnist")
    rng = np.random.default_rng(0)
    keep = np.sort(np.concatenate([rng.choice(np.flatnonzero(split == "train"), train, replace=False),
                                   np.flatnonzero(split == "test")]))
    data = DatasetArrays(pixels[keep], labels[keep], split[keep], classes)
    positions = probe_positions(data.split)
    frames, p1, seconds, epoch_seconds = [], [], [], []
    staging = Path(tempfile.mkdtemp())

    def on_epoch(stats, state):
        staged = store_probe(staging, 1, stats.epoch, state.model, data)
        frames.append(np.load(staged.moves[-1][0]).astype(np.float32))
        assert state.model.training, "store_probe must give the model back in train mode"
        p1.append(staged.precision_at_1)
        seconds.append(staged.seconds)
        epoch_seconds.append(stats.seconds)

    cfg = RunConfig(dataset="fashion-mnist", epochs=epochs, device="cpu")
    fit(cfg, data, on_epoch=on_epoch)
    emit(what="probe", n_probe=int(len(positions)), train_images=train, epochs=epochs,
         probe_seconds=[round(s, 2) for s in seconds], epoch_seconds=[round(s, 1) for s in epoch_seconds],
         precision_at_1=[round(p, 4) for p in p1])
    np.savez(cache, count=len(frames), labels=data.labels[positions], p1=np.array(p1),
             **{f"e{i}": f for i, f in enumerate(frames)})
    return data.labels[positions], frames, p1


def trust(frames, maps) -> list[float]:
    from sklearn.manifold import trustworthiness

    pick = np.random.default_rng(1).choice(len(frames[0]), min(TRUST_SAMPLE, len(frames[0])), replace=False)
    return [round(float(trustworthiness(f[pick], m[pick], n_neighbors=10)), 4) for f, m in zip(frames, maps)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train", type=int, default=12000)
    parser.add_argument("--refine", default="30,60,100")
    parser.add_argument("--aligned-umap", action="store_true")
    parser.add_argument("--no-independent", action="store_true")
    parser.add_argument("--n", type=int, default=None, help="only the first N probe images")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/evolution-probe.npz"))
    args = parser.parse_args()
    os.environ.setdefault("EMBEDDING_LAB_HOME", tempfile.mkdtemp())
    os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "embedding-lab-numba"))

    labels, frames, p1 = probe_sequence(args.epochs, args.train, args.cache)
    if args.n:
        labels, frames = labels[:args.n], [f[:args.n] for f in frames]
    from core.explore.evolution import aligned_maps, consecutive_displacement
    from core.explore.projection import project_umap

    t = time.perf_counter()
    project_umap(frames[-1][:500])  # import and compile, as the map before it did in `project`
    emit(what="warm-up", seconds=round(time.perf_counter() - t, 1))

    for refine in [int(r) for r in args.refine.split(",") if r]:
        t = time.perf_counter()
        maps = aligned_maps(frames, refine_epochs=refine)
        seconds = time.perf_counter() - t
        steps = consecutive_displacement(maps)
        emit(what="aligned", refine_epochs=refine, frames=len(frames), n=len(frames[0]), seconds=round(seconds, 1),
             mean_step=round(float(steps.mean()), 4), steps=[round(float(s), 3) for s in steps],
             trust=trust(frames, maps))

    if not args.no_independent:
        t = time.perf_counter()
        maps = np.stack([project_umap(f) for f in frames])
        seconds = time.perf_counter() - t
        steps = consecutive_displacement(maps)
        emit(what="independent", frames=len(frames), seconds=round(seconds, 1), mean_step=round(float(steps.mean()), 4),
             steps=[round(float(s), 3) for s in steps], trust=trust(frames, maps))

    if args.aligned_umap:
        import umap

        relations = [{i: i for i in range(len(frames[0]))} for _ in frames[:-1]]
        t = time.perf_counter()
        reducer = umap.AlignedUMAP(n_neighbors=15, min_dist=0.1).fit(frames, relations=relations)
        seconds = time.perf_counter() - t
        maps = np.stack(reducer.embeddings_)
        steps = consecutive_displacement(maps)
        emit(what="AlignedUMAP", frames=len(frames), seconds=round(seconds, 1), mean_step=round(float(steps.mean()), 4),
             steps=[round(float(s), 3) for s in steps], trust=trust(frames, maps))


if __name__ == "__main__":
    main()
