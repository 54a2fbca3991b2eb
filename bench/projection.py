"""What a UMAP map costs in a new process, cold (empty numba cache) and warm, phase by phase.

Each measurement is a fresh `python` process, as `python -m core project` is: it makes its data,
calls core.explore.projection.project_umap (seed None, the app's default) and times the phases from the
on_progress calls: import (umap-learn), compile (numba: compiled, or loaded from the cache),
neighbours (exact k-NN with faiss), layout (umap's graph, init and epochs). Then, untimed, the
trustworthiness of the map on a 3,000-point subsample (10 neighbours).

Data: 1,797 = scikit-learn's digits; 70,000 = 64-d points around 30 centres of mixed spread. Both
L2-normalised, like the app's embeddings.

Cold runs use a new empty NUMBA_CACHE_DIR; the warm run reuses the cache the cold run filled.
--baseline adds umap-learn's defaults as the app called them before (its own NNDescent / all-pairs
k-NN, default epochs and init, umap's own caching only), cold and warm, in its own cache folder.

    python bench/projection.py [--quick] [--baseline] [--sizes 1797,70000]

--quick only does 1,797 points. Prints one JSON object per line.

Measured on the 2-core dev machine (shared, load average 1.4–2.9; seconds, map_s = the call):
  1,797  cold  import 14.6–18.1  compile 6.1–7.7  neighbours 0.02  layout 0.4–0.5  map 21–26  T 0.987
         warm  import 1.0–1.2    compile 0.07–0.10                 layout 0.45     map 1.5–1.8
         umap defaults (before): cold 31–43, warm 15–20 (fit 14–18 s, mostly compilation), T 0.988
  70,000 cold  import 17–18      compile 6.7–7.3  neighbours 6.4–11  layout 6.9–7.0  map 38–43
         warm  import 1.9–2.4    compile 0.06–0.09 neighbours 6.0    layout 6.9      map 14.8–15.4
         umap defaults (before): cold 86, warm 55 (load 1.3), T 0.9866 against our 0.9865
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TRUST_SAMPLE = 3000


def make_data(n: int):
    import numpy as np

    if n == 1797:
        from sklearn.datasets import load_digits

        data = load_digits().data.astype(np.float32)
    else:
        rng = np.random.default_rng(0)
        centres = rng.normal(size=(30, 64))
        spread = rng.uniform(0.3, 0.9, size=30)
        labels = rng.integers(0, 30, size=n)
        data = (centres[labels] + rng.normal(size=(n, 64)) * spread[labels, None]).astype(np.float32)
    return data / np.linalg.norm(data, axis=1, keepdims=True)


def trust(data, coords) -> float:
    import numpy as np
    from sklearn.manifold import trustworthiness

    rows = np.random.default_rng(1).permutation(len(data))[:TRUST_SAMPLE]
    return round(float(trustworthiness(data[rows], coords[rows], n_neighbors=10)), 4)


def child(n: int, mode: str) -> dict:
    """One map in this (new) process."""
    data = make_data(n)
    if mode == "ours":
        from core.explore.projection import numba_cache_is_warm, project_umap

        warm_before = numba_cache_is_warm()
        marks: list[tuple[str, float, str]] = []

        def on_progress(phase, fraction, message):
            if not marks or marks[-1][0] != phase:
                marks.append((phase, time.perf_counter(), message))

        started = time.perf_counter()
        coords = project_umap(data, on_progress=on_progress)
        ended = time.perf_counter()
        stamps = [t for _, t, _ in marks] + [ended]
        names = {"importing": "import_s", "compiling": "compile_s", "neighbours": "neighbours_s", "layout": "layout_s"}
        phases = {names[p]: round(stamps[i + 1] - t, 2) for i, (p, t, _) in enumerate(marks) if p in names}
        result = {"cache_looked_warm": warm_before, **phases, "map_s": round(ended - started, 2),
                  "compile_message": next(m for p, _, m in marks if p == "compiling")}
    else:
        import numpy as np

        started = time.perf_counter()
        import umap

        imported = time.perf_counter()
        coords = umap.UMAP(n_neighbors=15, min_dist=0.1).fit_transform(data).astype(np.float32)
        ended = time.perf_counter()
        result = {"import_s": round(imported - started, 2), "fit_s (compile+neighbours+layout)": round(ended - imported, 2),
                  "map_s": round(ended - started, 2)}
    result["trustworthiness"] = trust(data, coords)
    return result


def run_child(n: int, mode: str, cache: str, state: str) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache, PYTHONWARNINGS="ignore")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", str(n), "--mode", mode],
                          env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"n": n, "method": mode, "numba_cache": state, **result, "process_wall_s": round(wall, 2),
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,797 points only")
    parser.add_argument("--baseline", action="store_true", help="also umap-learn's defaults, as called before")
    parser.add_argument("--sizes", default="1797,70000")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="ours", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.mode)))
        return
    sizes = [1797] if args.quick else [int(s) for s in args.sizes.split(",")]
    modes = ["ours", "baseline"] if args.baseline else ["ours"]
    with tempfile.TemporaryDirectory(prefix="bench-numba-") as tmp:
        for n in sizes:
            for mode in modes:
                cache = os.path.join(tmp, f"{mode}-{n}")
                os.makedirs(cache)
                for state in ("cold", "warm"):
                    print(json.dumps(run_child(n, mode, cache, state)), flush=True)


if __name__ == "__main__":
    main()
