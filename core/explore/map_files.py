"""The files the Explore map's browser code fetches: written once, served statically, never sent
in a chart spec.

Streamlit serves `<app folder>/static/` at `app/static/` (server.enableStaticServing, set in
.streamlit/config.toml). Under it, `maps/<home>/` belongs to one data home (a hash of its path, so
two data homes never share files) and holds:

- `d<id>-<key>/labels.u16`: the dataset's labels, uint16, 65535 for an unlabeled image;
- `d<id>-<key>/sheet-<j>.png`: the images as sprite sheets of SHEET_COLUMNS² cells, for hover;
- `r<id>-<key>/xy-<hash>.f32`: map coordinates, float32 x, y interleaved, scaled into [-0.95, 0.95];
- `r<id>-<key>/colour-<name>-<hash>.u8`: one colour category per point;
- `r<id>-<key>/xy-evolution-<e>-<hash>.f32`, `positions-probe-<hash>.u32`: the frames of the map
  across epochs (one scale for all of them) and the dataset image of each of its points.

<key> is a hash of the row's cache_key (id and creation time), so a file of a deleted run or
dataset is never served for a new one, and files are named by a hash of their content, so the
browser's copy of a URL is never stale. Deleting a run or a dataset removes its folder.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from core.metric.categories import MINING_COLUMNS, MINING_TITLES
from storage.artifacts import temp_file_for
from storage.settings import data_home

APP_FOLDER = Path(__file__).resolve().parents[2]
STATIC_URL = "app/static"
SHEET_COLUMNS = 16
MAX_CELL = 64  # sprite cell side in pixels at most
UNLABELED = 65535
MAX_CATEGORIES = 254  # a colour column is uint8: categories, plus "other" and "unlabeled"

# Tableau 10 and 20: distinct, colour-blind-aware enough, and what people know from matplotlib
TAB10 = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"]
TAB20 = ["#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78", "#2ca02c", "#98df8a", "#d62728", "#ff9896", "#9467bd", "#c5b0d5",
         "#8c564b", "#c49c94", "#e377c2", "#f7b6d2", "#7f7f7f", "#c7c7c7", "#bcbd22", "#dbdb8d", "#17becf", "#9edae5"]
# viridis at 10 steps, for average precision from 0 (dark) to 1 (yellow)
VIRIDIS10 = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b", "#fde725"]
GREY = "#c8c8cc"

COLOURINGS = {
    "label": "label",
    "nn": "nearest neighbour has the same label",
    "ap": "average precision as a query",
    "split": "split (train / test)",
    # a training run's per-image mining counts over all its epochs (core.training.tally_files)
    **MINING_TITLES,
}
MINING_COLOURINGS = MINING_COLUMNS  # core.metric.categories: the tally's columns
# YlOrRd: more uses, darker and redder; "0" a muted blue, images never trained on grey
YLORRD6 = ["#fed976", "#feb24c", "#fd8d3c", "#fc4e2a", "#e31a1c", "#b10026"]
NEVER_USED = "#6b8fb3"


def static_root() -> Path:
    return APP_FOLDER / "static"


def notes_root() -> Path:
    """Where each static/maps folder's note of its data home is kept: beside static/, never
    under it, since everything under static/ is served to any visitor (a note there once gave
    away the data folder's absolute path)."""
    return APP_FOLDER / ".map-homes"


def home_folder() -> Path:
    """This data home's folder under static/maps (created, with a note of which home it is
    kept in notes_root())."""
    home = str(data_home())
    name = hashlib.sha1(home.encode()).hexdigest()[:12]
    folder = static_root() / "maps" / name
    note = notes_root() / name
    if not note.exists():
        _write_atomic(note, home.encode())
    (folder / "home.txt").unlink(missing_ok=True)  # where an earlier version kept it: served
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _key(cache_key: str) -> str:
    return hashlib.sha1(cache_key.encode()).hexdigest()[:10]


def run_folder(run_id: int, run_key: str) -> Path:
    return home_folder() / f"r{run_id}-{_key(run_key)}"


def dataset_folder(dataset_id: int, dataset_key: str) -> Path:
    return home_folder() / f"d{dataset_id}-{_key(dataset_key)}"


def url_of(path: Path) -> str:
    return f"{STATIC_URL}/{path.relative_to(static_root()).as_posix()}"


def remove_run_files(run_id: int) -> None:
    """Every static file of run `run_id` (whatever its creation time)."""
    for folder in home_folder().glob(f"r{int(run_id)}-*"):
        shutil.rmtree(folder, ignore_errors=True)


def prune_other_homes() -> int:
    """Remove the static files of data homes that no longer exist (tests' temporary homes)."""
    removed = 0
    for folder in (static_root() / "maps").glob("*"):
        note = notes_root() / folder.name
        old_note = folder / "home.txt"  # an earlier version's, under static/: moved out of reach
        if old_note.exists() and not note.exists():
            with contextlib.suppress(OSError):
                _write_atomic(note, old_note.read_bytes())
        old_note.unlink(missing_ok=True)
        try:
            home = note.read_text()
        except OSError:
            continue
        if not Path(home).is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            note.unlink(missing_ok=True)
            removed += 1
    return removed


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_file_for(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_named(folder: Path, stem: str, suffix: str, data: bytes) -> Path:
    """`folder/stem-<content hash>.suffix`, written once."""
    path = folder / f"{stem}-{hashlib.sha1(data).hexdigest()[:12]}.{suffix}"
    if not path.exists():
        _write_atomic(path, data)
    return path


def normalise_coordinates(coords: np.ndarray) -> np.ndarray:
    """(N, 2) → float32 in [-0.95, 0.95], centred, one scale for both axes (shapes stay true)."""
    coords = np.asarray(coords, dtype=np.float64)
    if len(coords) == 0:
        return coords.astype(np.float32)
    low, high = coords.min(axis=0), coords.max(axis=0)
    half = max(float((high - low).max()) / 2, 1e-12)
    return ((coords - (low + high) / 2) * (0.95 / half)).astype(np.float32)


def normalise_like(coords: np.ndarray, others: np.ndarray) -> np.ndarray:
    """`others` (Q, 2) moved by the transform normalise_coordinates gives `coords` (the map's
    points), so they land where they belong on that map."""
    coords, others = np.asarray(coords, dtype=np.float64), np.asarray(others, dtype=np.float64).reshape(-1, 2)
    if len(coords) == 0:
        return others.astype(np.float32)
    low, high = coords.min(axis=0), coords.max(axis=0)
    half = max(float((high - low).max()) / 2, 1e-12)
    return ((others - (low + high) / 2) * (0.95 / half)).astype(np.float32)


def write_points(run_id: int, run_key: str, method: str, coords: np.ndarray) -> str:
    """The URL of the map's coordinates file (written if needed)."""
    data = np.ascontiguousarray(normalise_coordinates(coords)).tobytes()
    return url_of(_write_named(run_folder(run_id, run_key), f"xy-{method}", "f32", data))


def write_frames(run_id: int, run_key: str, method: str, frames: np.ndarray) -> list[str]:
    """URLs of one coordinates file per frame of (E, N, 2) `frames`, all scaled by one transform
    (the frames' common box into [-0.95, 0.95]), so a point that stays still between frames does
    not move on screen."""
    frames = np.asarray(frames)
    if frames.size == 0:
        return []
    shared = normalise_coordinates(frames.reshape(-1, 2)).reshape(frames.shape)
    folder = run_folder(run_id, run_key)
    return [url_of(_write_named(folder, f"xy-{method}-{e}", "f32", np.ascontiguousarray(frame).tobytes()))
            for e, frame in enumerate(shared)]


def write_positions(run_id: int, run_key: str, name: str, positions: np.ndarray) -> str:
    """The URL of a uint32 file naming the dataset image of each point of a map of a subset."""
    data = np.ascontiguousarray(positions, dtype=np.uint32).tobytes()
    return url_of(_write_named(run_folder(run_id, run_key), f"positions-{name}", "u32", data))


def write_labels(dataset_id: int, dataset_key: str, labels: list[Optional[int]]) -> str:
    values = np.array([UNLABELED if label is None else label for label in labels], dtype=np.uint16)
    return url_of(_write_named(dataset_folder(dataset_id, dataset_key), "labels", "u16", values.tobytes()))


def write_colour(run_id: int, run_key: str, name: str, categories: np.ndarray) -> str:
    data = np.ascontiguousarray(categories, dtype=np.uint8).tobytes()
    return url_of(_write_named(run_folder(run_id, run_key), f"colour-{name}", "u8", data))


@dataclass(frozen=True)
class Thumbnails:
    """Where the browser finds image i: sheet i // per_sheet, cell i % per_sheet, row-major."""

    base: str  # URL of the folder, ending in /
    per_sheet: int
    cols: int
    cell: int  # pixels per image side

    def as_dict(self) -> dict:
        return {"base": self.base, "per_sheet": self.per_sheet, "cols": self.cols, "cell": self.cell}


def write_sprites(dataset_id: int, dataset_key: str, pixels: np.ndarray) -> Thumbnails:
    """The dataset's images as PNG sprite sheets (written once per dataset; a marker file says
    they are complete, so a crash half-way writes them again)."""
    from PIL import Image

    folder = dataset_folder(dataset_id, dataset_key)
    n, full = len(pixels), int(pixels.shape[1])
    step = -(-full // MAX_CELL)  # big images are subsampled to at most MAX_CELL px: hover needs no more
    side = len(range(0, full, step))
    per_sheet = SHEET_COLUMNS * SHEET_COLUMNS
    thumbs = Thumbnails(url_of(folder) + "/", per_sheet, SHEET_COLUMNS, side)
    marker = folder / "sprites.json"
    expected = {"n": n, "cell": side, "per_sheet": per_sheet}
    try:
        if json.loads(marker.read_text()) == expected:
            return thumbs
    except (OSError, ValueError):
        pass
    channels = pixels.shape[3] if pixels.ndim == 4 else 1
    folder.mkdir(parents=True, exist_ok=True)
    for sheet in range((n + per_sheet - 1) // per_sheet):
        block = np.asarray(pixels[sheet * per_sheet:(sheet + 1) * per_sheet]).reshape(-1, full, full, channels)
        block = block[:, ::step, ::step]
        rows = (len(block) + SHEET_COLUMNS - 1) // SHEET_COLUMNS
        canvas = np.zeros((rows * side, SHEET_COLUMNS * side, channels), dtype=np.uint8)
        for i, image in enumerate(block):
            r, c = divmod(i, SHEET_COLUMNS)
            canvas[r * side:(r + 1) * side, c * side:(c + 1) * side] = image
        picture = Image.fromarray(canvas[:, :, 0] if channels < 3 else canvas[:, :, :3])
        path = folder / f"sheet-{sheet}.png"
        tmp = temp_file_for(path)
        try:
            picture.save(tmp, format="PNG", compress_level=1)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    _write_atomic(marker, json.dumps(expected).encode())
    return thumbs


def sprites_if_written(dataset_id: int, dataset_key: str, n: int) -> Optional[Thumbnails]:
    folder = dataset_folder(dataset_id, dataset_key)
    try:
        written = json.loads((folder / "sprites.json").read_text())
    except (OSError, ValueError):
        return None
    if written.get("n") != n:
        return None
    return Thumbnails(url_of(folder) + "/", written["per_sheet"], SHEET_COLUMNS, written["cell"])


def label_palette(n_classes: int) -> list[str]:
    if n_classes <= 10:
        return TAB10[:n_classes]
    if n_classes <= 20:
        return TAB20[:n_classes]
    # golden-angle hues at two lightnesses: neighbouring classes never look alike
    import colorsys

    colours = []
    for i in range(n_classes):
        r, g, b = colorsys.hls_to_rgb((i * 0.618033988749895) % 1.0, 0.45 if i % 2 else 0.62, 0.65)
        colours.append(f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}")
    return colours


def count_bins(values: np.ndarray, max_bins: int = len(YLORRD6)) -> list[int]:
    """Lower ends of at most max_bins bins of the non-zero counts, from their quantiles (so
    each bin holds a share of the used images, however skewed the counts are); distinct
    integers, the first the smallest non-zero count. [] when every count is 0."""
    used = np.asarray(values)[np.asarray(values) > 0]
    if len(used) == 0:
        return []
    lows = np.ceil(np.quantile(used, np.linspace(0, 1, max_bins + 1)[:-1], method="lower"))
    return sorted({int(used.min()), *(int(low) for low in lows)})


def _count_categories(values: np.ndarray, trained: np.ndarray) -> tuple[np.ndarray, list[str], list[str]]:
    """Categories of a count column: 0, the count_bins ranges (e.g. "1–2", "3–5", "6–40"), then
    images never in a training batch. Returns (categories, names, colours)."""
    values = np.asarray(values, dtype=np.int64)
    lows = count_bins(values[trained])
    top = int(values[trained].max(initial=0))
    highs = [low - 1 for low in lows[1:]] + [top]
    names = ["0"] + [str(low) if low == high else f"{low}–{high}" for low, high in zip(lows, highs)]
    picks = np.linspace(0, len(YLORRD6) - 1, len(lows)).round().astype(int) if lows else []
    colours = [NEVER_USED] + [YLORRD6[i] for i in picks]
    categories = np.searchsorted(np.asarray(lows, dtype=np.int64), values, side="right")
    if not trained.all():
        names.append("not a training image")
        colours.append(GREY)
        categories = np.where(trained, categories, len(names) - 1)
    return categories, names, colours


# legend entries of points the colouring says nothing about: with AP colouring the 60,000 training
# images of Fashion-MNIST, drawn on top, buried the failing test queries
BACKGROUND = ("not a query", "not a training image")


def colour_column(name: str, labels: list[Optional[int]], classes: list[str], split: list[str],
                  ap: Optional[np.ndarray] = None, nn_correct: Optional[np.ndarray] = None,
                  mining: Optional[np.ndarray] = None) -> tuple[np.ndarray, list[dict]]:
    """(one uint8 category per point, legend: [{name, colour, count}] indexed by category).

    label: one category per class (classes past MAX_CATEGORIES share "other classes"), then
    "unlabeled". nn: whether the nearest other point carries the point's label. ap: the point's
    average precision as a query in tenths, grey where it was not a query (a training image, or
    no other image of its class). split: train / test. hard_negative, semi_hard_negative,
    violated_anchor: that column of `mining` (a training run's (N, 3) counts over its epochs),
    binned by count_bins; a dataset with a train split never trained on its other images.
    """
    n = len(labels)
    if name == "label":
        values = np.array([-1 if label is None else label for label in labels], dtype=np.int64)
        shown = min(len(classes), MAX_CATEGORIES)
        names = list(classes[:shown]) + (["other classes"] if len(classes) > shown else []) + ["unlabeled"]
        colours = label_palette(shown) + ([GREY] if len(classes) > shown else []) + ["#444444"]
        categories = np.where(values < 0, len(names) - 1, np.minimum(values, len(names) - 2))
    elif name == "nn":
        if nn_correct is None:
            raise ValueError("colouring by nearest neighbour needs the run's statistics")
        values = np.asarray(nn_correct)
        names = ["another label", "same label", "unlabeled"]
        colours = ["#d62728", "#4e9a56", GREY]
        categories = np.where(values < 0, 2, values)
    elif name == "ap":
        if ap is None:
            raise ValueError("colouring by average precision needs the run's statistics")
        values = np.asarray(ap, dtype=np.float64)
        known = np.isfinite(values)
        names = [f"AP {i / 10:.1f}–{(i + 1) / 10:.1f}" for i in range(10)] + ["not a query"]
        colours = VIRIDIS10 + [GREY]
        categories = np.where(known, np.clip(np.floor(np.nan_to_num(values) * 10), 0, 9), 10)
    elif name == "split":
        names = ["train", "test"]
        colours = ["#4e79a7", "#f28e2b"]
        categories = np.array([1 if s == "test" else 0 for s in split], dtype=np.int64)
    elif name in MINING_COLOURINGS:
        if mining is None:
            raise ValueError(f"colouring by {COLOURINGS[name]} needs a training run's mining counts")
        trained = np.array([s == "train" for s in split], dtype=bool)
        if not trained.any():  # no train split: fit trains on every image
            trained[:] = True
        categories, names, colours = _count_categories(np.asarray(mining)[:, MINING_COLOURINGS.index(name)], trained)
    else:
        raise ValueError(f"unknown colouring {name!r}; choose from {', '.join(COLOURINGS)}")
    categories = np.asarray(categories, dtype=np.uint8)
    counts = np.bincount(categories, minlength=len(names)) if n else np.zeros(len(names), dtype=np.int64)
    legend = [{"name": str(entry), "colour": colour, "count": int(count)}
              for entry, colour, count in zip(names, colours, counts)]
    for entry in legend:  # outside the colouring's question: drawn faint and underneath the others
        if entry["name"] in BACKGROUND:
            entry["background"] = True
    return categories, legend


# ----------------------------------------------------------------------------- comparing two runs

# what the Compare page colours a run's map by, besides the label (core.explore.compare's
# Comparison.image_values: one value per image of that run's dataset, NaN where it says nothing)
COMPARE_COLOURINGS = {
    "label": "label",
    "agreement": "neighbourhood agreement (Jaccard of the k nearest in A and B)",
    "ap_change": "average precision change (B − A)",
    "flip": "nearest neighbour's label (A → B)",
}
# red (changed most, or worse) to green (kept, or better): RdYlGn without its pale middle
RED_TO_GREEN5 = ["#d7191c", "#f07c4a", "#c9b53b", "#7fbf57", "#1a9641"]
AP_CHANGE_BINS = (-0.2, -0.05, 0.05, 0.2)  # edges of much worse | worse | about the same | better | much better


def comparison_column(name: str, values: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """(one uint8 category per point, legend) for a Compare colouring (not "label", which is
    colour_column's). agreement: Jaccard in fifths; ap_change: B − A binned at AP_CHANGE_BINS
    (a change under 0.05 reads as unchanged: the per-query AP of a 10-class test set moves by a
    few hundredths between runs that agree); flip: whether the nearest evaluated image's label went
    right → wrong, stayed, or wrong → right. NaN (not shared, or not a shared query) is grey,
    drawn faint and underneath."""
    values = np.asarray(values, dtype=np.float64)
    known = np.isfinite(values)
    filled = np.nan_to_num(values)
    if name == "agreement":
        names = ["0.0–0.2", "0.2–0.4", "0.4–0.6", "0.6–0.8", "0.8–1.0", "not shared"]
        categories = np.clip(np.floor(filled * 5), 0, 4)
    elif name == "ap_change":
        names = ["much worse (< −0.2)", "worse (−0.2 to −0.05)", "about the same (±0.05)", "better (0.05 to 0.2)",
                 "much better (> 0.2)", "not a shared query"]
        categories = np.searchsorted(np.asarray(AP_CHANGE_BINS), filled, side="right")
    elif name == "flip":
        names = ["right → wrong", "unchanged", "wrong → right", "not a shared query"]
        categories = np.clip(filled, -1, 1) + 1
    else:
        raise ValueError(f"unknown comparison colouring {name!r}; choose from {', '.join(COMPARE_COLOURINGS)}")
    colours = (RED_TO_GREEN5 if len(names) == 6 else [RED_TO_GREEN5[0], "#8c8c99", RED_TO_GREEN5[4]]) + [GREY]
    categories = np.where(known, categories, len(names) - 1).astype(np.uint8)
    counts = np.bincount(categories, minlength=len(names))
    legend = [{"name": entry, "colour": colour, "count": int(count)}
              for entry, colour, count in zip(names, colours, counts)]
    legend[-1]["background"] = True
    return categories, legend


def with_comparison_colour(payload: dict, run_id: int, run_key: str, name: str, values: np.ndarray) -> dict:
    """map_payload's arguments recoloured by a Compare colouring (its column file written here once)."""
    categories, legend = comparison_column(name, values)
    if len(categories) != payload["n"]:
        raise ValueError(f"run {run_id}'s map has {payload['n']} points but the comparison gave {len(categories)} values")
    return dict(payload, colour_url=url_of(_write_named(run_folder(run_id, run_key), f"colour-compare-{name}", "u8",
                                                        np.ascontiguousarray(categories).tobytes())),
                legend=legend, colour_title=COMPARE_COLOURINGS[name])


def link_file(run_id: int, run_key: str, shared_of_point: np.ndarray) -> str:
    """The URL of a uint32 file naming each point's shared-image index (UNSHARED where the image is
    not shared): how two linked maps of different datasets find each other's hovered image."""
    data = np.ascontiguousarray(shared_of_point, dtype=np.uint32).tobytes()
    return url_of(_write_named(run_folder(run_id, run_key), "link", "u32", data))


UNSHARED = 0xFFFFFFFF
