"""What exploring costs: the UMAP map against umap-learn's defaults, neighbour queries, a million points.

Sections (all by default; --sections picks some, --quick leaves out the slow `million`):

umap     70,000 × 64 embeddings mapped twice, each in a new `python` process sharing one numba cache
         folder (a new temporary one): ours (core.explore.projection.project_umap with its defaults: faiss
         k-NN handed to umap, fewer epochs, PCA init) and umap-learn's defaults
         (umap.UMAP(n_neighbors=15, min_dist=0.1).fit_transform, nothing else changed). Each is run
         once untimed first, so the timed run finds a warm cache ("warm" says what the timed run saw:
         core.explore.projection.numba_cache_is_warm for ours, the warm-up having run for umap's). Seconds
         are the call including the import of umap, and the whole process. Trustworthiness
         (sklearn, n_neighbors=15) of both maps on one 3,000-point sample. Also
         core.explore.projection.project_pca on the same data (the instant preview; goal under 3 s).
         Data: --embeddings PATH.npy (a run's stored embeddings), otherwise Fashion-MNIST's 70,000
         images (core.data.datasets' built-in loader) as pixels / 255, PCA to 64 dimensions (sklearn,
         randomized, seed 0), L2-normalised: "data": "fashion-mnist pixels PCA-64".
query    Latency of the exact index on that data: core.explore.search.NeighbourIndex.search of one row
         at a time (k=10) for 1,000 random rows, p50/p95/p99 ms; neighbours_of p95; a batch of 20
         and search_centroid of 20.
million  1,000,000 × 64 points around 1,000 Gaussian centres of mixed spread (0.3–1.5 per
         dimension), L2-normalised: the approximate index's build seconds and chosen parameters,
         recall@10 against exact (faiss.knn) for 1,000 new points from the same distribution (not
         stored, so not the build's calibration rows) and via neighbours_of for 1,000 random stored
         rows, single-query p50/p95 ms, save and load seconds, peak memory of the process.
         Goals: recall@10 ≥ 0.95, p95 ≤ 10 ms, under ~3 GB.
browser  The Explore page in headless Chromium (software WebGL, as the browser test) on a stored
         run of 70,000 (and, without --quick, 1,000,000) clustered points: seconds until the page's
         data is ready, the map's first paint after that, the bytes of the files it fetched, and
         click → neighbours (a click on a point until the "Nearest neighbours" panel is drawn).

    python bench/explore.py [--quick] [--sections umap,query,million] [--embeddings PATH.npy]

Prints one JSON object per line.

Measured on the idle 2-core dev machine (load average 1.3–2.5), 2026-11-23, the whole bench:
  umap: ours 14.3 s (warm cache; 38.5 s with compilation), trustworthiness 0.9783; umap-learn
    defaults 52.0 s, 0.9815; project_pca 0.05 s
  query, 70,000 exact: one row p50 0.38 ms, p95 0.45, p99 0.48; neighbours_of p95 0.48 ms
  million: build 16.4 s (IVF 4,000 lists, nprobe 5), recall@10 0.972 at build, 0.973 on new
    points, 0.969 via neighbours_of; one query p95 0.12 ms; peak RSS 1.18 GB
  browser, 70,000: page data ready 3.7 s after navigation, first paint 1.7 s after that; the map
    fetched 560,000 + 140,000 + 70,000 bytes (coordinates, labels, colours); 1,000,000: ready
    5.0 s, first paint 5.5 s after (8 MB + 2 MB + 1 MB)


2026-12-04 (issue 19), `python bench/explore.py --sections umap,query,browser` at load 1.5–2.8:
  umap: ours 19.9 s (warm), trustworthiness 0.9783; umap-learn defaults 56.1 s, 0.9817; project_pca 0.05–0.09 s
  query, 70,000 exact: one row p50 0.54 ms, p95 0.80, p99 0.92; neighbours_of p95 0.90 ms
  browser, 70,000: data ready 4.9 s, first paint 0.65 s after; click → neighbours 1.51 s
  browser, 1,000,000: data ready 9.2 s, first paint 6.7 s after; click → neighbours 3.97 s,
    3.6 s of it the page reading a million image rows for the labels on every rerun.
  After Explore kept a run's labels per process (core.explore.service._run_labels),
  `python bench/explore.py --sections browser`, load ~2: 70,000: data ready 4.6 s, first paint
  1.5 s after, click → neighbours 0.71 s; 1,000,000: data ready 6.9 s, first paint 5.3 s after,
  click → neighbours 0.39 s (goal 2 s).
  Beside two busy loops (`python -c "while True: pass"` ×2), the same command twice: 70,000: data
  ready 9.0 / 7.1 s, first paint 3.7 / 3.3 s after, click → neighbours 1.37 / 1.18 s; 1,000,000: data
  ready 10.6 / 10.9 s, first paint 10.6 / 10.0 s after (the 10 s goal just missed on a busy
  machine: software WebGL shares the two cores), click → neighbours 1.47 / 1.19 s.

2026-12-05, another 2-core machine, `python bench/explore.py` (the whole bench, load 1.5-2.6):
  umap: ours 14.5 s (warm), trustworthiness 0.9788; umap-learn defaults 47.6 s, 0.9812; project_pca 0.04-0.06 s
  query, 70,000 exact: one row p50 0.53 ms, p95 0.66, p99 0.76; neighbours_of p95 0.53 ms
  million: build 23.1 s (IVF 4,000 lists, nprobe 5; the build now runs on the process's thread
    share, which the load average left by the sections before gives one thread), recall@10 0.972
    at build, 0.973 on new points, 0.969 via neighbours_of; one query p95 0.08 ms; peak 1.18 GB
  browser, 70,000: data ready 3.8 s, first paint 0.49 s after, click → neighbours 0.50 s;
    1,000,000: data ready 5.8 s, first paint 4.3 s after, click → neighbours 0.41 s

Earlier, on the same machine shared with other workers (load average 1.6–5.8), two runs:
  umap, fashion-mnist pixels PCA-64 (70,000 × 64), timed runs found the cache warm:
    ours            map 19.3 s / 27.6 s (process 20.0 / 28.4), trustworthiness 0.9790 / 0.9802
    umap defaults   map 73.0 s / 92.7 s (process 74.2 / 94.1), trustworthiness 0.9807 / 0.9810
    (warm-up runs: ours 34 / 62 s with compilation, umap's 90 / 73 s)
    project_pca     0.05 s (0.4–1.6 s at a load average of 5.8)
  query, 70,000 exact: search of one row p50 0.42–0.53 ms, p95 0.52–0.80, p99 0.57–0.92;
    neighbours_of p95 0.54–1.56 ms; a batch of 20 7.7–8.6 ms; search_centroid of 20 0.5–0.6 ms.
    (Before core.explore.search answered small batches on one faiss thread: p50 16 ms, p95 20 ms at load 3.7.)
  million: build 31 s (load 1.6–5) / 64 s (load 3.9–5.7): IVF 4,000 lists, 160,000 training rows,
    nprobe 5, recall@10 0.972 at build; 0.973 on new points, 0.969 via neighbours_of of stored
    rows; single query p50 0.08–0.12 ms, p95 0.12–0.18 ms; save 0.3 s, load 0.6 s (260 MB on disk);
    peak RSS 0.95 GB (--sections million alone), 1.18 GB for the whole run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SECTIONS = ("umap", "query", "million", "browser")
TRUST_SAMPLE = 3000
TRUST_NEIGHBOURS = 15


def emit(record: dict) -> None:
    record["load_avg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(record), flush=True)


def percentiles_ms(seconds: list[float], which=(50, 95, 99)) -> dict:
    return {f"p{p}_ms": round(float(np.percentile(seconds, p)) * 1e3, 3) for p in which}


def peak_rss_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


# --- data ---------------------------------------------------------------------------------------

def fashion_pca64() -> np.ndarray:
    from sklearn.decomposition import PCA

    from core.data.datasets import load_builtin

    pixels, _, _, _ = load_builtin("fashion-mnist")
    flat = pixels.reshape(len(pixels), -1).astype(np.float32) / 255.0
    reduced = PCA(64, svd_solver="randomized", random_state=0).fit_transform(flat).astype(np.float32)
    return reduced / np.linalg.norm(reduced, axis=1, keepdims=True)


def explore_data(embeddings: str | None) -> tuple[np.ndarray, str]:
    if embeddings:
        data = np.load(embeddings).astype(np.float32)
        return data, f"embeddings {embeddings}"
    return fashion_pca64(), "fashion-mnist pixels PCA-64"


def mixture(d: int = 64, centres: int = 1_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian centres (centres, d) and their spreads per dimension, mixed from 0.3 to 1.5."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(centres, d)).astype(np.float32), rng.uniform(0.3, 1.5, size=centres).astype(np.float32)


def draw(n: int, middle: np.ndarray, spread: np.ndarray, seed: int) -> np.ndarray:
    """n float32 unit rows from the mixture, made 100,000 at a time (no float64 copy of them all)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, middle.shape[1]), dtype=np.float32)
    for start in range(0, n, 100_000):
        labels = rng.integers(0, len(middle), size=min(100_000, n - start))
        block = middle[labels] + rng.standard_normal((len(labels), middle.shape[1]), dtype=np.float32) * spread[labels, None]
        out[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


# --- umap ---------------------------------------------------------------------------------------

def umap_child(data_path: str, mode: str, coords_path: str) -> dict:
    """One map in this (new) process; the coordinates go to coords_path."""
    data = np.load(data_path)
    if mode == "ours":
        from core.explore.projection import numba_cache_is_warm, project_umap

        warm = numba_cache_is_warm()
        started = time.perf_counter()
        coords = project_umap(data)
    else:
        warm = None  # umap has no notion of it; the parent says whether its warm-up ran
        started = time.perf_counter()
        import umap

        coords = umap.UMAP(n_neighbors=15, min_dist=0.1).fit_transform(data)
    seconds = time.perf_counter() - started
    np.save(coords_path, np.asarray(coords, dtype=np.float32))
    return {"cache_looked_warm": warm, "map_s": round(seconds, 2)}


def run_umap_child(data_path: str, mode: str, cache: str, coords_path: str) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache, PYTHONWARNINGS="ignore")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", mode, "--data", data_path, "--coords", coords_path],
                          env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**result, "process_wall_s": round(time.perf_counter() - started, 2)}


def trustworthiness(data: np.ndarray, coords: np.ndarray, rows: np.ndarray) -> float:
    from sklearn.manifold import trustworthiness as sk_trust

    return round(float(sk_trust(data[rows], coords[rows], n_neighbors=TRUST_NEIGHBOURS)), 4)


def section_umap(data: np.ndarray, label: str) -> None:
    from core.explore.projection import project_pca

    timings = []
    for _ in range(3):
        started = time.perf_counter()
        project_pca(data)
        timings.append(time.perf_counter() - started)
    emit({"section": "umap", "what": "project_pca", "data": label, "n": len(data), "d": data.shape[1],
          "seconds_min": round(min(timings), 3), "seconds_max": round(max(timings), 3), "goal_s": 3.0})

    rows = np.random.default_rng(1).permutation(len(data))[:TRUST_SAMPLE]
    with tempfile.TemporaryDirectory(prefix="bench-explore-") as tmp:
        data_path = os.path.join(tmp, "data.npy")
        np.save(data_path, data)
        cache = os.path.join(tmp, "numba-cache")
        os.makedirs(cache)
        for mode, name in (("ours", "project_umap defaults"), ("umap", "umap.UMAP(n_neighbors=15, min_dist=0.1)")):
            coords_path = os.path.join(tmp, f"{mode}.npy")
            warmup = run_umap_child(data_path, mode, cache, coords_path)
            timed = run_umap_child(data_path, mode, cache, coords_path)
            emit({"section": "umap", "what": name, "data": label, "n": len(data), "d": data.shape[1],
                  "warm": True if mode == "umap" else timed["cache_looked_warm"],
                  "warmup_map_s": warmup["map_s"], "map_s": timed["map_s"], "process_wall_s": timed["process_wall_s"],
                  f"trustworthiness_{TRUST_NEIGHBOURS}nn_{TRUST_SAMPLE}": trustworthiness(data, np.load(coords_path), rows)})


# --- queries ------------------------------------------------------------------------------------

def single_query_latency(index, queries: np.ndarray, k: int = 10) -> list[float]:
    seconds = []
    for query in queries:
        started = time.perf_counter()
        index.search(query, k)
        seconds.append(time.perf_counter() - started)
    return seconds


def neighbours_latency(index, rows: np.ndarray, k: int = 10) -> list[float]:
    seconds = []
    for row in rows:
        started = time.perf_counter()
        index.neighbours_of(int(row), k)
        seconds.append(time.perf_counter() - started)
    return seconds


def section_query(data: np.ndarray, label: str) -> None:
    from core.explore.search import NeighbourIndex

    started = time.perf_counter()
    index = NeighbourIndex(data)
    build = time.perf_counter() - started
    rows = np.random.default_rng(2).choice(len(data), 1000, replace=False)
    single_query_latency(index, data[rows[:50]])  # warm caches
    batch = []
    for start in range(0, 200, 20):
        began = time.perf_counter()
        index.search(data[rows[start:start + 20]], 10)
        batch.append(time.perf_counter() - began)
    centroid = []
    for start in range(0, 200, 20):
        began = time.perf_counter()
        index.search_centroid(data[rows[start:start + 20]], 10)
        centroid.append(time.perf_counter() - began)
    emit({"section": "query", "data": label, "n": len(data), "index": index.describe(), "build_s": round(build, 3),
          "search_one_row_k10": percentiles_ms(single_query_latency(index, data[rows])),
          "neighbours_of_k10": percentiles_ms(neighbours_latency(index, rows), (50, 95)),
          "batch_of_20_k10_p50_ms": round(float(np.median(batch)) * 1e3, 2),
          "search_centroid_of_20_k10_p50_ms": round(float(np.median(centroid)) * 1e3, 2)})


# --- a million ----------------------------------------------------------------------------------

def section_million() -> None:
    import faiss

    from core.explore.search import NeighbourIndex

    started = time.perf_counter()
    middle, spread = mixture()
    data = draw(1_000_000, middle, spread, seed=1)
    made = time.perf_counter() - started
    started = time.perf_counter()
    index = NeighbourIndex(data)
    build = time.perf_counter() - started
    rss_after_build = peak_rss_mb()

    # new points from the same distribution, not stored: nothing the build measured itself on
    queries = draw(1_000, middle, spread, seed=2)
    rng = np.random.default_rng(3)
    _, truth = faiss.knn(queries, data, 10, metric=faiss.METRIC_INNER_PRODUCT)
    _, found = index.search(queries, 10)
    recall_new = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)]))

    rows = rng.choice(len(data), 1_000, replace=False)
    _, exact = faiss.knn(data[rows], data, 11, metric=faiss.METRIC_INNER_PRODUCT)
    recall_rows = float(np.mean([len(set(index.neighbours_of(int(r), 10)[1]) & set(e[e != r][:10])) / 10
                                 for r, e in zip(rows, exact)]))

    single_query_latency(index, queries[:50])  # warm caches
    latency = single_query_latency(index, queries)
    neighbours = neighbours_latency(index, rows)

    with tempfile.TemporaryDirectory(prefix="bench-explore-index-") as folder:
        began = time.perf_counter()
        index.save(folder)
        saved = time.perf_counter() - began
        size_mb = sum(p.stat().st_size for p in Path(folder).iterdir()) / 2**20
        began = time.perf_counter()
        loaded = NeighbourIndex.load(folder, expected_rows=len(data))
        load = time.perf_counter() - began
        same = bool(np.array_equal(loaded.search(queries[:100], 10)[1], index.search(queries[:100], 10)[1]))
    emit({"section": "million", "n": len(data), "d": data.shape[1], "data_s": round(made, 1),
          "kind": index.kind, "params": index.params, "index": index.describe(), "build_s": round(build, 1),
          "recall_at_10_measured_at_build": round(index.recall_at_10, 4),
          "recall_at_10_new_points": round(recall_new, 4), "recall_at_10_neighbours_of_stored_rows": round(recall_rows, 4),
          "search_one_k10": percentiles_ms(latency), "neighbours_of_k10": percentiles_ms(neighbours, (50, 95)),
          "save_s": round(saved, 2), "load_s": round(load, 2), "files_mb": round(size_mb), "loaded_answers_same": same,
          "peak_rss_mb_after_build": rss_after_build, "peak_rss_mb": peak_rss_mb(),
          "goals": {"recall_at_10": 0.95, "p95_ms": 10.0, "memory_gb": 3.0}})


def section_browser(n: int) -> None:
    """The Explore page in headless Chromium with software WebGL (the browser test's setup) on a
    stored run of n clustered points made without training (tests.helpers.clustered_run, with its
    statistics computed as the run's job would): seconds from navigation until the page's data is
    ready (the map heading is drawn), the component's first paint after it received its data, and
    the bytes of every file the map fetched."""
    import shutil
    import socket
    import urllib.request

    from playwright.sync_api import sync_playwright

    home = Path(tempfile.mkdtemp(prefix="bench-explore-")) / "lab"
    env = dict(os.environ, EMBEDDING_LAB_HOME=str(home), PYTHONUNBUFFERED="1")
    env.pop("EMBEDDING_LAB_DB", None)
    os.environ.update(EMBEDDING_LAB_HOME=str(home))
    os.environ.pop("EMBEDDING_LAB_DB", None)
    from core.runs.worker import compute_statistics
    from storage.db import make_engine
    from tests.helpers import clustered_run

    engine = make_engine()
    started = time.perf_counter()
    made = clustered_run(engine, n, umap=True)
    statistics = "skipped (a million-point run's statistics are a long job)"
    if n <= 200_000:
        statistics = compute_statistics(engine, made["run_id"]).status
    prepare_s = time.perf_counter() - started
    engine.dispose()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2)
                break
            except OSError:
                time.sleep(0.25)
        fetched = {}
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
                "--headless", "--no-sandbox", "--disable-background-networking", "--disable-component-update",
                "--no-first-run", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})

            def on_response(response) -> None:
                if "/app/static/maps/" in response.url and "sheet-" not in response.url:
                    try:
                        fetched[response.url.rsplit("/", 1)[1]] = len(response.body())
                    except Exception:
                        pass

            page.on("response", on_response)
            t0 = time.perf_counter()
            page.goto(f"http://127.0.0.1:{port}/explore")
            page.get_by_role("heading", name="Map (UMAP)").wait_for(timeout=600_000)
            data_ready_s = time.perf_counter() - t0
            frame = None
            while frame is None and time.perf_counter() - t0 < 600:
                candidate = next((f for f in page.frames if "embedding_map" in f.url), None)
                try:
                    if candidate is not None and candidate.evaluate("() => window.__map && window.__map.ready"):
                        frame = candidate
                except Exception:
                    pass
                page.wait_for_timeout(100)
            total_s = time.perf_counter() - t0
            paint_ms = frame.evaluate("() => window.__map.firstPaintMs")
            drawn = frame.evaluate("() => window.__map.points")
            # click → neighbours: a click on a point until the page shows that point's neighbours
            # (the component's message, the rerun, the index's query, the panel drawn)
            x, y = frame.evaluate("() => window.__map.getScreenPosition(0)")
            box = frame.locator("#canvas").bounding_box()
            clicked = time.perf_counter()
            page.mouse.click(box["x"] + x, box["y"] + y)
            page.get_by_role("heading", name="Nearest neighbours").wait_for(timeout=120_000)
            click_s = time.perf_counter() - clicked
            browser.close()
        emit({"section": "browser", "points": n, "drawn": drawn, "prepare_s": round(prepare_s, 1),
              "statistics": statistics, "page_data_ready_s": round(data_ready_s, 2),
              "first_paint_after_data_ms": round(paint_ms), "navigation_to_painted_s": round(total_s, 2),
              "click_to_neighbours_s": round(click_s, 2), "goal_click_to_neighbours_s": 2.0,
              "map_files_bytes": fetched, "goal_first_paint_s": 5.0})
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        shutil.rmtree(home.parent, ignore_errors=True)
        from core.explore.map_files import prune_other_homes

        prune_other_homes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="leave out the million-point section")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--embeddings", help="an (N, d) .npy of embeddings instead of Fashion-MNIST PCA-64")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--coords", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(umap_child(args.data, args.child, args.coords)))
        return
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    if args.quick:
        sections = [s for s in sections if s != "million"]
    if "umap" in sections or "query" in sections:
        data, label = explore_data(args.embeddings)
        if "umap" in sections:
            section_umap(data, label)
        if "query" in sections:
            section_query(data, label)
    if "million" in sections:
        section_million()
    if "browser" in sections:
        for n in (70_000,) if args.quick else (70_000, 1_000_000):
            section_browser(n)


if __name__ == "__main__":
    main()
