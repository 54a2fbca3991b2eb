"""2-D projections of embeddings: PCA as an instant preview, UMAP as the map.

UMAP's cost in a new process is mostly numba compilation, not arithmetic. Three things cut it:

* **Caching every jitted function.** umap-learn marks only a few of its numba functions
  `cache=True`; the rest (the layout's epoch function, `smooth_knn_dist`,
  `compute_membership_strengths`, ...) were compiled again by every process. After importing
  umap we call `enable_caching()` on each numba dispatcher of umap and pynndescent, so they are
  written to and read from NUMBA_CACHE_DIR (parallel=True functions included). numba keys a
  cache file by the Python function's name and bytecode, not by its options, and umap builds its
  serial and parallel layout functions from one Python function: cached as they are, a seeded
  (serial) map would load the parallel machine code or the other way round. The serial twin is
  therefore rebuilt from a renamed copy of the same function object, so each has its own file.
* **Neighbours from faiss.** The exact k-NN is computed with faiss and handed to umap as
  `precomputed_knn`, so pynndescent's NNDescent (and its compilation) never runs, nor does
  umap's all-pairs path under 4,096 points.
* **Fewer layout epochs, PCA init above 10k points** (see `layout_plan` and LARGE_MAP).

Progress: `project_umap(..., on_progress=f)` calls `f(phase, fraction, message)`; see its
docstring for the contract. Layout epochs are observed through umap's documented `tqdm_kwds`
parameter: umap wraps its epoch loop in tqdm, and we give tqdm a file object of ours and a
bar format of "{n}/{total}", so each refresh tells us how many epochs are done. The optimisation
itself is untouched (one call, umap's own learning-rate schedule).
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
import types
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from core.threads import thread_share

UMAP_DEFAULTS = {"n_neighbors": 15, "min_dist": 0.1, "metric": "euclidean", "seed": None}

# Import + compilation of umap's numba code in a new process with an empty cache, measured with
# `python bench/projection.py --baseline` on the 2-core dev machine: 25.8 s (import 18.1 + compile
# 7.7) at a load average of 2.2, 24.4 s at 1.4, 35.1 s (24.6 + 10.5) at 3.9. The cold import itself
# compiles pynndescent's and umap's cache=True functions. A loaded machine takes several times
# longer (a 4 min 43 s first map was seen before this cache existed).
COLD_COMPILE_SECONDS = 30.0

# Layout epochs and init by size, measured on bench/projection.py's data (L2-normalised clustered
# 64-d points and its first 10k; digits), precomputed k-NN, warm process, 2 loaded cores; T is the
# trustworthiness on a 3,000-point subsample with 10 neighbours:
#   10,000 points: 500 epochs (umap's default up to 10k) spectral 12.7 s, T 0.9874;
#                  200 epochs spectral 4.6 s, T 0.9871;  200 epochs PCA 4.5 s, T 0.9870
#   70,000 points: 200 epochs spectral (umap's default) 30.3 s, T 0.9867; 200 PCA 28.7 s, T 0.9866;
#                  100 epochs PCA 14.5 s, T 0.9866  (DESIGN: 24 CPU-s against 66 for the defaults)
#    1,797 digits: 500 epochs 1.0–1.3 s, T 0.988; 200 epochs 0.45–0.5 s, T 0.987
# So: 200 epochs with umap's spectral init up to LARGE_MAP points, 100 epochs with PCA init above
# (spectral init of a 70k graph costs seconds and buys nothing measurable there).
LARGE_MAP = 10_000
SMALL_EPOCHS = 200
LARGE_EPOCHS = 100

# Maps of more than LANDMARKS_ABOVE points fit umap on LANDMARKS of them and place the rest from the
# run's k-NN (see project_umap; figures in bench/scale_stats.py). LANDMARK_EXACT_UP_TO: landmarks'
# own k-NN exact up to this many, IVF above.
LANDMARKS_ABOVE = 200_000
LANDMARKS = 100_000
LANDMARK_EXACT_UP_TO = 20_000

ProgressFn = Callable[[str, Optional[float], str], None]
PHASES = ("importing", "compiling", "neighbours", "layout", "done")

_lock = threading.Lock()
_compiled: set[bool] = set()  # layout variants (parallel?) already compiled or loaded in this process
_caching_enabled = False
_COLD_RECORD = "embedding-lab-cold-compile.json"


def params_key(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


def project_pca(embeddings: np.ndarray) -> np.ndarray:
    """(N, d) → (N, 2) float32 along the two main axes; milliseconds for 70k × 128."""
    centred = embeddings - embeddings.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred[: min(len(centred), 20_000)], full_matrices=False)
    return (centred @ vt[:2].T).astype(np.float32)


def layout_plan(n_points: int) -> dict:
    """umap's `n_epochs` and `init` for a map of n_points (see LARGE_MAP)."""
    if n_points > LARGE_MAP:
        return {"n_epochs": LARGE_EPOCHS, "init": "pca"}
    # umap's spectral init fails on a handful of points (scipy's eigsh wants k < N)
    return {"n_epochs": SMALL_EPOCHS, "init": "spectral" if n_points >= 64 else "pca"}


def project_umap(embeddings: np.ndarray, n_neighbors: int = 15, min_dist: float = 0.1,
                 metric: str = "euclidean", seed: int | None = None,
                 on_progress: ProgressFn | None = None, init: np.ndarray | None = None,
                 n_epochs: int | None = None, learning_rate: float = 1.0,
                 knn: tuple[np.ndarray, np.ndarray] | None = None, landmarks: int | None = None) -> np.ndarray:
    """(N, d) → (N, 2) float32 with umap-learn. Slow to import and to compile the first time on a
    machine: call it from a worker process, never a page's script thread. A seed makes it
    repeatable but single-threaded; None lets umap use every core. init (N, 2): start the layout
    there (umap rescales each axis to [0, 10] first) instead of `layout_plan`'s; n_epochs: layout
    epochs instead of `layout_plan`'s (core.explore.evolution lays out one epoch from the next this way).
    knn: (ids, distances), each (N, n_neighbors), own point first, in `metric`'s distance: the run's
    k-NN computed once (core.explore.knn.for_umap); then no neighbour search happens here.
    landmarks: fit umap on this many randomly chosen points (with their own k-NN among themselves)
    and place every other point at the weighted mean of its k-NN's coordinates (place_by_neighbours);
    None = LANDMARKS above LANDMARKS_ABOVE points, 0 = never. The layout's fractions then cover the
    landmarks' epochs, and the placing happens before the final 1.0.

    on_progress(phase, fraction, message), phases always in this order, each announced once
    with fraction None when it starts, from the calling thread:
      "importing"   importing umap-learn (seconds; tens of seconds on a cold machine);
      "compiling"   first use of umap's numba code in this process; the message says whether the
                    cache looked warm ("loading compiled numba code from the cache") or not
                    ("compiling numba code for the first time on this machine: usually about N s");
                    a process that already compiled it says so and the phase lasts microseconds;
      "neighbours"  the exact k-NN with faiss (umap's own search for metrics other than
                    euclidean and cosine);
      "layout"      then again with fractions 0.0 ≤ f ≤ 1.0 of layout epochs done, non-decreasing,
                    at least every 2 % of the epochs, the last one exactly 1.0;
      "done"        fraction 1.0; the message gives the seconds of each phase.
    An exception raised by on_progress propagates (a caller may use that to cancel).
    """
    report = on_progress or (lambda phase, fraction, message: None)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    n = len(embeddings)
    data = np.ascontiguousarray(embeddings, dtype=np.float32)

    if n <= 2:  # nothing to lay out (umap itself refuses or returns zeros): no import, no compile
        for phase in ("importing", "compiling", "neighbours", "layout"):
            report(phase, None, f"{n} point(s): nothing to lay out")
        report("layout", 0.0, "0/0 epochs")
        report("layout", 1.0, "0/0 epochs")
        report("done", 1.0, "done")
        return np.zeros((n, 2), dtype=np.float32) if n < 2 else project_pca(data)

    warm = numba_cache_is_warm(seeded=seed is not None)
    report("importing", None, "importing umap-learn")
    t = time.perf_counter()
    umap = _import_umap()
    timings["importing"] = time.perf_counter() - t

    parallel = seed is None  # umap runs its layout serially when given a random_state
    with _lock:
        already = parallel in _compiled
    if already:
        report("compiling", None, "numba code already compiled in this process")
    elif warm:
        report("compiling", None, "loading compiled numba code from the cache")
    else:
        report("compiling", None, "compiling numba code for the first time on this machine: usually about "
                                  f"{typical_cold_compile_seconds():.0f} s")
    t = time.perf_counter()
    if not already:
        _warm_up(umap, parallel)
    timings["compiling"] = time.perf_counter() - t
    if not warm and not already:
        _record_cold_compile(timings["importing"] + timings["compiling"])

    k = max(2, min(n_neighbors, n - 1))
    if knn is not None:
        ids, distances = (np.asarray(part) for part in knn)
        if ids.shape != distances.shape or ids.ndim != 2 or len(ids) != n or ids.shape[1] < k:
            raise ValueError(f"the k-NN given for {n:,} points has shape {ids.shape} (distances {distances.shape}); "
                             f"it must be ({n}, at least {k})")
        knn = (np.ascontiguousarray(ids[:, :k], dtype=np.int64), np.ascontiguousarray(distances[:, :k], dtype=np.float32))
        report("neighbours", None, f"the run's {k}-NN of {n:,} points, computed once per run")
    else:
        report("neighbours", None, f"exact {k}-NN of {n:,} points with faiss" if metric in ("euclidean", "cosine")
               else f"{k}-NN of {n:,} points with umap's own search ({metric})")
    t = time.perf_counter()
    if knn is None:
        knn = exact_knn(data, k, metric) if metric in ("euclidean", "cosine") else None
    fit_rows, full_knn, fit_data = None, None, data
    if landmarks is None:
        landmarks = LANDMARKS if n > LANDMARKS_ABOVE else 0
    if knn is not None and metric in ("euclidean", "cosine") and 2 < landmarks < n:
        # umap fits a landmark sample, with the landmarks' own k-NN among themselves; the rest are
        # placed from the whole k-NN afterwards (place_by_neighbours)
        fit_rows = np.sort(np.random.default_rng(0 if seed is None else seed).choice(n, int(landmarks), replace=False))
        fit_data, full_knn = np.ascontiguousarray(data[fit_rows]), knn
        knn = landmark_knn(fit_data, k, metric)
    timings["neighbours"] = time.perf_counter() - t

    plan = layout_plan(len(fit_data))
    if init is not None:
        plan["init"] = np.asarray(init, dtype=np.float32) if fit_rows is None else np.asarray(init, np.float32)[fit_rows]
    if n_epochs is not None:
        plan["n_epochs"] = int(n_epochs)
    total = plan["n_epochs"]
    init_name = plan["init"] if isinstance(plan["init"], str) else "given"
    report("layout", None, f"{total} epochs, {init_name} init"
           + (f", fitted on {len(fit_rows):,} landmarks, the other points placed by their neighbours"
              if fit_rows is not None else ""))
    report("layout", 0.0, f"0/{total} epochs")
    t = time.perf_counter()
    epochs = _EpochReader(report, total)
    reducer = umap.UMAP(n_neighbors=k, min_dist=min_dist, metric=metric, random_state=seed,
                        n_epochs=plan["n_epochs"], init=plan["init"], learning_rate=learning_rate,
                        precomputed_knn=(knn[0], knn[1], None) if knn is not None else (None, None, None),
                        tqdm_kwds=epochs.tqdm_kwds())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"precomputed_knn\[2\]")
        warnings.filterwarnings("ignore", message=r"n_jobs value")
        coords = reducer.fit_transform(fit_data).astype(np.float32)
    if fit_rows is not None:
        coords = _place_the_rest(data, fit_rows, coords, full_knn)
    epochs.finish()
    timings["layout"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started
    scheme = f", {len(fit_rows):,} landmarks" if fit_rows is not None else ""
    report("done", 1.0, f"{n:,} points in {timings['total']:.1f} s{scheme} ("
           + ", ".join(f"{p} {timings[p]:.1f} s" for p in ("importing", "compiling", "neighbours", "layout")) + ")")
    return coords


def landmark_knn(data: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The landmarks' k-NN among themselves (own point first), from an IVF index (core.explore.knn)."""
    from core.explore import knn as run_knn

    found = run_knn.compute_run_knn(data, width=k, approximate=len(data) > LANDMARK_EXACT_UP_TO)
    neighbours = run_knn.for_umap(found, k, metric)
    if neighbours is None:  # euclidean on rows of any length: faiss's exact L2
        neighbours = exact_knn(data, k, metric)
    return neighbours


def _place_the_rest(data: np.ndarray, fit_rows: np.ndarray, fitted: np.ndarray,
                    knn: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The whole map from the landmarks' coordinates: place_by_neighbours through the whole k-NN,
    and points it never reaches at their nearest landmark's place (faiss, exact)."""
    import faiss

    n = len(data)
    coords = np.full((n, 2), np.nan, dtype=np.float32)
    coords[fit_rows] = fitted
    placed = np.zeros(n, dtype=bool)
    placed[fit_rows] = True
    coords = place_by_neighbours(coords, placed, knn[0], knn[1])
    lost = np.flatnonzero(~np.isfinite(coords).all(axis=1))
    if len(lost):
        index = faiss.IndexFlatL2(data.shape[1])
        index.add(np.ascontiguousarray(data[fit_rows]))
        _, nearest = index.search(np.ascontiguousarray(data[lost]), 1)
        coords[lost] = fitted[nearest[:, 0]]
    return coords


def exact_knn(data: np.ndarray, k: int, metric: str = "euclidean") -> tuple[np.ndarray, np.ndarray]:
    """(indices int64 (N, k), distances float32 (N, k)), exact, nearest first, each row's own
    point first at distance 0 (as umap's own k-NN returns it, duplicates included).

    euclidean on unit-length rows (the app's embeddings) and cosine use core.explore.search's inner-product
    index: euclidean = sqrt(2 − 2·sim), cosine distance = 1 − sim. euclidean on other rows uses
    faiss's exact L2 index, so the metric asked for is the one used."""
    import faiss

    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"exact_knn supports euclidean and cosine, not {metric!r}")
    data = np.ascontiguousarray(data, dtype=np.float32)
    n = len(data)
    k = max(1, min(int(k), n))
    # faiss's OpenMP threads spin while they wait: on a machine whose cores were already busy,
    # two threads on 2 cores took 26–30 s for the 70k × 64 k-NN against 11 s for one (6 s with
    # two on an idle machine). So this process's share of the cores (core.threads).
    previous_threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(thread_share())
    try:
        ids, distances = _faiss_knn(data, k, metric)
    finally:
        faiss.omp_set_num_threads(previous_threads)
    return _own_point_first(ids.astype(np.int64), distances.astype(np.float32))


def _faiss_knn(data: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    from core.explore.search import NeighbourIndex

    norms = np.linalg.norm(data, axis=1)
    if metric == "cosine" or (metric == "euclidean" and np.allclose(norms, 1.0, atol=1e-3)):
        index = NeighbourIndex(data)
        distances, ids = index.search(data, k)  # unit-sphere euclidean
        if metric == "cosine":
            distances = np.clip(distances * distances / 2.0, 0.0, 2.0)  # 1 − sim
    else:  # euclidean on rows of any length
        index = faiss.IndexFlatL2(data.shape[1])
        index.add(data)
        squared, ids = index.search(data, k)
        distances = np.sqrt(np.clip(squared, 0.0, None))
    return ids, distances


def _own_point_first(ids: np.ndarray, distances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row i starts with i at distance exactly 0 (a float rounding of sqrt(2 − 2·1) is not 0,
    and umap's rho is the first non-zero distance); ties with duplicates can put i later or drop it."""
    n, k = ids.shape
    rows = np.arange(n)
    is_self = ids == rows[:, None]
    # rows where i is present: move it to the front, keeping the others' order
    order = np.argsort(np.where(is_self, -1, np.arange(k)[None, :]), axis=1, kind="stable")
    ids = np.take_along_axis(ids, order, axis=1)
    distances = np.take_along_axis(distances, order, axis=1)
    missing = ~is_self.any(axis=1)
    if missing.any():  # i fell off the end behind duplicates: put it first, drop the last
        ids[missing, 1:] = ids[missing, :-1].copy()
        distances[missing, 1:] = distances[missing, :-1].copy()
        ids[missing, 0] = rows[missing]
    distances[:, 0] = 0.0
    return np.ascontiguousarray(ids), np.ascontiguousarray(distances)


class _EpochReader:
    """A file object for tqdm: umap refreshes a bar formatted "{n}/{total}" after each epoch; we
    turn that into on_progress("layout", n / total) at least every 2 % of the epochs."""

    def __init__(self, report: ProgressFn, total: int) -> None:
        self._report, self._total = report, max(1, total)
        self._step = max(1, self._total // 50)
        self._last = 0

    def tqdm_kwds(self) -> dict:
        return {"disable": False, "file": self, "bar_format": "{n}/{total}", "mininterval": 0, "miniters": 1}

    def write(self, text: str) -> int:
        for piece in text.replace("\r", "\n").split("\n"):
            done, _, total = piece.strip().partition("/")
            if done.isdigit() and total.isdigit() and int(total) > 0:
                self._total = int(total)
                self._epoch(int(done))
        return len(text)

    def flush(self) -> None:
        pass

    def _epoch(self, done: int) -> None:
        if done >= self._total:
            return  # finish() reports 1.0 once the fit has returned
        if done - self._last >= self._step:
            self._last = done
            self._report("layout", done / self._total, f"{done}/{self._total} epochs")

    def finish(self) -> None:
        self._report("layout", 1.0, f"{self._total}/{self._total} epochs")


def _import_umap():
    """Import umap-learn (NUMBA_CACHE_DIR set first) and make its numba functions cache to disk."""
    if not os.environ.get("NUMBA_CACHE_DIR"):
        os.environ["NUMBA_CACHE_DIR"] = _numba_cache()
        if "numba" in sys.modules:  # numba read its settings at import, before the folder was set
            from numba.core import config

            config.reload_config()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tensorflow / parametric-umap chatter
        import umap  # imported here: 20+ s cold, never at import time of a page
    _enable_numba_caching()
    return umap


def _enable_numba_caching() -> None:
    """enable_caching() on every numba dispatcher of umap and pynndescent that lacks it."""
    global _caching_enabled
    with _lock:
        if _caching_enabled:
            return
        import numba
        from numba.core.dispatcher import Dispatcher

        found: dict[int, tuple[list[tuple[types.ModuleType, str]], Dispatcher]] = {}
        for name, module in list(sys.modules.items()):
            if module is None or name.split(".")[0] not in ("umap", "pynndescent"):
                continue
            for attr, value in list(vars(module).items()):
                if isinstance(value, Dispatcher):
                    found.setdefault(id(value), ([], value))[0].append((module, attr))
        by_code: dict[types.CodeType, list] = {}
        for places, dispatcher in found.values():
            by_code.setdefault(dispatcher.py_func.__code__, []).append((places, dispatcher))
        for twins in by_code.values():
            # sort so the parallel=True one (the app's default path) keeps the original name
            twins.sort(key=lambda item: not item[1].targetoptions.get("parallel", False))
            (_, first), rest = twins[0], twins[1:]
            try:
                first.enable_caching()
            except Exception:  # noqa: BLE001 - an uncacheable function is compiled as before
                continue
            for places, dispatcher in rest:
                # same bytecode, other options: numba would share one cache file between them
                options = {key: value for key, value in dispatcher.targetoptions.items() if key != "nopython"}
                func = dispatcher.py_func
                copy = types.FunctionType(func.__code__, func.__globals__, func.__name__, func.__defaults__,
                                          func.__closure__)
                suffix = "_".join(f"{key}_{value}" for key, value in sorted(options.items())
                                  if first.targetoptions.get(key) != value)
                copy.__qualname__ = f"{func.__qualname__}__{suffix or 'twin'}"
                copy.__module__ = func.__module__
                copy.__kwdefaults__ = func.__kwdefaults__
                rebuilt = numba.njit(cache=True, locals=dict(dispatcher.locals), **options)(copy)
                for module, attr in places:
                    setattr(module, attr, rebuilt)
        _caching_enabled = True


def _warm_up(umap, parallel: bool) -> None:
    """A tiny fit through exactly the code path of a real map (same dtypes, precomputed k-NN, same
    serial or parallel layout), so compilation or cache loading happens here, not inside the
    timed layout."""
    with _lock:
        if parallel in _compiled:
            return
    rng = np.random.default_rng(0)
    data = rng.normal(size=(48, 4)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    ids, dists = exact_knn(data, 5)
    reducer = umap.UMAP(n_neighbors=5, n_epochs=11, init="random", random_state=None if parallel else 0,
                        precomputed_knn=(ids, dists, None), tqdm_kwds={"disable": True})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reducer.fit_transform(data)
    with _lock:
        _compiled.add(parallel)


# the cache files of a warm machine: umap's fuzzy-set functions and the layout's epoch function,
# whose serial twin (seeded maps) is cached under its own name (see _enable_numba_caching)
_WARM_MARKERS = ("umap_.smooth_knn_dist-", "umap_.compute_membership_strengths-")
_LAYOUT_MARKER = {False: "layouts._optimize_layout_euclidean_single_epoch-",
                  True: "layouts._optimize_layout_euclidean_single_epoch__parallel_False-"}


def numba_cache_is_warm(seeded: bool = False) -> bool:
    """Whether this machine's numba cache already holds umap's compiled map code (newer than the
    installed umap's source), so the next map in a new process skips the long compilation.
    seeded: for a map with a seed (umap's serial layout) rather than the default parallel one.
    Reads file names only: it imports neither umap nor numba."""
    from importlib.util import find_spec

    cache = Path(_cache_dir())
    spec = find_spec("umap")
    if spec is None or not spec.submodule_search_locations or not cache.is_dir():
        return False
    source = Path(list(spec.submodule_search_locations)[0])
    try:
        oldest_ok = max((source / name).stat().st_mtime for name in ("layouts.py", "umap_.py"))
    except OSError:
        return False
    for marker in (*_WARM_MARKERS, _LAYOUT_MARKER[bool(seeded)]):
        hits = [p for p in cache.glob(f"umap*/{marker}*.nbi") if p.stat().st_mtime >= oldest_ok
                and any(p.parent.glob(p.name[: -len(".nbi")] + ".*.nbc"))]
        if not hits:
            return False
    return True


def typical_cold_compile_seconds() -> float:
    """Seconds a first map takes to import and compile on this machine: the last cold compile
    recorded in the numba cache folder, else COLD_COMPILE_SECONDS (measured on the 2-core dev box)."""
    try:
        return float(json.loads((Path(_cache_dir()) / _COLD_RECORD).read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return COLD_COMPILE_SECONDS


def _record_cold_compile(seconds: float) -> None:
    try:
        path = Path(_cache_dir()) / _COLD_RECORD
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"seconds": round(seconds, 1)}))
        tmp.replace(path)
    except OSError:
        pass


def _cache_dir() -> str:
    return os.environ.get("NUMBA_CACHE_DIR") or _numba_cache()


def _numba_cache() -> str:
    from storage.settings import data_home

    path = data_home() / "numba-cache"
    path.mkdir(exist_ok=True)
    return str(path)


def trustworthiness(data: np.ndarray, coords: np.ndarray, n_neighbors: int = 10, block: int = 256) -> float:
    """scikit-learn's `sklearn.manifold.trustworthiness` (euclidean), in bounded memory: how much the
    map's n_neighbors nearest neighbours of each point are also near in `data` (1 = all of them).
    Each point's map neighbours are ranked in data space by counting the points nearer to it, a
    block of rows at a time, so 10,000 points take (block × N) distances at once, not sklearn's
    N × N distances and their N × N argsort (1.6 GB at 10,000). Equal to sklearn's without ties."""
    import faiss

    data = np.ascontiguousarray(data, dtype=np.float32)
    coords = np.ascontiguousarray(coords, dtype=np.float32)
    n = len(data)
    k = int(n_neighbors)
    if len(coords) != n or not 1 <= k < n / 2:
        raise ValueError(f"trustworthiness needs as many map points as data points ({n} and {len(coords)}) "
                         f"and n_neighbors from 1 to below half of them, got {k}")
    flat = faiss.IndexFlatL2(coords.shape[1])
    flat.add(coords)
    _, found = flat.search(coords, k + 1)
    rows = np.arange(n)
    # drop each point itself wherever the search put it (duplicates can push it out: then the last)
    is_self = found == rows[:, None]
    keep = np.where(is_self.any(axis=1, keepdims=True), ~is_self, np.arange(k + 1)[None, :] < k)
    near_on_map = found[keep].reshape(n, k)
    squared = (data.astype(np.float64) ** 2).sum(axis=1)
    penalty = 0.0
    for start in range(0, n, block):
        part = slice(start, min(n, start + block))
        distance = squared[part, None] + squared[None, :] - 2.0 * (data[part].astype(np.float64) @ data.T.astype(np.float64))
        distance[np.arange(part.stop - part.start), rows[part]] = np.inf  # itself is nobody's neighbour
        target = np.take_along_axis(distance, near_on_map[part], axis=1)  # (b, k)
        rank = (distance[:, None, :] < target[:, :, None]).sum(axis=2) + 1  # 1 = the nearest in data
        penalty += np.clip(rank - k, 0, None).sum()
    return float(1.0 - penalty * 2.0 / (n * k * (2.0 * n - 3.0 * k - 1.0)))


def place_by_neighbours(coords: np.ndarray, placed: np.ndarray, ids: np.ndarray, distances: np.ndarray,
                        rounds: int = 20, smoothing: int = 2) -> np.ndarray:
    """Coordinates for the points not `placed` from their k-NN: each is put at the weighted mean of
    its placed neighbours (weights exp(−(d − d₁)/σ) as umap's fuzzy set, σ = its neighbours' mean
    distance gap), round after round so that points with no placed neighbour are reached through
    those placed the round before; then `smoothing` rounds move every unplaced point to the mean of
    all its (now placed) neighbours, so they spread along their neighbourhood instead of sitting
    on one landmark. Points the graph never reaches stay NaN (the caller places them).

    coords (N, 2) with finite rows where placed; ids / distances (N, W) own point first."""
    coords = np.array(coords, dtype=np.float32, copy=True)
    placed = np.array(placed, dtype=bool, copy=True)
    fixed = placed.copy()
    others, gaps = ids[:, 1:], distances[:, 1:].astype(np.float32)
    nearest = gaps[:, :1]
    sigma = np.maximum(gaps.mean(axis=1, keepdims=True) - nearest, 1e-6)
    weights = np.exp(-(gaps - nearest) / sigma)  # (N, W − 1), 1 for the nearest
    for _ in range(rounds):
        todo = np.flatnonzero(~placed)
        if not len(todo):
            break
        reached = placed[others[todo]] * weights[todo]  # (m, W − 1)
        total = reached.sum(axis=1)
        ok = total > 0
        if not ok.any():
            break
        rows = todo[ok]
        mean = np.einsum("mk,mkc->mc", reached[ok], np.nan_to_num(coords[others[rows]])) / total[ok, None]
        coords[rows] = mean
        placed[rows] = True
    moving = np.flatnonzero(placed & ~fixed)
    for _ in range(smoothing):
        if not len(moving):
            break
        w = weights[moving] * placed[others[moving]]
        coords[moving] = (np.einsum("mk,mkc->mc", w, np.nan_to_num(coords[others[moving]]))
                          / np.maximum(w.sum(axis=1), 1e-12)[:, None])
    return coords
