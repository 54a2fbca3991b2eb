"""What comparing two runs costs: core.explore.compare.compare_runs on Fashion-MNIST's 70,000 images.

Goal (issue 17): two runs of the 70,000 images compared (neighbourhood agreement, per-class
Precision@1 and MAP@R differences with bootstrap intervals) in at most 10 s on this CPU once both
runs' statistics exist.

Two runs made without training, stored as runs are (tests.helpers.stored_run: created, claimed and
completed through core.runs.lifecycle, their statistics computed by core.runs.worker's job): run A
embeds each image's pixels / 255 by a seeded Gaussian random projection to 64 dimensions, run B by
a PCA to 64 dimensions (sklearn, randomized, seed 0), so B is the better encoder and the two
spaces differ. Building them (the dataset import, both embeddings, both runs' statistics: each
run's exact 10-NN over 70,000 images and its per-query AP) is not timed. Timed: compare_runs(A, B)
with its defaults (k = 10, 1,000 resamples, 20 rows per table), everything from reading the rows
and files to the finished Comparison, `--repeats` times; `seconds` is the first call, `best` the
fastest. `read_s` is the part spent reading the two runs (rows, embeddings, statistics files).

    python bench/compare.py [--quick] [--runs A B] [--home PATH] [--repeats 3]

--quick: a seeded 10,000-image subset of Fashion-MNIST (its train/test split kept), in seconds.
--runs A B: compare two stored runs of the data folder in EMBEDDING_LAB_HOME instead (their
statistics must exist). --home PATH: keep the built runs in PATH and reuse them next time
(otherwise a temporary folder). Prints one JSON line. Without Fashion-MNIST installed
(core.data.datasets.FASHION_MNIST_HINT) it says so on stderr and exits with status 1.

Measured on the shared 2-core machine (load average 4–9 from other workers), 70,000 images,
10,000 test queries, k 10, 1,000 resamples, the runs' statistics built untimed in 138 s:
  EMBEDDING_LAB_THREADS=1   first call 1.17 s, then 0.77, 0.93 (load 4.7); earlier 0.85 / 1.33 (load 7 / 9)
  unset (1 thread measured) first call 1.48 s, then 0.77, 0.88 (load 4.6); earlier 0.75 (load 6.5)
  --by-content (B on a reversed copy, matched by sha256): 0.90 s, the same figures to the digit
  --quick (10,000 images, 1,459 queries): 0.06–0.16 s
  Figures: mean agreement 0.206; Precision@1 A 0.7956, B 0.8139, B − A +0.0183 [+0.0106, +0.0261];
  MAP@R 0.3163, 0.3307, +0.0144 [+0.0123, +0.0165]; Sandal's MAP@R +0.247 [+0.240, +0.255], T-shirt's
  −0.070 [−0.079, −0.063]; A's figures equal retrieval_metrics of its test split.
  Where a call's time goes (warm): reading both runs 0.06–0.2 s, neighbours and Jaccard 0.05–0.4 s,
  each query's nearest test image 0.1–0.6 s (stored neighbours, faiss for the 22% whose stored 10
  hold no test image), the bootstrap 0.2–0.5 s.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GOAL_SECONDS = 10.0
QUICK_IMAGES = 10_000
DIMENSIONS = 64
MARK = "bench/compare.py"  # in the runs' config: a kept --home finds its runs by it


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def fashion_dataset(engine, quick: bool) -> int:
    """The id of Fashion-MNIST (or, with quick, a seeded subset of it stored as a dataset of its own)."""
    from core.data.datasets import ensure_builtin, load_builtin, save_dataset
    from storage import queries
    from storage.db import transaction

    if not quick:
        return ensure_builtin(engine, "fashion-mnist")
    name = f"fashion-mnist-{QUICK_IMAGES // 1000}k"
    with transaction(engine) as session:
        existing = queries.dataset_by_name(session, name)
        if existing is not None:
            return existing.id
    pixels, labels, split, classes = load_builtin("fashion-mnist")
    keep = np.sort(np.random.default_rng(0).choice(len(pixels), QUICK_IMAGES, replace=False))
    return save_dataset(engine, name, "upload", pixels[keep], labels[keep], [f"{i:05d}.png" for i in keep],
                        [f"fashion-{i:05d}" for i in keep], classes=classes, split=split[keep])


def reversed_copy(engine, dataset_id: int) -> int:
    """The id of a second dataset holding the same images (the same content hashes) in reverse
    order, as a version of a dataset would: runs of the two share every image by content only."""
    from core.data.datasets import save_dataset
    from core.explore.service import dataset_pixels
    from storage import queries
    from storage.db import transaction

    with transaction(engine) as session:
        source = queries.get_dataset(session, dataset_id)
        name, classes = f"{source.name}-reversed", list(source.classes)
        existing = queries.dataset_by_name(session, name)
        if existing is not None:
            return existing.id
        table = queries.dataset_image_table(session, dataset_id)[::-1]
        hashes = queries.dataset_image_hashes(session, dataset_id)[::-1]
    pixels = np.asarray(dataset_pixels(engine, dataset_id))[::-1]
    return save_dataset(engine, name, "upload", pixels, np.array([image.label for image in table]),
                        [image.name for image in table], hashes, classes=classes,
                        split=np.array([image.split for image in table]))


def bench_runs(engine, quick: bool, by_content: bool) -> tuple[int, int, float]:
    """(run A, run B, seconds spent building them): the runs a kept home holds, else new ones.
    by_content: run B embeds the reversed copy of the dataset (reversed_copy)."""
    from sklearn.decomposition import PCA

    from core.explore.service import dataset_pixels
    from storage import queries
    from storage.db import transaction
    from tests.helpers import stored_run

    dataset_id = fashion_dataset(engine, quick)
    dataset_b = reversed_copy(engine, dataset_id) if by_content else dataset_id
    with transaction(engine) as session:
        kept = {(run.dataset_id, run.config.get("encoder")): run.id
                for run in queries.list_runs(session) if run.status == "completed"
                and (run.config or {}).get("bench") == MARK}
    if (dataset_id, "random-projection") in kept and (dataset_b, "pca") in kept:
        return kept[dataset_id, "random-projection"], kept[dataset_b, "pca"], 0.0
    started = time.perf_counter()
    pixels = np.asarray(dataset_pixels(engine, dataset_id), dtype=np.float32).reshape(-1, 28 * 28) / 255
    if (dataset_id, "random-projection") in kept:
        run_a = kept[dataset_id, "random-projection"]
    else:
        projection = np.random.default_rng(1).normal(size=(pixels.shape[1], DIMENSIONS)).astype(np.float32)
        run_a = stored_run(engine, dataset_id, pixels @ projection, {"bench": MARK, "encoder": "random-projection",
                                                                      "embedding_dim": DIMENSIONS, "seed": 1})
    pca = PCA(DIMENSIONS, svd_solver="randomized", random_state=0).fit_transform(pixels).astype(np.float32)
    run_b = stored_run(engine, dataset_b, pca[::-1] if by_content else pca,
                       {"bench": MARK, "encoder": "pca", "embedding_dim": DIMENSIONS, "seed": 0})
    return run_a, run_b, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"a {QUICK_IMAGES:,}-image subset")
    parser.add_argument("--runs", nargs=2, type=int, metavar=("A", "B"), help="two stored runs to compare")
    parser.add_argument("--home", type=Path, help="keep (and reuse) the built runs in this data folder")
    parser.add_argument("--by-content", action="store_true",
                        help="run B embeds a copy of the dataset in reverse order: images matched by sha256")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from core.data.datasets import FASHION_MNIST_HINT, fashion_mnist_available

    temporary = None
    if args.runs is None:
        if not fashion_mnist_available():
            print(f"Fashion-MNIST is not installed: {FASHION_MNIST_HINT}", file=sys.stderr)
            return 1
        if args.home is None:
            temporary = tempfile.TemporaryDirectory(prefix="bench-compare-")
        os.environ["EMBEDDING_LAB_HOME"] = str(args.home or temporary.name)
        os.environ.pop("EMBEDDING_LAB_DB", None)

    from core.explore import compare as compare_module
    from core.threads import thread_share
    from storage.db import make_engine

    engine = make_engine()
    try:
        if args.runs is not None:
            run_a, run_b, build_seconds = args.runs[0], args.runs[1], 0.0
        else:
            run_a, run_b, build_seconds = bench_runs(engine, args.quick, args.by_content)
        seconds = []
        for _ in range(max(1, args.repeats)):
            started = time.perf_counter()
            comparison = compare_module.compare_runs(engine, run_a, run_b)
            seconds.append(time.perf_counter() - started)
        started = time.perf_counter()
        compare_module._read_run(engine, run_a)
        compare_module._read_run(engine, run_b)
        read_seconds = time.perf_counter() - started
    finally:
        engine.dispose()
        if temporary is not None:
            temporary.cleanup()

    counts = comparison.counts()
    overall = {row["metric"]: {key: round(row[key], 4) for key in ("a", "b", "difference", "low", "high")}
               for row in comparison.overall}
    per_class = [{"class": row["name"], "queries": row["n_queries"],
                  "p1": [round(row[f"precision_at_1_{key}"], 4) for key in ("difference", "low", "high")],
                  "map_at_r": [round(row[f"map_at_r_{key}"], 4) for key in ("difference", "low", "high")]}
                 for row in comparison.per_class]
    data = f"runs {run_a} and {run_b}" if args.runs is not None else (
        "fashion-mnist" + (f" {QUICK_IMAGES:,}-image subset" if args.quick else "")
        + (", run B on a reversed copy (matched by sha256)" if args.by_content else ""))
    emit({
        "bench": "compare", "data": data,
        "runs": [run_a, run_b], "aligned_by": comparison.aligned_by, "images": counts["shared_images"],
        "queries": counts["queries"],
        "k": comparison.k, "resamples": comparison.resamples,
        "threads": thread_share(), "EMBEDDING_LAB_THREADS": os.environ.get("EMBEDDING_LAB_THREADS"),
        "load_average": round(os.getloadavg()[0], 1),
        "seconds": round(seconds[0], 3), "best": round(min(seconds), 3), "each": [round(s, 3) for s in seconds],
        "read_s": round(read_seconds, 3),
        "goal_s": GOAL_SECONDS, "within_goal": seconds[0] <= GOAL_SECONDS, "build_s": round(build_seconds, 1),
        "mean_agreement": round(comparison.mean_agreement, 4),
        "better": counts["better"], "worse": counts["worse"],
        "wrong_to_right": counts["wrong_to_right"], "right_to_wrong": counts["right_to_wrong"],
        "overall": overall, "per_class": per_class,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
