"""A run's statistics and UMAP map at 100,000 and 1,000,000 embeddings: time, peak memory, quality.

    python bench/scale_stats.py [--sizes 100000,1000000] [--phases knn,statistics,map] [--classes 100]
                                [--workdir DIR] [--keep]

Per size, synthetic clustered embeddings (bench/synthetic.py: d = 128, unit rows, 1 % labels
flipped) are written once to the work folder; then each phase runs in a process of its own (a
new `python`, as the app's job process is), which reads them and prints one JSON line:

  {"phase": "knn", "n", "seconds", "index_seconds", "peak_rss_mb", "kind", "recall_at_10", "recall_sampled"}
      the whole run's k-NN (core.explore.knn: exact up to 100,000, IVF above), saved to the work
      folder; index_seconds of it building the index (above 200,000 images the run's search index,
      which the statistics job builds for Explore's search anyway); recall_sampled = recall@10 of 1,000 random images against exact brute force.
  {"phase": "statistics", "n", "seconds", "peak_rss_mb", "map_at_r", "map_low", "map_high",
   "ap_queries", "method", "nn_correct", "knn_seconds", "with_knn_seconds"}
      core.explore.failures.compute_statistics reading that k-NN (seconds), and with_knn_seconds
      = seconds + the knn phase's (what the run's statistics job costs when it computes the k-NN).
  {"phase": "map", "n", "seconds", "peak_rss_mb", "scheme", "trustworthiness", "trustworthiness_exact",
   "trust_sample", "quality_seconds"}
      core.explore.projection.project_umap with the run's k-NN (seed None, as the app), warm numba
      cache; then, untimed, the trustworthiness (10 neighbours) of the map on a 10,000-point sample
      and of an exact-k-NN UMAP layout of that same sample.

cpu_seconds_process is the phase process's CPU time (user + system, its whole life: loading the
data and, for the map, the untimed quality figures included), load_average the machine's 1-minute
load before and after (the dev machine is shared: at a load of 10 on 2 cores a phase gets a
fraction of them, so seconds there are several times an idle machine's).
peak_rss_mb is the phase process's peak resident memory: resource.getrusage(RUSAGE_CHILDREN)
.ru_maxrss read by a small wrapper process whose only child is that phase (so an earlier phase's
larger peak never masks a later one's).

bench/scale.py (the whole pipeline) imports run_knn_phase, run_statistics_phase and run_map_phase.

Measured on the shared 2-core dev machine (100 classes, 4 modes each, noise 0.6; other workers
kept its load average at 4–13, so CPU seconds say more than wall seconds), 2026-12-04:
  100,000  knn         exact: 43–105 s wall, 44.5 CPU-s, peak 349 MB
           statistics  sampled AP (2,000 of 100,000): 8.4 s, 5.8 CPU-s, 337 MB; MAP@R 0.4487,
                       95 % interval 0.4410–0.4564, covering the exact 0.4525 (exact AP of all
                       100,000: 420 s at load 6, hence AP_EXACT_UP_TO = 50,000)
           map         full UMAP with the shared k-NN: 48–67 s, 644 MB; trustworthiness 0.99953
                       on a 10,000 sample against 0.99957 for an exact-k-NN UMAP of that sample
  1,000,000 knn        IVF 4,000 lists, list-wise over 8 lists: 227 s wall at load 5–6 (367 s at
                       load 9–10), 146 CPU-s, of which building the run's search index 162 s wall;
                       recall@10 0.978 at build, 0.980 on 1,000 other rows; peak 2.1 GB
           statistics  reading that k-NN, sampled AP: 84.7 s wall at load 4–5 (165 s at load 9),
                       46.4 CPU-s, 1.7 GB;
                       MAP@R 0.4483 (0.4409–0.4558, 2,000 queries); nn_correct 0.980
                       (before the list-wise k-NN and the one-partition AP: 342 s and 467 s).
                       So the statistics job at 1M (index + k-NN + statistics): 312 s at load ~5,
                       193 CPU-s, most of it the search index's build (k-means and assignment)
           map         100,000 landmarks, the rest placed: 198 s wall at load ~10, 1.9 GB;
                       trustworthiness 0.99952 against 0.99957 exact on a 10,000 sample

The statistics job at 1M on a quiet machine (2026-12-04 17:20-17:27; the only other work a
`nice -n 19` bench/scale.py, load average 2.0-2.2 with this bench's own two threads),
`python bench/scale_stats.py --sizes 1000000 --phases knn,statistics`, twice:
           knn         72.6 s and 69.2 s (index 28.3 s and 24.6 s), 96 / 95 CPU-s, 2,080 MB,
                       recall@10 0.978 at build, 0.980 sampled
           statistics  39.2 s and 39.7 s, 40 CPU-s, 1,699 MB; MAP@R 0.4483 (0.4409-0.4558)
           job         111.8 s and 108.9 s: the issue's 5 minutes with room to spare
Beside two busy loops (`python -c "while True: pass"` ×2, load 4.2-4.5), the index built on
faiss's default threads (two): knn 141.9 s (index 78.1 s), statistics 54.2 s, so 196 s; a second
time knn 282.8 s (index 151.7 s), statistics 113.8 s: 396.6 s, over the 5 minutes. faiss's OpenMP
regions wait for their slowest thread, and a thread on a busy core waits whole time slices.
Since the build runs on the process's thread share (core.threads; one thread there), on another
2-core machine (2026-12-05 05:18-05:24, same command, two busy loops, load 3.0):
           knn         74.3 s and 71.4 s (index 46.2 s and 44.7 s), 64 CPU-s, 2,078 MB,
                       recall@10 0.978 at build, 0.980 sampled
           statistics  24.6 s and 23.6 s, 17 CPU-s, 1,700 MB; MAP@R 0.4483 (0.4409-0.4558)
           job         98.9 s and 95.0 s
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TRUST_SAMPLE = 10_000
TRUST_NEIGHBOURS = 10
RECALL_QUERIES = 1_000


def _knn_folder(workdir) -> Path:
    return Path(workdir) / "knn"


def run_knn_phase(embeddings: np.ndarray, labels: np.ndarray, workdir) -> dict:
    """The whole run's k-NN of `embeddings`, saved under workdir/knn; its figures."""
    from core.explore import knn as run_knn

    from core.explore.search import NeighbourIndex

    started = time.perf_counter()
    index = NeighbourIndex(embeddings, approximate=len(embeddings) > run_knn.EXACT_UP_TO)
    built = time.perf_counter() - started
    knn = run_knn.compute_run_knn(embeddings, index=index, source="bench")
    run_knn.save_run_knn(knn, _knn_folder(workdir))
    seconds = time.perf_counter() - started
    # recall@10 of a random sample against exact brute force (faiss flat, all N)
    import faiss

    rng = np.random.default_rng(1)
    queries = np.sort(rng.choice(len(embeddings), min(RECALL_QUERIES, len(embeddings)), replace=False))
    _, exact = faiss.knn(np.ascontiguousarray(embeddings[queries]), np.ascontiguousarray(embeddings), 11,
                         metric=faiss.METRIC_INNER_PRODUCT)
    found = knn.ids[queries, 1:11]
    recall = np.mean([len(set(f) & set(e[e != q][:10])) / 10 for f, e, q in zip(found, exact, queries)])
    return {"seconds": seconds, "index_seconds": built, "kind": knn.kind, "recall_at_10": knn.recall_at_10,
            "recall_sampled": float(recall), "params": knn.params}


def _load_or_compute_knn(embeddings: np.ndarray, workdir):
    from core.explore import knn as run_knn

    try:
        return run_knn.load_run_knn(_knn_folder(workdir), expected_rows=len(embeddings)), 0.0
    except LookupError:
        started = time.perf_counter()
        knn = run_knn.compute_run_knn(embeddings, source="bench")
        run_knn.save_run_knn(knn, _knn_folder(workdir))
        return knn, time.perf_counter() - started


def run_statistics_phase(embeddings: np.ndarray, labels: np.ndarray, workdir) -> dict:
    """core.explore.failures.compute_statistics of every image as a query (a run without a test
    split), with the k-NN under workdir/knn (computed there first when absent: knn_seconds)."""
    from core.explore.failures import compute_statistics, save_statistics

    knn, knn_seconds = _load_or_compute_knn(embeddings, workdir)
    started = time.perf_counter()
    stats = compute_statistics(embeddings, labels, np.ones(len(labels), dtype=bool), knn=knn)
    save_statistics(stats, Path(workdir) / "statistics.npz")
    seconds = time.perf_counter() - started
    overall = stats.summary["map_at_r"]
    return {"seconds": seconds, "knn_seconds_here": knn_seconds, "map_at_r": overall["value"],
            "map_low": overall["low"], "map_high": overall["high"], "ap_queries": overall["queries"],
            "ap_population": overall["population"], "method": overall["method"],
            "nn_correct": float((stats.nn_correct == 1).mean()),
            "suspects": int((stats.suspect_share >= 0.5).sum())}


def run_map_phase(embeddings: np.ndarray, labels: np.ndarray, workdir, quality: bool = True) -> dict:
    """core.explore.projection.project_umap with the run's k-NN (workdir/knn, computed first when
    absent); the coordinates go to workdir/umap.npy. quality: then the trustworthiness on a
    TRUST_SAMPLE sample of the map and of an exact-k-NN layout of that sample (untimed)."""
    from core.explore import knn as run_knn
    from core.explore import projection

    knn, knn_seconds = _load_or_compute_knn(embeddings, workdir)
    phases = {}
    projection.project_umap(np.zeros((16, 4), np.float32) + np.eye(16, 4, dtype=np.float32))  # import + compile, untimed
    started = time.perf_counter()

    def on_progress(phase, fraction, message):
        phases.setdefault(phase, time.perf_counter() - started)
        if phase == "done":
            phases["message"] = message

    coords = projection.project_umap(embeddings, knn=run_knn.for_umap(knn, 15, "euclidean"), on_progress=on_progress)
    seconds = time.perf_counter() - started
    np.save(Path(workdir) / "umap.npy", coords)
    figures = {"seconds": seconds, "knn_seconds_here": knn_seconds, "scheme": phases.get("message", "")}
    if quality:
        figures.update(map_quality(embeddings, coords))
    return figures


def map_quality(embeddings: np.ndarray, coords: np.ndarray, sample: int = TRUST_SAMPLE, seed: int = 12345) -> dict:
    """Trustworthiness (TRUST_NEIGHBOURS) of `coords` on a random sample of `sample` points, and of an
    exact-k-NN UMAP layout of the same sample (the bound: within 0.02 of it)."""
    from core.explore import projection

    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(embeddings), min(sample, len(embeddings)), replace=False))
    data = np.ascontiguousarray(embeddings[rows])
    ours = projection.trustworthiness(data, coords[rows], TRUST_NEIGHBOURS)
    exact_layout = projection.project_umap(data)
    exact = projection.trustworthiness(data, exact_layout, TRUST_NEIGHBOURS)
    return {"trustworthiness": ours, "trustworthiness_exact": exact, "trust_sample": int(len(rows)),
            "quality_seconds": time.perf_counter() - started}


PHASES = {"knn": run_knn_phase, "statistics": run_statistics_phase, "map": run_map_phase}


def _child(phase: str, workdir: str) -> None:
    """One phase in this process: read the size's data, run, print the figures as one JSON line."""
    embeddings = np.load(Path(workdir) / "embeddings.npy")
    labels = np.load(Path(workdir) / "labels.npy")
    figures = PHASES[phase](embeddings, labels, workdir)
    figures["peak_rss_mb_self"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(figures), flush=True)


def _run_phase(phase: str, n: int, workdir: Path) -> dict:
    """The phase in a child process; its peak RSS from RUSAGE_CHILDREN, read in a wrapper process
    of its own so that an earlier phase's larger peak never masks this one's."""
    wrapper = ("import json, resource, subprocess, sys\n"
               "done = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, text=True)\n"
               "usage = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
               "print(json.dumps({'rc': done.returncode, 'out': done.stdout, 'peak': usage.ru_maxrss / 1024,\n"
               "                  'cpu': usage.ru_utime + usage.ru_stime}))\n")
    command = [sys.executable, "-c", wrapper, sys.executable, str(Path(__file__).resolve()),
               "--child", phase, "--workdir", str(workdir)]
    load_before = os.getloadavg()[0]
    result = json.loads(subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True).stdout)
    if result["rc"] != 0:
        raise SystemExit(f"phase {phase} at {n:,} failed (exit {result['rc']}); its output: {result['out'][-2000:]}")
    figures = json.loads(result["out"].strip().splitlines()[-1])
    figures.pop("peak_rss_mb_self", None)
    return {"phase": phase, "n": n, "seconds": round(figures.pop("seconds"), 1),
            "peak_rss_mb": round(result["peak"]), "cpu_seconds_process": round(result["cpu"], 1),
            "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)], **figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--phases", default="knn,statistics,map")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.workdir)
        return
    from bench.synthetic import clustered_embeddings

    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        raise SystemExit(f"--phases: unknown phase(s) {', '.join(unknown)}; choose from {', '.join(PHASES)}")
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="scale-stats-"))
    try:
        for n in (int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()):
            workdir = root / str(n)
            workdir.mkdir(parents=True, exist_ok=True)
            if not (workdir / "labels.npy").exists():
                embeddings, labels = clustered_embeddings(n, classes=args.classes, seed=0)
                np.save(workdir / "embeddings.npy", embeddings)
                np.save(workdir / "labels.npy", labels)
                del embeddings, labels
            knn_seconds = None
            for phase in phases:
                line = _run_phase(phase, n, workdir)
                if phase == "knn":
                    knn_seconds = line["seconds"]
                if phase == "statistics" and knn_seconds is not None:
                    line["with_knn_seconds"] = round(line["seconds"] + knn_seconds, 1)
                print(json.dumps(line), flush=True)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
