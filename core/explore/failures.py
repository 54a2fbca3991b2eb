"""Where the encoder fails: per-query average precision, confusions, and likely label errors.

`compute_statistics` works out, once per run, what the Explore page shows about failures:

- each evaluated query's average precision as MAP@R defines it (core.explore.metrics: the query against
  the other evaluated images, itself left out, R = the other evaluated members of its class);
- which classes come back for which class's queries (the top K results within the evaluated set);
- each image's K nearest other images over the whole run, whether the nearest carries its label,
  and the label most of its neighbours carry when that is not its own (a likely label error).

Unlabeled images (label -1) are never queries and never relevant to one; inside the evaluated set
they still take places in every query's ranking. Distances are euclidean on the unit sphere.

Cost of the exact AP (n = evaluated images, R + 1 = a class's evaluated size, d = dimension):
the similarities of every query with every evaluated image, n² · d multiply-adds, computed a block
of one class's queries at a time, then per query a linear-time selection of the R most similar
images of other classes, two sorts of R values and a stable merge of the two. No (n, R) ranking is ever held: a block's
similarities stay under `BLOCK_BYTES` (64 MB) plus a few (block, R) arrays.

Measured on the 2-core dev machine (shared; 70,000 × 64, 10 classes; whole call, peak RSS of the
process): evaluated = the last 10,000 (R = 999): 33 s, 191 MB, of which the AP takes 3 s and the
whole run's exact 10-NN (faiss, 70k × 70k) 30 s; evaluated = all 70,000 (R = 6,999): 117 s, 220 MB,
the AP 85 s (np.partition of each query's 63k other-class similarities is about half of it). So
the AP costs about n² · 17 ns here: exact, bounded in memory, but a job, never the page's thread.
Ties between a relevant and an irrelevant image are counted in the query's favour (faiss orders
them arbitrarily), so a tie-heavy embedding (duplicates across classes) can differ from
core.explore.metrics by those ties.

At scale (bench/scale_stats.py): the whole run's neighbours come from the run's k-NN file
(core.explore.knn: computed once per run, exact up to 100,000 images, IVF above, and read by the
map too); past AP_EXACT_UP_TO evaluated images the AP is computed for AP_SAMPLE randomly chosen
queries only (each against every evaluated image, exactly), and `summary["map_at_r"]` states the
sample's size and its 95 % interval, where small runs say "exact". Precision@1, the confusion
matrix and the label errors always use every image.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from core.explore import knn as run_knn
from core.explore.search import NeighbourIndex, as_normalised_float32, nonfinite_rows
from storage.artifacts import temp_file_for

STATISTICS_PARAMS = {"k": 10}  # neighbours per image behind nn-correct, label errors and the confusion matrix
BLOCK_BYTES = 64 * 2**20  # similarities of one block of AP queries against the evaluated set
SEARCH_BLOCK = 8192  # queries per faiss call for the K nearest neighbours (only for progress)
# evaluated images; more and the AP is computed for a random sample of AP_SAMPLE queries. The exact AP
# costs about n² · 17 ns idle: 50,000 → 45 s; 100,000 all evaluated took 420 s on the shared 2-core
# machine at a load average of 6 (bench/scale_stats.py), longer than the sampled AP of a million.
AP_EXACT_UP_TO = 50_000
SAMPLE_BLOCK_BYTES = 128 * 2**20  # similarities of one block of sampled AP queries against the evaluated set
AP_SAMPLE = 2_000  # sampled queries: MAP@R's 95 % interval is then about ±0.01 (per-query AP's spread ≈ 0.25)
AP_SEED = 0  # the sample depends only on the evaluated images and their labels: two runs of one dataset share it
CONFIDENCE = 0.95


@dataclass
class RunStatistics:
    """Per-image failure statistics of one run's embeddings (N images, K neighbours, C classes)."""

    labels: np.ndarray  # (N,) int64, -1 = unlabeled
    evaluated: np.ndarray  # (N,) bool: the run's metric queries (test split, or all images)
    ap: np.ndarray  # (N,) float32: MAP@R's per-query term within the evaluated set; NaN where none
    neighbours: np.ndarray  # (N, K) int64: the K nearest other images over the whole run
    distances: np.ndarray  # (N, K) float32, nearest first
    nn_correct: np.ndarray  # (N,) int8: 1 nearest carries the label, 0 not, -1 unlabeled
    confusion: np.ndarray  # (C, C) int64: query class → classes of its top-K evaluated results
    per_class: list  # dicts: class, n_queries, precision_at_1, map_at_r; classes with a usable query
    suspect_label: np.ndarray  # (N,) int64: most common other label among the K neighbours, -1 none
    suspect_share: np.ndarray  # (N,) float32: share of the K neighbours carrying suspect_label
    # how the figures were obtained: {"map_at_r": {method "exact" | "sampled", value, low, high,
    # confidence, queries, population}, "neighbours": {kind "exact" | "ivf", recall_at_10, ...}}
    summary: dict = field(default_factory=dict)


def compute_statistics(embeddings: np.ndarray, labels: np.ndarray, evaluated: np.ndarray, k: int = 10,
                       on_progress: Optional[Callable[[float], None]] = None,
                       block_size: Optional[int] = None, index: Optional[NeighbourIndex] = None,
                       knn: Optional[run_knn.RunKnn] = None, ap_sample: Optional[int] = None,
                       ap_seed: int = AP_SEED) -> RunStatistics:
    """Statistics of a run: embeddings (N, d), labels (N,) with -1 for unlabeled, evaluated a
    boolean mask (N,) or row positions (the images the run's metrics query).

    k shrinks to N − 1 on tiny runs. block_size: AP queries per block (default: as many as keep a
    block's similarities under BLOCK_BYTES). on_progress(fraction) is called now and then.
    ValueError for embeddings with NaN or infinity, mismatched lengths, or fewer than two images.
    index: the run's own index over these embeddings (an approximate one past
    core.explore.search.APPROXIMATE_ABOVE images) for the whole-run neighbours; exact when None.
    knn: the run's whole k-NN (core.explore.knn, computed once per run): its first k other
    columns are the neighbours, and nothing is searched for them here (index is then unused).
    ap_sample: how many evaluated queries get an AP; None = every one up to AP_EXACT_UP_TO evaluated
    images, else AP_SAMPLE. With a sample, `ap` is NaN outside it and summary["map_at_r"] gives
    the sample's mean MAP@R with its CONFIDENCE interval (t interval, finite-population corrected);
    the sample is drawn with ap_seed from the usable queries alone, so it is the same for any run
    of the same images and labels.
    """
    embeddings = np.asarray(embeddings)
    labels = np.asarray(labels)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be one row per image (N, d); got shape {embeddings.shape}")
    n = len(embeddings)
    if labels.shape != (n,):
        raise ValueError(f"{n} embeddings but labels of shape {labels.shape}; they must be one per image")
    if n and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be class indices (integers, -1 for unlabeled); got {labels.dtype}")
    labels = labels.astype(np.int64)
    if (labels < -1).any():
        raise ValueError("labels must be class indices from 0, or -1 for unlabeled; found values below -1")
    bad = nonfinite_rows(embeddings)
    if bad:
        raise ValueError(f"embeddings of {bad} of {n} images are NaN or infinite")
    if n < 2:
        raise ValueError(f"failure statistics need at least two images; this run has {n}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a whole number of neighbours from 1, got {k}")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer))
                                   or block_size < 1):
        raise ValueError(f"block_size must be a whole number of queries from 1, got {block_size}")
    if ap_sample is not None and (isinstance(ap_sample, bool) or not isinstance(ap_sample, (int, np.integer))
                                  or ap_sample < 2):
        raise ValueError(f"ap_sample must be a whole number of queries from 2, got {ap_sample}")
    evaluated = _as_mask(evaluated, n, "evaluated")
    k = min(int(k), n - 1)
    if knn is not None and len(knn.ids) != n:
        raise ValueError(f"the run's k-NN holds {len(knn.ids):,} images but the run has {n:,}")
    if knn is not None and knn.width - 1 < k:
        raise ValueError(f"the run's k-NN holds {knn.width - 1} neighbours per image, fewer than k = {k}")
    unit = as_normalised_float32(embeddings)
    eval_rows = np.flatnonzero(evaluated)
    queries = eval_rows[labels[eval_rows] >= 0]
    n_classes = int(labels.max()) + 1 if (labels >= 0).any() else 0

    # the AP's queries: every usable one, or a seeded sample of them
    class_sizes = np.bincount(labels[queries], minlength=n_classes) if n_classes else np.zeros(0, np.int64)
    usable_queries = queries[class_sizes[labels[queries]] >= 2] if len(queries) else queries
    if ap_sample is None and len(eval_rows) > AP_EXACT_UP_TO:
        ap_sample = AP_SAMPLE
    sampled = ap_sample is not None and ap_sample < len(usable_queries)
    if sampled:
        ap_rows = np.sort(np.random.default_rng(ap_seed).choice(usable_queries, int(ap_sample), replace=False))
    else:
        ap_rows = usable_queries

    # progress by work done: pairs of (query, stored image) looked at
    eval_k = min(k, len(eval_rows) - 1)
    separate_eval_search = not evaluated.all() and eval_k >= 1 and len(queries)
    total = (0.0 if knn is not None else float(n) * n) \
        + (len(queries) * len(eval_rows) if separate_eval_search else 0) + len(ap_rows) * len(eval_rows)
    total = max(total, 1.0)
    done = [0.0]

    def advance(work: float) -> None:
        done[0] += work
        if on_progress is not None:
            on_progress(min(1.0, done[0] / total))

    if knn is not None:
        distances, neighbours = run_knn.others(knn, k)
        neighbours_summary = knn.summary()
    else:
        if index is None:
            index = NeighbourIndex(unit, approximate=False)
        elif index.size != n:
            raise ValueError(f"the index holds {index.size} images but the run has {n}")
        distances, neighbours = _nearest_others(index, unit, np.arange(n), k, lambda q: advance(float(q) * n))
        neighbours_summary = {"kind": index.kind, "width": k + 1, "recall_at_10": index.recall_at_10,
                              "params": dict(index.params)}
    has_label = labels >= 0
    nn_correct = np.where(has_label, labels[neighbours[:, 0]] == labels, -1).astype(np.int8)
    suspect_label, suspect_share = _suspects(labels, neighbours)

    # the evaluated queries' top K within the evaluated set: confusion and Precision@1
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    first_relevant = np.zeros(n, dtype=bool)
    if eval_k >= 1 and len(queries):
        if evaluated.all():
            top = neighbours[queries][:, :eval_k]
        else:
            # exact within the evaluated set up to the k-NN's own threshold, as the whole run's
            eval_index = NeighbourIndex(unit[eval_rows], approximate=len(eval_rows) > run_knn.EXACT_UP_TO)
            position_in_eval = np.searchsorted(eval_rows, queries)
            _, top = _nearest_others(eval_index, unit[queries], position_in_eval, eval_k,
                                     lambda q: advance(float(q) * len(eval_rows)))
            top = eval_rows[top]
        result_labels = labels[top]
        counted = result_labels >= 0
        pairs = np.repeat(labels[queries], eval_k)[counted.ravel()] * n_classes + result_labels[counted]
        confusion += np.bincount(pairs, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
        first_relevant[queries] = result_labels[:, 0] == labels[queries]

    ap = np.full(n, np.nan, dtype=np.float32)
    if sampled:
        _sampled_average_precision(unit, labels, eval_rows, ap_rows, ap, block_size,
                                   lambda q: advance(float(q) * len(eval_rows)))
    else:
        _average_precision(unit, labels, eval_rows, ap, block_size, lambda q: advance(float(q) * len(eval_rows)))

    per_class = []
    usable = np.isfinite(ap)
    if sampled:  # Precision@1 from every usable query (the k-NN has them all), MAP@R from the sample
        is_usable = np.zeros(n, dtype=bool)
        is_usable[usable_queries] = True
    for cls in range(n_classes):
        members = usable & (labels == cls)
        if not sampled:
            if members.any():
                per_class.append({"class": cls, "n_queries": int(members.sum()),
                                  "precision_at_1": float(first_relevant[members].mean()),
                                  "map_at_r": float(ap[members].astype(np.float64).mean())})
            continue
        everyone = is_usable & (labels == cls)
        if everyone.any():
            row = {"class": cls, "n_queries": int(everyone.sum()),
                   "precision_at_1": float(first_relevant[everyone].mean()),
                   "map_at_r": None, "map_queries": int(members.sum()), "map_low": None, "map_high": None}
            if members.any():
                estimate = mean_interval(ap[members], int(everyone.sum()))
                row.update(map_at_r=estimate["value"], map_low=estimate["low"], map_high=estimate["high"])
            per_class.append(row)
    if sampled:
        overall = {"method": "sampled", **mean_interval(ap[ap_rows], len(usable_queries)), "seed": int(ap_seed)}
    else:
        values = ap[usable].astype(np.float64)
        value = float(values.mean()) if len(values) else None
        overall = {"method": "exact", "value": value, "low": value, "high": value, "confidence": CONFIDENCE,
                   "queries": int(len(values)), "population": int(len(values))}
    if on_progress is not None:
        on_progress(1.0)
    return RunStatistics(labels=labels, evaluated=evaluated, ap=ap, neighbours=np.ascontiguousarray(neighbours),
                         distances=np.ascontiguousarray(distances, dtype=np.float32), nn_correct=nn_correct,
                         confusion=confusion, per_class=per_class, suspect_label=suspect_label,
                         suspect_share=suspect_share,
                         summary={"map_at_r": overall, "neighbours": neighbours_summary})


def mean_interval(values: np.ndarray, population: int, confidence: float = CONFIDENCE) -> dict:
    """The mean of a simple random sample (without replacement) of per-query figures, with its
    two-sided t interval, finite-population corrected (the interval closes when the sample is the
    whole population) and clipped to [0, 1]: {value, low, high, confidence, queries, population}."""
    from scipy.stats import t as student

    values = np.asarray(values, dtype=np.float64)
    s = len(values)
    value = float(values.mean())
    if s < 2 or population <= s:
        half = 0.0
    else:
        correction = math.sqrt((population - s) / (population - 1))
        half = float(student.ppf(0.5 + confidence / 2, s - 1) * values.std(ddof=1) / math.sqrt(s) * correction)
    return {"value": value, "low": max(0.0, value - half), "high": min(1.0, value + half),
            "confidence": confidence, "queries": int(s), "population": int(population)}


def describe_map_at_r(stats: RunStatistics) -> str:
    """One line for users: the run's MAP@R over its evaluated queries, and whether it is exact or
    estimated from a sample (then its size and 95 % interval); "" for statistics of earlier
    versions (exact, without a summary) or when no query has an AP."""
    figure = stats.summary.get("map_at_r") or {}
    if figure.get("value") is None:
        return ""
    if figure.get("method") == "sampled":
        return (f"MAP@R {figure['value']:.3f}, {figure['confidence']:.0%} interval {figure['low']:.3f}–{figure['high']:.3f}: "
                f"estimated from {figure['queries']:,} randomly sampled queries of {figure['population']:,} "
                "(average precision is computed for those only)")
    return f"MAP@R {figure['value']:.3f}, exact over all {figure['queries']:,} queries"


def worst_queries(stats: RunStatistics, n: int = 20, among=None) -> np.ndarray:
    """Positions of the n evaluated queries with the lowest AP (ties by position), optionally only
    among a boolean mask or positions (the page's selection)."""
    candidates = np.isfinite(stats.ap) & _as_mask(among, len(stats.ap), "among")
    positions = np.flatnonzero(candidates)
    order = np.lexsort((positions, stats.ap[positions]))
    return positions[order[:max(int(n), 0)]].astype(np.int64)


def label_errors(stats: RunStatistics, n: int = 20, min_share: float = 0.5, among=None) -> list[dict]:
    """Images whose K neighbours mostly carry one other label, most convincing first.

    Rows {position, label, suspect_label, share, mean_distance}: share = fraction of the K
    neighbours carrying suspect_label, mean_distance = mean distance to those neighbours. Ranked
    by share (high first), then mean distance (near first), then position; only share ≥ min_share.
    """
    candidates = (stats.suspect_label >= 0) & (stats.suspect_share >= np.float32(min_share)) \
        & _as_mask(among, len(stats.labels), "among")
    positions = np.flatnonzero(candidates)
    if not len(positions):
        return []
    carries = stats.labels[stats.neighbours[positions]] == stats.suspect_label[positions][:, None]
    mean_distance = (stats.distances[positions].astype(np.float64) * carries).sum(axis=1) / carries.sum(axis=1)
    share = stats.suspect_share[positions]
    order = np.lexsort((positions, mean_distance, -share))[:max(int(n), 0)]
    return [{"position": int(positions[i]), "label": int(stats.labels[positions[i]]),
             "suspect_label": int(stats.suspect_label[positions[i]]), "share": float(share[i]),
             "mean_distance": float(mean_distance[i])} for i in order]


def confusion_normalised(stats: RunStatistics) -> np.ndarray:
    """The confusion counts as shares of each query class's results: rows sum to 1, or are all
    zero for a class with no evaluated queries."""
    counts = stats.confusion.astype(np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def save_statistics(stats: RunStatistics, path) -> None:
    """One .npz at `path` (per_class as JSON inside), written to NAME.<pid>.tmp then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f.name: getattr(stats, f.name) for f in fields(RunStatistics) if f.name not in ("per_class", "summary")}
    arrays["per_class"] = np.array(json.dumps(stats.per_class))
    arrays["summary"] = np.array(json.dumps(stats.summary))
    tmp = temp_file_for(path)
    try:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


_DTYPES = {"labels": np.int64, "evaluated": bool, "ap": np.float32, "neighbours": np.int64,
           "distances": np.float32, "nn_correct": np.int8, "confusion": np.int64,
           "suspect_label": np.int64, "suspect_share": np.float32}


def load_statistics(path) -> RunStatistics:
    """The statistics saved at `path`. LookupError when there is no such file; ValueError naming
    the file when it is corrupt, lacks a field, or its fields disagree in size."""
    path = Path(path)
    if not path.is_file():
        raise LookupError(f"failure statistics file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [name for name in [*_DTYPES, "per_class"] if name not in archive.files]
            if missing:
                raise ValueError(f"it lacks {', '.join(missing)}")
            values = {name: archive[name].astype(dtype, copy=False) for name, dtype in _DTYPES.items()}
            per_class = json.loads(str(archive["per_class"]))
            # files of earlier versions have no summary: their figures were all exact
            summary = json.loads(str(archive["summary"])) if "summary" in archive.files else {}
    except Exception as exc:  # a zip, npy or JSON error of any kind means the file cannot be used
        raise ValueError(f"failure statistics file {path} is corrupt or incomplete: {exc}") from None
    n = len(values["labels"])
    k = values["neighbours"].shape[1] if values["neighbours"].ndim == 2 else -1
    c = len(values["confusion"])
    shapes_ok = all(values[name].shape == (n,) for name in
                    ("evaluated", "ap", "nn_correct", "suspect_label", "suspect_share")) \
        and values["neighbours"].shape == values["distances"].shape == (n, k) \
        and values["confusion"].shape == (c, c) and isinstance(per_class, list) and isinstance(summary, dict)
    if not shapes_ok:
        raise ValueError(f"failure statistics file {path} is corrupt: its fields disagree in size")
    return RunStatistics(per_class=per_class, summary=summary, **values)


def _as_mask(selection, n: int, what: str) -> np.ndarray:
    """A boolean mask (n,) from None (everything), a boolean mask, or row positions."""
    if selection is None:
        return np.ones(n, dtype=bool)
    selection = np.asarray(selection)
    if selection.dtype == bool:
        if selection.shape != (n,):
            raise ValueError(f"{what} as a mask must have one entry per image ({n}); got shape {selection.shape}")
        return selection.copy()
    if selection.size and not np.issubdtype(selection.dtype, np.integer):
        raise ValueError(f"{what} must be a boolean mask or image positions; got {selection.dtype}")
    positions = selection.astype(np.int64).ravel()
    if positions.size and (positions.min() < 0 or positions.max() >= n):
        raise ValueError(f"{what} holds positions outside 0 to {n - 1}")
    mask = np.zeros(n, dtype=bool)
    mask[positions] = True
    return mask


def _nearest_others(index: NeighbourIndex, queries: np.ndarray, query_ids: np.ndarray, k: int,
                    advance: Callable[[int], None]) -> tuple[np.ndarray, np.ndarray]:
    """(distances, ids), each (Q, k): the k nearest stored rows of each query other than the row
    `query_ids` names (itself), as core.explore.metrics drops it: wherever faiss put it, else the last."""
    all_distances, all_ids = [], []
    for start in range(0, len(queries), SEARCH_BLOCK):
        block = slice(start, start + SEARCH_BLOCK)
        distances, ids = index.search(queries[block], min(k + 1, index.size))
        is_self = ids == query_ids[block][:, None]
        keep = np.where(is_self.any(axis=1, keepdims=True), ~is_self, np.arange(ids.shape[1])[None, :] < k)
        all_distances.append(distances[keep].reshape(len(ids), k))
        all_ids.append(ids[keep].reshape(len(ids), k))
        advance(len(ids))
    return np.concatenate(all_distances), np.concatenate(all_ids).astype(np.int64)


def _suspects(labels: np.ndarray, neighbours: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image the most common label among its neighbours other than its own (ties: the one
    met nearest first) and the share of neighbours carrying it; -1 and 0 when none or unlabeled."""
    near = labels[neighbours]  # (N, K)
    other = (near >= 0) & (near != labels[:, None]) & (labels[:, None] >= 0)
    counts = ((near[:, :, None] == near[:, None, :]) & other[:, None, :]).sum(axis=2) * other  # (N, K)
    best = counts.argmax(axis=1)
    top = counts[np.arange(len(labels)), best]
    suspect = np.where(top > 0, near[np.arange(len(labels)), best], -1).astype(np.int64)
    return suspect, (top / neighbours.shape[1]).astype(np.float32)


def _average_precision(unit: np.ndarray, labels: np.ndarray, eval_rows: np.ndarray, ap: np.ndarray,
                       block_size: Optional[int], advance: Callable[[int], None]) -> None:
    """Fill ap[q] for every evaluated labeled query whose class has another evaluated member.

    Per class (R + 1 evaluated members), for a block of its queries: similarities with the class
    (relevant, self masked) and with the rest of the evaluated set. Only the R most similar
    irrelevant images can rank within the first R, found by np.partition (linear time); sorted,
    merged with the sorted relevant ones, the first R ranks give MAP@R's per-query term:
    Σ over relevant images at rank i ≤ R of (relevant images up to i) / i, over R.
    """
    eval_labels = labels[eval_rows]
    for cls in np.unique(eval_labels[eval_labels >= 0]):
        members = eval_rows[eval_labels == cls]
        r = len(members) - 1
        if r < 1:
            advance(len(members))
            continue
        rest = unit[eval_rows[eval_labels != cls]]
        relevant_vectors = unit[members]
        m = min(r, len(rest))  # irrelevant images that can rank within the first R
        # a block's similarities (4 bytes each) and its few (block, R) float64 arrays within BLOCK_BYTES
        rows = block_size or max(1, BLOCK_BYTES // (4 * len(eval_rows) + 48 * r))
        for start in range(0, len(members), rows):
            block = members[start:start + rows]
            b = len(block)
            similar = unit[block] @ relevant_vectors.T  # (b, R + 1)
            similar[np.arange(b), np.arange(start, start + b)] = -np.inf  # itself: sorts first, dropped
            similar.sort(axis=1)
            if m:
                other = unit[block] @ rest.T  # (b, n − R − 1)
                if m < other.shape[1]:
                    other.partition(other.shape[1] - m, axis=1)
                other = np.sort(other[:, other.shape[1] - m:], axis=1)  # (b, m), ascending
                # two sorted runs, merged by a stable sort; relevant after irrelevant so that, read
                # from the most similar end, a tie puts the relevant image first
                order = np.argsort(np.concatenate([other, similar[:, 1:]], axis=1), axis=1, kind="stable")
                del other, similar
                hits = order[:, :-r - 1:-1] >= m  # (b, R): the first R ranks, relevant or not
                del order
            else:
                hits = np.ones((b, r), dtype=bool)
            j = np.arange(1, r + 1)[None, :]
            precision = np.divide(np.cumsum(hits, axis=1, dtype=np.int32), j, where=hits, out=np.zeros(hits.shape))
            ap[block] = (precision.sum(axis=1) / r).astype(np.float32)
            advance(b)


def _sampled_average_precision(unit: np.ndarray, labels: np.ndarray, eval_rows: np.ndarray, ap_rows: np.ndarray,
                               ap: np.ndarray, block_size: Optional[int], advance: Callable[[int], None]) -> None:
    """Fill ap[q] for the queries ap_rows (evaluated, labeled, of a class with another evaluated
    member): the same per-query term as _average_precision, for a sample of queries.

    A block of queries (any classes) against every evaluated image at once, one matrix product
    (no copy of the evaluated set per class: a million rows are 512 MB); then per query, itself
    set to −inf, np.argpartition finds the R most similar evaluated images (linear time), and those
    at least as similar as the R-th, ordered by similarity with relevant first on ties (ties count
    in the query's favour, as in _average_precision), give the first R ranks. Queries are spread
    over this process's share of the cores (numpy's partition and comparisons release the GIL);
    the product runs on that many BLAS threads.
    """
    from concurrent.futures import ThreadPoolExecutor

    from core.explore.knn import blas_threads
    from core.threads import thread_share

    everything = len(eval_rows) == len(unit)
    references = unit if everything else unit[eval_rows]
    eval_labels = labels[eval_rows]
    class_sizes = np.bincount(eval_labels[eval_labels >= 0], minlength=int(labels.max()) + 1)
    n_eval = len(eval_rows)
    rows = block_size or max(1, SAMPLE_BLOCK_BYTES // (4 * n_eval))
    threads = thread_share()

    def one_query(similar_row: np.ndarray, query: int) -> float:
        cls = labels[query]
        r = int(class_sizes[cls]) - 1
        top = np.argpartition(similar_row, n_eval - r)[n_eval - r:]
        threshold = similar_row[top].min()
        candidates = np.flatnonzero(similar_row >= threshold)
        relevant = eval_labels[candidates] == cls
        order = np.lexsort((~relevant, -similar_row[candidates]))[:r]
        hits = relevant[order]
        return float((np.cumsum(hits)[hits] / np.arange(1, r + 1)[hits]).sum() / r)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        for start in range(0, len(ap_rows), rows):
            block = ap_rows[start:start + rows]
            with blas_threads(threads):
                similar = unit[block] @ references.T  # (b, n_eval)
            similar[np.arange(len(block)), np.searchsorted(eval_rows, block)] = -np.inf  # itself: never ranked
            ap[block] = np.fromiter(pool.map(one_query, similar, block), dtype=np.float64, count=len(block))
            del similar
            advance(len(block))
