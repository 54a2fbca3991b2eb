"""Explore: every point of a run on a WebGL map (UMAP; PCA while it computes), or its test images
across epochs (an aligned map per epoch, played in the browser), neighbours of a clicked point, a
region's images, where the encoder fails, search by images, exports."""
import numpy as np
import streamlit as st

from core.data.display import enlarge
from core.explore.evolution import EVOLUTION_PARAMS, probe_epochs
from core.explore.service import (
    evaluated_index, evolution_path, evolution_payload, label_error_rows, load_run_index, load_run_statistics,
    map_payload, neighbours, query_rows, run_embeddings, search_by_images, statistics_path,
)
from core.explore.failures import confusion_normalised, label_errors, worst_queries
from core.data.images import ImageRejected
from core.runs.jobs import STATISTICS_PARAMS, start_projection
from core.explore.map_files import COLOURINGS, MINING_COLOURINGS
from core.explore.projection import UMAP_DEFAULTS, params_key, project_pca
from core.training.tally_files import mining_epochs
from pages import explore_views as views
from pages.common import METRIC_NAMES, engine, pick_run, pixels_of, stop_if_files_lost
from pages.map import embedding_map
from storage import artifacts, queries
from storage.db import transaction
from storage.schema import Run

st.title("Explore")
run_id = pick_run("Run")
if run_id is None:
    st.info("No completed run yet: train one on the Train page, or load an encoder there.")
    st.stop()

with transaction(engine()) as session:
    run = session.get(Run, run_id)
    run_key, dataset_id, classes, metrics = run.cache_key, run.dataset_id, list(run.dataset.classes), run.metrics or {}
    labels = [row[2] for row in queries.dataset_image_table(session, dataset_id)]
    umap_row = queries.projection(session, run_id, "umap", params_key(UMAP_DEFAULTS))
    umap_path = umap_row.path if umap_row is not None and umap_row.status == "done" else None
    stop_if_files_lost(run)
stats_path = statistics_path(engine(), run_id)
evolution_at = evolution_path(engine(), run_id)
has_probe = bool(probe_epochs(run_id))  # a training run that embedded its probe after every epoch
labelled = any(label is not None for label in labels)

if "unavailable" in metrics:
    st.info(f"No retrieval metrics for this run: {metrics['unavailable']}")
elif metrics:
    for column, (key, title) in zip(st.columns(len(METRIC_NAMES)), METRIC_NAMES.items()):
        column.metric(title, f"{metrics[key]:.3f}")
    st.caption(f"On {metrics.get('n_queries')} {metrics.get('evaluated_on', 'test')} images, each a query against the others.")

# Every cache below is keyed by Run.cache_key (id and creation time), so a run made after a
# deleted one can never be served the deleted one's map, statistics, index or encoder.


@st.cache_data(max_entries=16, show_spinner=False)
def coordinates(run_key: str, run_id: int, method: str, path: str | None) -> np.ndarray:
    if method == "umap":
        return np.load(artifacts.absolute(path))
    return project_pca(run_embeddings(engine(), run_id))


@st.cache_resource(max_entries=4, show_spinner=False)
def run_index(run_key: str, run_id: int):
    """The run's faiss index and labels, built (or loaded) once per run for every click and search."""
    return load_run_index(engine(), run_id)


@st.cache_resource(max_entries=4, show_spinner=False)
def statistics(run_key: str, path: str):
    return load_run_statistics(path)


@st.cache_resource(max_entries=4, show_spinner=False)
def ranker(run_key: str, run_id: int, path: str):
    return evaluated_index(engine(), run_id, statistics(run_key, path).evaluated)


@st.cache_data(max_entries=8, show_spinner="Preparing the map across epochs…")
def epochs_payload(run_key: str, run_id: int, path: str):
    return evolution_payload(engine(), run_id, path)


@st.cache_data(max_entries=32, show_spinner="Preparing the map…")
def payload(run_key: str, run_id: int, method: str, path: str | None, colour: str, stats_path: str | None):
    stats = statistics(run_key, stats_path) if stats_path else None
    return map_payload(engine(), run_id, method, coordinates(run_key, run_id, method, path), colour, stats)


PHASES = {"importing": "Loading UMAP", "compiling": "Compiling UMAP's code", "neighbours": "Finding neighbours",
          "layout": "Laying out the map", "index": "Building the search index",
          "statistics": "Finding where the encoder fails", "sprites": "Writing the map's images",
          "loading": "Reading the probe's embeddings", "frames": "Laying out each epoch"}


def job_state(method: str, params: dict):
    with transaction(engine()) as session:
        row = queries.projection(session, run_id, method, params_key(params))
        return None if row is None else (row.status, row.phase, row.progress, row.message, row.reason)


def show_job(title: str, state) -> None:
    status = state[0]
    if status == "queued":
        st.info(f"{title}: the process is starting.")
    elif status == "running":
        _, phase, progress, message, _ = state
        text = f"{title} · {PHASES.get(phase, 'starting')}" + (f": {message}" if message else "")
        if progress is not None:
            st.progress(min(1.0, max(0.0, progress)), text=text)
        else:
            st.info(text)
    elif status in ("failed", "interrupted", "cancelled"):
        st.warning(f"{title} {status}: {((state[4] or '').strip() or 'no reason recorded').splitlines()[0]}")


# the run's after-work, each a job of its own: (title, method, params, stored path or None)
jobs = [("Statistics", "statistics", STATISTICS_PARAMS, stats_path), ("UMAP map", "umap", UMAP_DEFAULTS, umap_path)]
if has_probe:
    jobs.append(("Map across epochs", "evolution", EVOLUTION_PARAMS, evolution_at))

if any(have is None for *_, have in jobs):
    @st.fragment(run_every=1.5)
    def wait_for_jobs() -> None:
        """The statistics, the map and the map across epochs are jobs of their own; this polls their rows."""
        states = [job_state(method, params) for _, method, params, _ in jobs]
        if any(have is None and state and state[0] == "done" for (*_, have), state in zip(jobs, states)):
            st.rerun(scope="app")
        for (title, *_, have), state in zip(jobs, states):
            if not have and state is not None:
                show_job(title, state)
        known = [s for s in states if s is not None]
        if any(s[0] in ("queued", "running") for s in known):
            st.caption("These run in a process of their own; the PCA preview, neighbours and search work meanwhile.")
        elif any(s is None or s[0] != "done" for s in states):
            if all(s is not None and s[0] == "done" for s in states[:2]):
                label = "Compute the map across epochs"  # the statistics and the map are there
            else:
                label = "Compute them again" if known else "Compute the statistics and the UMAP map"
            if st.button(label):
                try:
                    start_projection(engine(), run_id)
                except ValueError as exc:  # the Ray cluster did not take the job
                    st.error(str(exc))
                else:
                    st.rerun(scope="fragment")

    wait_for_jobs()

stats = None
if stats_path:
    try:
        stats = statistics(run_key, stats_path)
    except (LookupError, ValueError) as exc:  # a stored file that is gone or damaged
        st.warning(f"The run's statistics cannot be read ({exc}); compute them again: "
                   f"`python -m core project --run {run_id}`.")
        stats_path = None

method, path = ("umap", umap_path) if umap_path else ("pca", None)
state_key = f"explore-{run_key}"
for suffix, default in (("point", None), ("region", None), ("focus", None), ("nonce", None)):
    st.session_state.setdefault(f"{state_key}-{suffix}", default)


def take_event(event, image_of=None) -> None:
    """What the person did on a map becomes the page's selection; image_of turns the map's point
    numbers into dataset positions (the map across epochs shows a subset)."""
    if not event or event.get("nonce") == st.session_state[f"{state_key}-nonce"]:
        return
    image_of = image_of if image_of is not None else (lambda i: int(i))
    st.session_state[f"{state_key}-nonce"] = event.get("nonce")
    st.session_state[f"{state_key}-focus"] = None
    if event["type"] == "click":
        st.session_state[f"{state_key}-point"], st.session_state[f"{state_key}-region"] = image_of(event["point"]), None
    elif event["type"] == "region":
        st.session_state[f"{state_key}-point"] = None
        st.session_state[f"{state_key}-region"] = sorted(image_of(i) for i in event["points"])
    else:
        st.session_state[f"{state_key}-point"] = st.session_state[f"{state_key}-region"] = None


VIEWS = {"map": "This run's map", "epochs": "Across epochs"}
view = "map"
if has_probe:
    view = st.radio("Show", list(VIEWS), format_func=VIEWS.get, horizontal=True, key=f"{state_key}-view",
                    help="Across epochs: the test images embedded after every epoch, each epoch laid out in "
                         "coordinates aligned with the next, so a point can be followed as the classes pull apart.")
shown_point, shown_region = st.session_state[f"{state_key}-point"], st.session_state[f"{state_key}-region"]
shown = shown_region or ([shown_point] if shown_point is not None else [])

if view == "epochs":
    st.subheader("Across epochs")
    if evolution_at is None:
        st.info("The map across epochs is computed after the UMAP map, in the same process (see above).")
    else:
        try:
            epoch_arguments, probe = epochs_payload(run_key, run_id, evolution_at)
        except (LookupError, ValueError, OSError) as exc:  # a stored file gone or damaged
            st.error(f"The map across epochs cannot be shown: {exc}. Compute it again: "
                     f"`python -m core project --run {run_id}`.")
        else:
            frames = epoch_arguments["frames"]
            st.caption(f"The same {len(probe):,} images after each of {len(frames)} epochs; each epoch's map starts "
                       "from the next one's and is aligned to it, so a point moves as far as its neighbourhood "
                       "changed. Play, or drag the slider; Precision@1 is measured on these images at that epoch.")
            point_of = {int(position): i for i, position in enumerate(probe)}
            focus = st.session_state[f"{state_key}-focus"]
            event = embedding_map(
                **epoch_arguments, selected=[point_of[p] for p in shown if p in point_of],
                focus=dict(focus, point=point_of[focus["point"]]) if focus and focus["point"] in point_of else None,
                key=f"epochs-{run_key}")
            take_event(event, lambda i: int(probe[int(i)]))
else:
    st.subheader("Map (UMAP)" if method == "umap" else "Map (PCA preview while UMAP computes)")
    mined = bool(mining_epochs(run_id))  # a training run's per-image mining counts (not an embed run's)
    available = [name for name in COLOURINGS
                 if (stats_path or name not in ("nn", "ap")) and (mined or name not in MINING_COLOURINGS)]
    if not labelled:
        available = [name for name in available if name not in ("label", "nn", "ap")] or ["split"]
    colour = st.segmented_control("Colour by", available, default=available[0], format_func=COLOURINGS.get,
                                  key=f"{state_key}-colour") or available[0]
    try:
        arguments = payload(run_key, run_id, method, path, colour, stats_path)
    except (LookupError, ValueError, OSError) as exc:  # a map file gone or damaged
        st.error(f"The map cannot be shown: {exc}. Compute it again: `python -m core project --run {run_id}`.")
        st.stop()
    take_event(embedding_map(**arguments, focus=st.session_state[f"{state_key}-focus"], selected=shown,
                             key=f"map-{run_key}"))

point, region = st.session_state[f"{state_key}-point"], st.session_state[f"{state_key}-region"]
pixels = pixels_of(dataset_id)
most = max(1, min(24, len(labels) - 1))

if region:
    st.subheader(f"Selected region: {len(region):,} images")
    views.region_summary(pixels, region, labels, classes)
    use_filter = st.toggle("Limit the failing queries and label errors below to this region", value=True,
                           key=f"{state_key}-filter")
else:
    use_filter = False

if point is not None:
    st.subheader("Nearest neighbours")
    k = st.slider("Neighbours", 1, most, min(8, most), key=f"{state_key}-k") if most > 1 else 1
    query_column, hits_column = st.columns([1, 6])
    label = labels[point]
    query_column.image(enlarge(pixels[point], 96), width=96,
                       caption=f"query #{point}" + (f" · {classes[label]}" if label is not None else ""))
    with hits_column:
        try:
            views.hits_row(pixels, neighbours(run_index(run_key, run_id), point, k), mark_wrong=False)
        except ValueError as exc:  # an image whose embedding has no neighbours
            st.error(str(exc))
elif not region:
    st.caption("Click a point for its nearest neighbours; Box or Lasso select a region for its images.")

among = np.asarray(region) if use_filter else None
failing, confusion_tab, errors_tab, search_tab, export_tab = st.tabs(
    ["Failing queries", "Confusion", "Label errors", "Search", "Export"])

if stats is None or not labelled:
    why = ("this dataset has no labels, so no query can fail" if not labelled
           else "the run's statistics are not computed yet (see above)")
    for tab in (failing, confusion_tab, errors_tab):
        tab.info(f"Nothing to show: {why}.")
else:
    with failing:
        st.caption("The evaluated queries with the lowest average precision (as MAP@R counts it), each with its "
                   "top results among the evaluated images: ✓ its own class, ✗ another.")
        n_rows = st.slider("Queries", 5, 50, 10, key=f"{state_key}-nfail")
        worst = worst_queries(stats, n_rows, among=among)
        if len(worst) == 0:
            st.info("No evaluated query in the selected region." if among is not None else "No evaluated queries.")
        else:
            views.failing_queries(query_rows(ranker(run_key, run_id, stats_path), stats, worst, 8, classes), pixels,
                                  state_key)
    with confusion_tab:
        st.caption(f"For each query class (rows), the classes of its top {stats.neighbours.shape[1]} results among "
                   "the evaluated images (columns), as a share of them; and each class's own Precision@1 and MAP@R. "
                   "Over every evaluated query, whatever the selection.")
        views.confusion(stats.confusion, confusion_normalised(stats), classes, stats.per_class,
                        stats.neighbours.shape[1])
    with errors_tab:
        st.caption(f"Images whose {stats.neighbours.shape[1]} nearest neighbours mostly carry one other label, "
                   "most convincing first: candidates for a wrong label (or for a class the encoder cannot tell apart).")
        threshold = st.slider("At least this share of neighbours agreeing on another label", 0.5, 1.0, 0.7, 0.05,
                              key=f"{state_key}-share")
        errors = label_errors(stats, 20, min_share=threshold, among=among)
        if not errors:
            st.info("No image passes that threshold" + (" in the selected region." if among is not None else "."))
        else:
            views.label_errors(label_error_rows(stats, errors, 8, classes), pixels, state_key)

with search_tab:
    index = run_index(run_key, run_id).index
    if index.kind == "exact":
        st.caption(f"Exact search over {index.size:,} images.")
    else:
        st.caption(f"Approximate search over {index.size:,} images: {index.describe()}.")
    uploads = st.file_uploader("Images to search with (one or several)", type=["png", "jpg", "jpeg", "webp", "bmp", "gif"],
                               accept_multiple_files=True, key=f"{state_key}-uploads")
    if uploads:
        k_search = st.slider("Results per image", 1, most, min(8, most), key=f"{state_key}-ksearch") if most > 1 else 1
        try:
            each, together = search_by_images(engine(), run_id, [(u.getvalue(), u.name) for u in uploads], k_search,
                                              run_index(run_key, run_id))
        except (ImageRejected, LookupError, ValueError) as exc:
            st.error(str(exc))
        else:
            if together is not None:
                st.markdown(f"**All {len(uploads)} together** (the mean of their embeddings)")
                views.hits_row(pixels, together)
            for upload, hits in zip(uploads, each):
                st.markdown(f"**{upload.name}**")
                views.hits_row(pixels, hits)

with export_tab:
    def extra_columns():
        if stats is None:
            return None
        return {"average_precision": stats.ap, "nn_correct": stats.nn_correct,
                "suspect_label": stats.suspect_label, "suspect_share": stats.suspect_share}

    views.export_buttons(engine(), run_id, extra_columns)
