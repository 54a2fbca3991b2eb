"""Explore: the run's embedding map (UMAP; PCA while it computes), neighbours, search by image."""
import altair as alt
import numpy as np
import streamlit as st

from core.display import enlarge
from core.explore import load_run_index, map_layers, neighbours, run_embeddings, search_by_image
from core.images import ImageRejected
from core.jobs import refresh_liveness, start_projection
from core.projection import UMAP_DEFAULTS, params_key, project_pca
from pages.common import METRIC_NAMES, engine, pick_run, pixels_of
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
    umap_status = None if umap_row is None else (umap_row.status, umap_row.path)

if "unavailable" in metrics:
    st.info(f"No retrieval metrics for this run: {metrics['unavailable']}")
elif metrics:
    for column, (key, title) in zip(st.columns(len(METRIC_NAMES)), METRIC_NAMES.items()):
        column.metric(title, f"{metrics[key]:.3f}")
    st.caption(f"On {metrics.get('n_queries')} {metrics.get('evaluated_on', 'test')} images, each a query against the others.")

# Every cache below is keyed by Run.cache_key (id and creation time), so a run made after a
# deleted one can never be served the deleted one's map, index or encoder.


@st.cache_data(max_entries=16, show_spinner=False)
def coordinates(run_key: str, run_id: int, method: str, path: str | None) -> np.ndarray:
    if method == "umap":
        return np.load(artifacts.absolute(path))
    return project_pca(run_embeddings(engine(), run_id))


@st.cache_resource(max_entries=4, show_spinner=False)
def run_index(run_key: str, run_id: int):
    """The run's faiss index and labels, built once per run for every click and search."""
    return load_run_index(engine(), run_id)


@st.cache_data(max_entries=8, show_spinner="Preparing the map…")
def layers(run_key: str, run_id: int, method: str, path: str | None):
    return map_layers(coordinates(run_key, run_id, method, path), pixels_of(dataset_id), labels, classes)


PHASES = {"importing": "Loading UMAP", "compiling": "Compiling UMAP's code", "neighbours": "Finding neighbours",
          "layout": "Laying out the map"}

if umap_status and umap_status[0] == "done":
    method, path = "umap", umap_status[1]
else:
    method, path = "pca", None

    @st.fragment(run_every=1.5)
    def wait_for_umap() -> None:
        """The map is a job of its own; this polls its row and says what it is doing."""
        refresh_liveness(engine())
        with transaction(engine()) as session:
            row = queries.projection(session, run_id, "umap", params_key(UMAP_DEFAULTS))
            state = None if row is None else (row.status, row.phase, row.progress, row.message, row.reason)
        status = None if state is None else state[0]
        if status == "done":
            chosen = (st.session_state.get(f"map-{run_key}-pca") or {}).get("selection", {}).get("pick")
            if not chosen:
                st.rerun(scope="app")
            st.success("The UMAP map is ready.")  # a point is selected: switch only when asked
            if st.button("Show the UMAP map"):
                st.rerun(scope="app")
        elif status == "queued":
            st.info("The UMAP map's process is starting; the PCA preview below works meanwhile.")
        elif status == "running":
            _, phase, progress, message, _ = state
            title = PHASES.get(phase, "Starting")
            text = f"{title}: {message}" if message else title
            if progress is not None:
                st.progress(min(1.0, max(0.0, progress)), text=text)
            else:
                st.info(text)
            st.caption("The map computes in a process of its own; the PCA preview below works meanwhile.")
        else:
            if status in ("failed", "interrupted", "cancelled"):
                st.warning(f"The UMAP map {status}: {(state[4] or '').splitlines()[0]}")
            if st.button("Compute the UMAP map" if status is None else "Compute the UMAP map again"):
                start_projection(engine(), run_id)
                st.rerun(scope="fragment")

    wait_for_umap()

points, density = layers(run_key, run_id, method, path)
pick = alt.selection_point(name="pick", fields=["position"], on="click", clear="dblclick")
chart = alt.Chart(points).mark_circle(size=36).encode(
    x=alt.X("x:Q", axis=None), y=alt.Y("y:Q", axis=None),
    color=alt.Color("label:N", legend=alt.Legend(title="label")),
    opacity=alt.condition(pick, alt.value(0.9), alt.value(0.35)),
    tooltip=["image", "label", "position"],
).add_params(pick)
st.subheader(f"Map ({method.upper()})")
if density is not None:
    map_column, density_column = st.columns([4, 1])
    density_column.image(density, caption=f"all {len(labels):,} points, by density", width="stretch")
    map_column.caption(f"A random {len(points):,} of {len(labels):,} points: hover for the image, click for neighbours.")
else:
    map_column = st.container()
with map_column:
    event = st.altair_chart(chart.properties(height=520), on_select="rerun", selection_mode="pick",
                            key=f"map-{run_key}-{method}", width="stretch")

selected = (event.selection.get("pick") or []) if event else []
pixels = pixels_of(dataset_id)
most = max(1, min(24, len(labels) - 1))
k = st.slider("Neighbours", 1, most, min(8, most)) if most > 1 else 1


def show_hits(hits: list[dict]) -> None:
    st.image([enlarge(pixels[h["position"]], 80) for h in hits], width=80,
             caption=[f"{h['label'] or '#' + str(h['position'])} · d={h['distance']:.3f}" for h in hits])


if selected:
    position = int(selected[0]["position"])
    label = labels[position]
    st.subheader("Nearest neighbours")
    st.image(enlarge(pixels[position], 96), width=96, caption=f"query #{position}" + (f" · {classes[label]}" if label is not None else ""))
    try:
        show_hits(neighbours(run_index(run_key, run_id), position, k))
    except ValueError as exc:  # an image whose embedding has no neighbours
        st.error(str(exc))
else:
    st.caption("Click a point to see its nearest neighbours.")

st.subheader("Search by image")
upload = st.file_uploader("An image to search with", type=["png", "jpg", "jpeg", "webp", "bmp", "gif"])
if upload is not None:
    try:
        show_hits(search_by_image(engine(), run_id, upload.getvalue(), upload.name, k, run_index(run_key, run_id)))
    except (ImageRejected, LookupError, ValueError) as exc:
        st.error(str(exc))
