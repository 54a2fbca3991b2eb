"""Explore: every point of a run on a WebGL map (UMAP; PCA while it computes), or its test images
across epochs (an aligned map per epoch, played in the browser), neighbours of a clicked point, a
region's images, where the encoder fails, search by images, exports."""
import numpy as np
import streamlit as st

from core.data.display import enlarge
from core.explore.evolution import EVOLUTION_PARAMS
from core.explore.projection import UMAP_DEFAULTS
from core.explore.service import explore_run, job_state, neighbours
from core.explore.failures import STATISTICS_PARAMS
from pages import explore_data as data
from pages import explore_views as views
from pages.common import engine, kept_in_url, pixels_of, show_flash, stop_if_files_lost
from pages.explore_jobs import jobs_panel
from pages.explore_map import epochs_view, map_view, seed_from_link, selection_to_link, take_pending
from pages.explore_tabs import export_tab, failure_tabs, search_tab
from pages.run_widgets import METRIC_NAMES, pick_run
from pages.signin import can

st.title("Explore")
show_flash()
run_id = pick_run("Run")
if run_id is None:
    st.info("No completed run yet: train one on the Train page, or load an encoder there.")
    st.stop()

run = explore_run(engine(), run_id)
stop_if_files_lost(run_id, run.embeddings)
run_key, dataset_id, classes, metrics, labels = run.run_key, run.dataset_id, run.classes, run.metrics, run.labels
umap_path, stats_path, evolution_at = run.umap_path, run.statistics_path, run.evolution_path
labelled = any(label is not None for label in labels)

if "unavailable" in metrics:
    st.info(f"No retrieval metrics for this run: {metrics['unavailable']}")
elif metrics:
    for column, (key, title) in zip(st.columns(len(METRIC_NAMES)), METRIC_NAMES.items()):
        column.metric(title, f"{metrics[key]:.3f}")
    if metrics.get("sampled_queries"):  # a large test set (core.explore.metrics.EXACT_UP_TO)
        st.caption(f"Means over {metrics['sampled_queries']:,} randomly sampled queries of the {metrics.get('n_queries'):,} "
                   f"{metrics.get('evaluated_on', 'test')} images, each ranked against all of them.")
    else:
        st.caption(f"On {metrics.get('n_queries')} {metrics.get('evaluated_on', 'test')} images, each a query against the others.")

# the run's after-work, each a job of its own: (title, method, params, stored path or None)
jobs = [("Statistics", "statistics", STATISTICS_PARAMS, stats_path), ("UMAP map", "umap", UMAP_DEFAULTS, umap_path)]
if run.has_probe:
    jobs.append(("Map across epochs", "evolution", EVOLUTION_PARAMS, evolution_at))

if any(have is None for *_, have in jobs):
    @st.fragment(run_every=1.5)
    def wait_for_jobs() -> None:
        """The statistics, the map and the map across epochs are jobs of their own; this polls their rows."""
        states = [job_state(engine(), run_id, method, params) for _, method, params, _ in jobs]
        if any(have is None and state and state.status == "done" for (*_, have), state in zip(jobs, states)):
            st.rerun(scope="app")
        jobs_panel(run_id, jobs, states)

    wait_for_jobs()

stats = None
if stats_path:
    try:
        stats = data.statistics(run_key, stats_path)
    except (LookupError, ValueError) as exc:  # a stored file that is gone or damaged
        st.warning(f"The run's statistics cannot be read ({exc}); compute them again: "
                   f"`python -m core project --run {run_id}`.")
        stats_path = None

method, path = ("umap", umap_path) if umap_path else ("pca", None)
state_key = f"explore-{run_key}"
seed_from_link(state_key, len(labels))

VIEWS = {"map": "This run's map", "epochs": "Across epochs"}
view = "map"
if run.has_probe:
    view = st.radio("Show", list(VIEWS), format_func=VIEWS.get, horizontal=True, key=kept_in_url("view", "map", VIEWS),
                    help="Across epochs: the test images embedded after every epoch, each epoch laid out in "
                         "coordinates aligned with the next, so a point can be followed as the classes pull apart.")
take_pending(state_key, run_key, run_id, view, evolution_at)
views.find_box(run_id, state_key)
selection_to_link(state_key)
shown_point, shown_region = st.session_state[f"{state_key}-point"], st.session_state[f"{state_key}-region"]
shown = shown_region or ([shown_point] if shown_point is not None else [])
if view == "epochs":
    epochs_view(run_key, run_id, evolution_at, state_key, shown)
else:
    map_view(run_key, run_id, method, path, stats_path, labelled, state_key, shown)

point, region = st.session_state[f"{state_key}-point"], st.session_state[f"{state_key}-region"]
pixels = pixels_of(dataset_id)
most = max(1, min(24, len(labels) - 1))

if region:
    st.subheader(f"Selected region: {len(region):,} image{'s' * (len(region) != 1)}")
    views.region_summary(pixels, region, labels, classes)
    if can("edit"):
        views.fix_selection(run_id, dataset_id, run.dataset_version, classes, region, state_key)
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
            views.hits_row(pixels, neighbours(data.run_index(run_key, run_id), point, k), mark_wrong=False)
        except ValueError as exc:  # an image whose embedding has no neighbours
            st.error(str(exc))
elif not region:
    st.caption("Click a point for its nearest neighbours; Box or Lasso select a region for its images.")

among = np.asarray(region) if use_filter else None
TABS = ["Failing queries", "Confusion", "Label errors", "Search", "Export"]
failing, confusion_tab, errors_tab, search, export = st.tabs(TABS, key=kept_in_url("tab", TABS[0], TABS),
                                                             on_change="rerun")
failure_tabs((failing, confusion_tab, errors_tab), stats, labelled, among, run_key, run_id, stats_path, classes,
             pixels, state_key, unavailable=metrics.get("unavailable"))
with search:
    search_tab(run_key, run_id, pixels, most, state_key, [(method, path)])
with export:
    export_tab(run_id)
