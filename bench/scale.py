"""A million images on one machine, phase by phase: time, peak memory and quality of each.

    python bench/scale.py [--sizes 100000,1000000] [--phases import,train,embed,statistics,map,search,export]
                          [--workdir DIR] [--source folder|zip] [--keep]

For each size N it writes N synthetic 28×28 grayscale PNGs in ten class folders (or a zip of them:
--source zip; a zip holds at most core.data.ingest.MAX_MEMBERS files) under --workdir (default: a new
folder in /tmp, removed at the end unless --keep), each class a sinusoid of its own frequency and
angle plus per-image noise, so that every image is distinct and a model can learn the classes.
Then it runs each phase in a process of its own (so each phase's peak RSS is its own: the
VmHWM of that process, see peak_rss_mb), each through the product's own functions on a data home of its own:

import      core.data.importing.import_paths of the folder (or zip), image size 28: images/s
train       core.runs.jobs.create_training_run + core.runs.worker.execute_run (no map), one epoch
            (--epochs) of the default recipe (vgg_grid, supcon, pk sampler, batch 256); the run ends
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
"seconds" is the phase's own call; "process_seconds" adds starting Python and importing torch.
A phase that fails prints {"phase", "n", "error"} and the phases that need it are skipped.

Measured on the shared 2-core dev machine (four other sessions working), 2026-12-04.
Import alone, after the last change to the import (`--phases import`; peak RSS as VmHWM):
  folder, 100,000 (load 2-5): 15.3 s, 6,547 images/s, peak RSS 102 MB
  folder, 1,000,000 (load 2.5-4.5): 115 s, 8,662 images/s, 165 MB (writing the PNGs: 142 s)
  zip, 100,000 (`--source zip`, load 6-10): 19.2 s, 5,220 images/s, 106 MB
  zip, 1,000,000 (load 6-10): 211 s, 4,729 images/s, 163 MB (what grows: the duplicate table, 16-32
    bytes an image, and the split, 28 bytes an image then, 1 since: the rest does not grow with N)
The whole path, `python bench/scale.py --sizes 100000` (folder of PNGs; load 5-10; an earlier
import that read each file with read(20 MB): 1,065 images/s, 141 MB; peaks then from ru_maxrss,
whose floor is this bench's RSS at fork, about 100 MB: right for the phases above it):
  train, 1 epoch (312 steps of 256; ends with the run's own embedding of all 100,000 and exact
    metrics on its 20,000 test images): 504 s, peak 2,314 MB, loss 0.0006, P@1 1.0
  embed 100,000 (an embedding run of that encoder, with its metrics): 189 s, 529 images/s, 2,264 MB
  statistics: 215 s, 609 MB; map (UMAP defaults): 433 s, 1,016 MB
  search: index load 2.3 s, 100 new images at k=10 p50 16.8 ms, p95 24.6 ms, P@1 1.0; 345 MB
  export parquet: 10.1 s, 53 MB file, 390 MB
The synthetic classes are easy (P@1 1.0): the quality figures say the pipeline works end to end,
not how well it learns.

The whole path on a quiet 2-core machine (another one, faster per step: AMD EPYC with bf16),
2026-12-05, `python bench/scale.py --sizes 1000000` (05:25-05:45) and `--sizes 100000` (06:04-06:07):
  phase        100,000                               1,000,000
  generate     7.8 s                                 180 s
  import       3.9 s, 25,865 images/s, 102 MB        45.9 s, 21,773 images/s, 170 MB
  train        66.2 s, 1,221 MB (1 epoch, then its   362 s, 2,492 MB (3,125 steps, then its own
               own embedding and metrics)            embedding of 1M and metrics over 10,000 sampled
                                                     of the 200,000 test queries)
  embed        30.7 s, 3,253 images/s, 954 MB        241 s, 4,149 images/s, 2,276 MB
  statistics   32.3 s, 608 MB                        284 s, 3,558 MB (then 170 s, below)
  map          25.5 s, 998 MB                        34.1 s, 2,275 MB (landmarks, the shared k-NN)
  search       index load 0.73 s; p50 4.3 ms,        index load 3.0 s; p50 2.0 ms, p95 2.4 ms;
               p95 6.2 ms; P@1 1.0; 348 MB           P@1 1.0; 1,121 MB
  export       1.05 s, 53 MB parquet, 393 MB         7.3 s, 515 MB parquet, 1,773 MB
Before this the embedding phase at 1M grew past 24 GB (each batch's output tensor kept until one
torch.cat held glibc's heap open: now one array filled in place) and the training run peaked at
4,642 MB. Statistics at 1M: the trained encoder collapses each synthetic class, so the IVF lists'
nearest neighbours spread over many lists; the list-wise k-NN compared 64 (the next power of two
above the 53 needed) and took 227 s of the 284. With the fewest lists that reach the target
(core.explore.knn, bisected), the same run's statistics job took 170.1 s (index 18 s, k-NN 109 s
at recall@10 0.971, statistics 13 s) and its map 17.2 s, peak 3.2 GB.

The embed phase since runs flip by default (the "scale" dataset is not an oriented one, so its run
trains with flip+erase and embeds with the mirror average: two forward passes), 2026-12-06,
`EMBEDDING_LAB_THREADS=2 python bench/scale.py --sizes 100000 --phases import,train,embed`, load ~2
(one run each, the same machine within 20 minutes):
  0755e3d, before the augmentation setting: embed 27.2 s, 3,680 images/s
  0641fde, the mirror average in float32:    embed 60.4 s, 1,657 images/s
  the encoder embedding under its run's precision (bf16 on this CPU): 39.4 s, 2,541 images/s (45.0 s
    in a second run)
The embedding itself (the trained encoder on 20,000 images, the four ways in one process, three
times each): float32 without the mirror 4,900 images/s; the mirror in float32 1,690; the mirror
under bf16 4,310; bf16 without the mirror 8,600. The phase also loads the images and computes the
metrics over 20,000 test queries, and it varied by ±15 % between runs here.
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


# ---------------------------------------------------------------- the phases, each in a process of its own

def _engine(role: str = "app"):
    from storage.db import make_engine

    return make_engine(role=role)


def _state(home: Path) -> dict:
    path = home / "bench-scale.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _remember(home: Path, **values) -> None:
    state = _state(home)
    state.update(values)
    (home / "bench-scale.json").write_text(json.dumps(state))


def _quality(summary: dict) -> dict:
    keys = ("precision_at_1", "map_at_r", "r_precision", "evaluated_on", "n_queries", "status", "reason")
    return {key: summary[key] for key in keys if key in summary}


def phase_import(home: Path, source: Path, n: int, args) -> dict:
    from core.data.importing import import_paths

    began = time.perf_counter()
    report = import_paths(_engine(), [source], name="scale", image_size=SIDE)
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "images": report.n_images, "images_per_s": report.n_images / seconds,
            "classes": len(report.classes), "rejected": report.n_rejected, "duplicates": report.n_duplicates}


def phase_train(home: Path, source: Path, n: int, args) -> dict:
    from sqlalchemy import select

    from core.runs.jobs import create_training_run
    from core.runs.worker import execute_run
    from core.training.config import RunConfig
    from storage.db import transaction
    from storage.schema import EpochRow

    engine = _engine("worker")
    began = time.perf_counter()
    run_id = create_training_run(engine, RunConfig(dataset="scale", epochs=args.epochs, device="cpu"))
    summary = execute_run(engine, run_id, project=False)
    seconds = time.perf_counter() - began
    with transaction(engine) as session:
        losses = session.scalars(select(EpochRow.loss).where(EpochRow.run_id == run_id).order_by(EpochRow.epoch)).all()
    _remember(home, run=run_id)
    return {"seconds": seconds, "run": run_id, "epochs": args.epochs, "loss": losses[-1] if losses else None,
            **_quality(summary)}


def phase_embed(home: Path, source: Path, n: int, args) -> dict:
    from core.runs.jobs import create_embedding_run
    from core.runs.worker import execute_run
    from storage import artifacts
    from storage.db import transaction
    from storage.schema import Run

    engine = _engine("worker")
    run = _state(home)["run"]
    with transaction(engine) as session:
        checkpoint = artifacts.absolute(session.get(Run, run).checkpoint).read_bytes()
    began = time.perf_counter()
    embed_run = create_embedding_run(engine, "scale", checkpoint, f"run {run} encoder", run, "cpu")
    summary = execute_run(engine, embed_run, project=False)
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "run": embed_run, "images_per_s": n / seconds, **_quality(summary)}


def phase_statistics(home: Path, source: Path, n: int, args) -> dict:
    from core.runs.worker import compute_statistics, run_summary

    engine = _engine("worker")
    run = _state(home)["run"]
    began = time.perf_counter()
    row = compute_statistics(engine, run)
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "status": row.status, **{k: v for k, v in _quality(run_summary(engine, run)).items()
                                                         if k != "status"}}


def phase_map(home: Path, source: Path, n: int, args) -> dict:
    from core.runs.worker import compute_projection

    engine = _engine("worker")
    began = time.perf_counter()
    row = compute_projection(engine, _state(home)["run"])
    return {"seconds": time.perf_counter() - began, "status": row.status}


def phase_search(home: Path, source: Path, n: int, args) -> dict:
    from core.explore.service import load_run_index, search_by_image

    engine = _engine()
    run = _state(home)["run"]
    began = time.perf_counter()
    index = load_run_index(engine, run)
    loaded = time.perf_counter() - began
    queries = [(c, png_bytes(image)) for _, c, image in synthetic_batches(100, seed=12345)]  # new images
    right, times = 0, []
    for c, data in queries:
        start = time.perf_counter()
        hits = search_by_image(engine, run, data, "query.png", 10, run_index=index)
        times.append(time.perf_counter() - start)
        right += hits[0]["label"] == f"class{c}"
    return {"seconds": time.perf_counter() - began, "index_load_seconds": loaded,
            "query_ms_p50": 1000 * float(np.median(times)), "query_ms_p95": 1000 * float(np.percentile(times, 95)),
            "precision_at_1": right / len(queries)}


def phase_export(home: Path, source: Path, n: int, args) -> dict:
    from core.explore.export import export_run, exported_rows

    engine = _engine()
    run = _state(home)["run"]
    out = home.parent / "export.parquet"
    began = time.perf_counter()
    path = export_run(engine, run, "parquet", out, overwrite=True)
    seconds = time.perf_counter() - began
    size = path.stat().st_size
    path.unlink()
    return {"seconds": seconds, "rows": exported_rows(engine, run, "parquet"), "mb": size / 2**20}


CHILDREN = {"import": phase_import, "train": phase_train, "embed": phase_embed, "statistics": phase_statistics,
            "map": phase_map, "search": phase_search, "export": phase_export}
NEEDS_RUN = ("embed", "statistics", "map", "search", "export")


def peak_rss_mb() -> float:
    """This process's peak RSS and that of the processes it started and waited for (a decoding
    pool, a map job): VmHWM of its own memory, not getrusage(RUSAGE_SELF).ru_maxrss, which starts
    from the RSS of the process that forked it (this bench's, after writing a million images:
    hundreds of MB that were never the phase's); RUSAGE_CHILDREN for its children (their start is
    this process, at most its own peak)."""
    import resource

    with open("/proc/self/status") as status:
        own = next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
    return max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024


def run_phase(phase: str, n: int, home: Path, source: Path, args) -> dict:
    """The phase in a new process; its figures with its peak RSS (peak_rss_mb, as the process
    measures itself at the end)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", phase, "--home", str(home),
               "--input", str(source), "--n", str(n), "--epochs", str(args.epochs)]
    env = dict(os.environ, EMBEDDING_LAB_HOME=str(home),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    began = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err, text=True)
        child.wait()
        out.seek(0)
        err.seek(0)
        lines = out.read().strip().splitlines()
        tail = err.read()[-1500:]
    line = {"phase": phase, "n": n}
    if child.returncode != 0 or not lines:
        line["error"] = (tail.strip().splitlines() or [f"exit status {child.returncode}"])[-1]
        return line
    figures = json.loads(lines[-1])
    line["seconds"] = round(figures.pop("seconds"), 2)
    line["process_seconds"] = round(time.perf_counter() - began, 2)
    line["peak_rss_mb"] = round(figures.pop("peak_rss_mb"), 1)
    line.update({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()})
    return line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000", help="comma-separated numbers of images (default 100000)")
    parser.add_argument("--phases", default=",".join(p for p in PHASES), help=f"some of {','.join(PHASES)}")
    parser.add_argument("--workdir", type=Path, help="where the images and data homes go (default: a new /tmp folder)")
    parser.add_argument("--source", choices=("folder", "zip"), default="folder")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs (default 1)")
    parser.add_argument("--keep", action="store_true", help="keep the images and data homes")
    parser.add_argument("--child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--write", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.write:
        (write_zip if args.write.suffix == ".zip" else write_folder)(args.write, args.n)
        return 0
    if args.child:
        sys.path.insert(0, str(ROOT))
        figures = CHILDREN[args.child](args.home, args.input, args.n, args)
        print(json.dumps(dict(figures, peak_rss_mb=peak_rss_mb())), flush=True)
        return 0
    try:
        sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes takes whole numbers separated by commas, got {args.sizes!r}")
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in phases if p not in PHASES]
    if unknown or not sizes or min(sizes) < 20:
        parser.error(f"unknown phase {unknown[0]!r}" if unknown else "give sizes of at least 20 images")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        for n in sizes:
            folder = workdir / f"n{n}"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            home = folder / "home"
            home.mkdir()
            began = time.perf_counter()
            # in a process of its own: this one stays small, and every phase process forked from it too
            source = folder / ("images.zip" if args.source == "zip" else "images")
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--write", str(source), "--n", str(n)],
                           check=True, cwd=ROOT)
            print(json.dumps({"phase": "generate", "n": n, "seconds": round(time.perf_counter() - began, 2),
                              "source": args.source}), flush=True)
            failed = False
            for phase in phases:
                if phase == "explore":
                    print(json.dumps({"phase": "explore", "n": n, "skipped": "the Explore page's first paint in "
                                      "headless Chromium is timed by bench/explore.py's browser section"}), flush=True)
                    continue
                if failed and phase != "import":
                    print(json.dumps({"phase": phase, "n": n, "skipped": "an earlier phase failed"}), flush=True)
                    continue
                line = run_phase(phase, n, home, source, args)
                failed = failed or "error" in line
                print(json.dumps(line), flush=True)
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
