"""The Compare page's parts: picking runs A and B, the comparison cached per pair, the two linked
maps (one selection of shared images, drawn in both), and the tables below them.

The page's selection is kept as shared-image indices (core.explore.compare.Comparison: shared
image i is image positions_a[i] of A's dataset and positions_b[i] of B's), so a click, box or
lasso in either map selects the same images in the other, whichever datasets the runs embedded."""
from __future__ import annotations

from typing import Optional

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from core.data.display import enlarge
from core.explore.compare import CONFIDENCE, METRIC_NAMES, Comparison, compare_runs
from core.explore.failures import STATISTICS_PARAMS
from core.explore.map_files import AP_CHANGE_BINS, COMPARE_COLOURINGS, UNSHARED, link_file, with_comparison_colour
from core.explore.projection import UMAP_DEFAULTS
from core.explore.service import ExploreRun, job_state
from core.runs.overview import run_snapshot, run_snapshots
from pages import explore_data as data
from pages.common import engine, kept_in_url
from pages.explore_jobs import jobs_panel
from pages.explore_views import THUMB, hits_row
from pages.map import embedding_map
from pages.run_widgets import has_embeddings, run_label

SIDES = ("a", "b")
PCT = f"{CONFIDENCE:.0%}"


# ----------------------------------------------------------------------------- picking the pair


def _link_problem(name: str, ids: list[int]) -> Optional[str]:
    """What is wrong with the link's `?a=` or `?b=` (None when it is fine or absent)."""
    wanted = st.query_params.get(name)
    if wanted is None or name in st.session_state:
        return None
    if not wanted.strip().isdigit():
        return f"The link names {wanted!r} as run {name.upper()}, which is not a run number."
    if int(wanted) not in ids:
        try:
            found = run_snapshot(engine(), int(wanted))
        except LookupError:
            return f"The link names run {wanted} as run {name.upper()}, but run {wanted} does not exist (deleted?)."
        return (f"The link names run {wanted} as run {name.upper()}, but run {wanted} is {found.status}: "
                "it has no embeddings to compare" + (" yet." if found.active else "."))
    return None


def pick_pair() -> Optional[tuple[int, int]]:
    """Run A and run B from two select boxes kept in the URL (?a=&b=); the newest run is B, the one
    before it A. None (with a sentence) when fewer than two runs can be compared."""
    runs = [run for run in run_snapshots(engine(), completed_only=True) if has_embeddings(run)]
    if len(runs) < 2:
        st.info("Compare needs two completed runs with embeddings: train another on the Train page.")
        return None
    labels = {run.id: run_label(run) for run in runs}
    ids = list(labels)
    for name in SIDES:
        problem = _link_problem(name, ids)
        if problem:
            st.warning(problem + " Pick the run below.")
    left, right = st.columns(2)
    a = left.selectbox("Run A", ids, format_func=labels.get, key=kept_in_url("a", ids[1], ids, int))
    b = right.selectbox("Run B", ids, format_func=labels.get, key=kept_in_url("b", ids[0], ids, int))
    if a == b:
        st.warning(f"Run A and run B are both run #{a}: pick two different runs to compare.")
        return None
    return a, b


def statistics_missing(runs: list[ExploreRun]) -> bool:
    """True (with each such run's jobs and the button that starts them) when a run's statistics,
    which the comparison reads, are not computed yet; reruns the page when they are."""
    missing = [run for run in runs if run.statistics_path is None]
    if not missing:
        return False

    @st.fragment(run_every=2.0)
    def wait_for_statistics() -> None:
        for run in missing:
            jobs = [("Statistics", "statistics", STATISTICS_PARAMS, None),
                    ("UMAP map", "umap", UMAP_DEFAULTS, run.umap_path)]
            states = [job_state(engine(), run.run_id, method, params) for _, method, params, _ in jobs]
            if states[0] is not None and states[0].status == "done":
                st.rerun(scope="app")
            st.markdown(f"**Run #{run.run_id}**: its statistics (each image's neighbours and average precision) "
                        "are not computed yet, and the comparison reads them.")
            with st.container(key=f"jobs-{run.run_id}"):
                jobs_panel(run.run_id, jobs, states)

    wait_for_statistics()
    return True


def wait_for_maps(runs: list[ExploreRun]) -> None:
    """While a run's UMAP map is computing, its progress under the maps (they show the PCA
    preview meanwhile), and the page reruns once it lands, as Explore does."""
    missing = [run for run in runs if run.umap_path is None]
    if not missing:
        return

    @st.fragment(run_every=2.0)
    def poll() -> None:
        for run in missing:
            state = job_state(engine(), run.run_id, "umap", UMAP_DEFAULTS)
            if state is None:
                continue
            if state.status == "done":
                st.rerun(scope="app")
            if state.status in ("queued", "running"):
                progress = f" ({state.progress:.0%})" if state.progress is not None else ""
                st.caption(f"Run #{run.run_id}'s UMAP map is {state.status}: {state.message or state.phase or 'starting'}"
                           f"{progress}. Its PCA preview shows until it lands.")

    poll()


@st.cache_resource(max_entries=4, show_spinner="Comparing the two runs…")
def comparison(key_a: str, key_b: str, a: int, b: int) -> tuple[Comparison, dict]:
    """The comparison of the pair (about 1 s on 70,000 images: cached per pair of Run.cache_key),
    and each side's point → shared-index column. Runs without labels are compared by neighbourhood
    agreement alone. ValueError with compare_runs's sentence."""
    try:
        c = compare_runs(engine(), a, b)
    except ValueError as exc:
        if "no query in common" not in str(exc):
            raise
        c = compare_runs(engine(), a, b, metrics=False)
    shared = {}
    for side, positions, n in (("a", c.positions_a, c.n_images_a), ("b", c.positions_b, c.n_images_b)):
        column = np.full(n, UNSHARED, dtype=np.uint32)
        column[positions] = np.arange(len(positions), dtype=np.uint32)
        shared[side] = column
    return c, shared


# ----------------------------------------------------------------------------- the linked maps


def selection_key(runs: dict[str, ExploreRun]) -> str:
    return f"compare-{runs['a'].run_key}-{runs['b'].run_key}"


def take_pending(c: Comparison, shared: dict, runs: dict[str, ExploreRun]) -> list[int]:
    """Both maps' newest events become the page's one selection (shared-image indices), taken
    before either map is drawn: taken after, a map drew the previous selection."""
    state = selection_key(runs)
    st.session_state.setdefault(f"{state}-selected", [])
    for side in SIDES:
        event = st.session_state.get(f"{state}-map-{side}")
        if not event or event.get("nonce") == st.session_state.get(f"{state}-nonce-{side}"):
            continue
        st.session_state[f"{state}-nonce-{side}"] = event.get("nonce")
        points = [event["point"]] if event["type"] == "click" else event.get("points", [])
        found = shared[side][np.asarray(points, dtype=np.int64)] if points else np.zeros(0, dtype=np.uint32)
        st.session_state[f"{state}-selected"] = sorted(int(i) for i in found if i != UNSHARED)
    return st.session_state[f"{state}-selected"]


def colourings(c: Comparison, labelled: bool) -> list[str]:
    names = [name for name in COMPARE_COLOURINGS if labelled or name == "agreement"]
    return [name for name in names if c.has_metrics or name in ("label", "agreement")]


def map_column(side: str, c: Comparison, shared: dict, runs: dict[str, ExploreRun], selected: list[int]) -> None:
    """One run's map (UMAP, or the PCA preview while UMAP computes), coloured as the person picks,
    with the page's selection drawn in it."""
    run = runs[side]
    state = selection_key(runs)
    method, path = ("umap", run.umap_path) if run.umap_path else ("pca", None)
    st.subheader(f"{side.upper()}: run #{run.run_id} " + ("(UMAP)" if method == "umap" else "(PCA preview)"))
    options = colourings(c, any(label is not None for label in run.labels))
    colour = st.segmented_control("Colour by", options, format_func=_colour_name,
                                  key=kept_in_url(f"colour_{side}", options[0], options)) or options[0]
    try:
        arguments = data.payload(run.run_key, run.run_id, method, path, "label", run.statistics_path)
        if colour != "label":
            arguments = with_comparison_colour(arguments, run.run_id, run.run_key, colour, c.image_values(colour, side))
    except (LookupError, ValueError, OSError) as exc:  # a map file gone or damaged
        st.error(f"Run #{run.run_id}'s map cannot be shown: {exc}. Compute it again: "
                 f"`python -m core project --run {run.run_id}`.")
        return
    positions = c.positions_a if side == "a" else c.positions_b
    url = None if c.aligned_by == "position" else link_file(run.run_id, run.run_key, shared[side])
    embedding_map(**arguments, selected=positions[np.asarray(selected, dtype=np.int64)].tolist(),
                  link={"group": state, "url": url}, height=480, key=f"{state}-map-{side}")


def _colour_name(name: str) -> str:
    return {"label": "label", "agreement": "agreement", "ap_change": "AP change", "flip": "NN flip"}[name]


# ----------------------------------------------------------------------------- below the maps


def selection_summary(c: Comparison, selected: list[int], pixels_a) -> None:
    """The selected shared images: their count, their classes and the first of them."""
    if not selected:
        st.caption("Click, box or lasso points in either map: the same images light up in the other.")
        return
    st.subheader(f"Selected: {len(selected):,} shared images")
    chosen = np.asarray(selected, dtype=np.int64)
    names = [c.classes[label] if label >= 0 else "unlabeled" for label in c.labels[chosen]]
    left, right = st.columns([1, 3])
    counts = pd.Series(names).value_counts().rename_axis("class").reset_index(name="images")
    left.dataframe(counts, hide_index=True, width="stretch")
    shown = chosen[:24]
    right.image([enlarge(pixels_a[c.positions_a[i]], THUMB) for i in shown], width=THUMB,
                caption=[f"agreement {c.agreement[i]:.2f} · {name}" for i, name in zip(shown, names)])


def headline(c: Comparison) -> None:
    """Agreement, the two runs' Precision@1 and MAP@R with B − A and its interval, and the counts."""
    counts = c.counts()
    how = "one dataset" if c.aligned_by == "position" else "images matched by content"
    columns = st.columns(1 + len(c.overall))
    columns[0].metric(f"Neighbourhood agreement (k = {c.k})", f"{c.mean_agreement:.3f}",
                      help="The mean over the shared images of the Jaccard overlap of each image's k nearest "
                           "neighbours in A and in B: 1 where the neighbourhoods are the same.")
    for column, row in zip(columns[1:], c.overall):
        column.metric(f"{METRIC_NAMES[row['metric']]} B (A {row['a']:.3f})", f"{row['b']:.3f}",
                      delta=f"{row['difference']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}]",
                      help=f"B − A with its {PCT} paired bootstrap interval over the queries ({c.resamples:,} "
                           "resamples within each class): an interval that spans 0 is no clear change.")
    text = f"{counts['shared_images']:,} shared images ({how})."
    if c.has_metrics:
        step = AP_CHANGE_BINS[2]  # the AP-change colouring's "about the same" band
        clearly_up, clearly_down = int((c.ap_change > step).sum()), int((c.ap_change < -step).sum())
        text += (f" Of {counts['queries']:,} queries, average precision rose for {counts['better']:,} "
                 f"({clearly_up:,} by more than {step:g}, as the AP-change colouring shows them) and fell for "
                 f"{counts['worse']:,} ({clearly_down:,} by more than {step:g}); the nearest neighbour's label went wrong → right for "
                 f"{counts['wrong_to_right']:,} and right → wrong for {counts['right_to_wrong']:,}.")
    else:
        text += " No retrieval metrics compared: the runs share no labelled query."
    st.caption(text)


def per_class_table(c: Comparison) -> None:
    rows = []
    for row in c.per_class:
        line = {"class": row["name"], "queries": row["n_queries"]}
        for metric, title in (("precision_at_1", "P@1"), ("map_at_r", "MAP@R")):
            line.update({f"{title} A": row[f"{metric}_a"], f"{title} B": row[f"{metric}_b"],
                         f"{title} B − A": row[f"{metric}_difference"],
                         f"{title} {PCT}": f"[{row[f'{metric}_low']:+.3f}, {row[f'{metric}_high']:+.3f}]"})
        rows.append(line)
    frame = pd.DataFrame(rows)
    number = {name: st.column_config.NumberColumn(format="%.3f") for name in frame.columns
              if name.endswith((" A", " B")) or name.endswith("B − A")}
    st.dataframe(frame, hide_index=True, width="stretch", column_config=number)


def confusion_heatmap(c: Comparison) -> None:
    """B's share of each class's queries whose nearest result has each class, minus A's."""
    difference = c.confusion_difference
    n = len(c.classes)
    # plain field names: a quote or a sign in one broke the chart's expressions (it drew nothing)
    frame = pd.DataFrame([{"query": c.classes[i], "result": c.classes[j], "change": float(difference[i, j])}
                          for i in range(n) for j in range(n)])
    extent = max(0.01, float(np.abs(difference).max()))
    chart = alt.Chart(frame).mark_rect().encode(
        x=alt.X("result:N", sort=c.classes, title="nearest result's class"),
        y=alt.Y("query:N", sort=c.classes, title="query class"),
        color=alt.Color("change:Q", title="B − A", scale=alt.Scale(scheme="redblue", domain=[-extent, extent]),
                        legend=alt.Legend(type="symbol", format="+.2f")),  # (a gradient goes blank: explore_views)
        tooltip=[alt.Tooltip("query:N", title="query class"), alt.Tooltip("result:N", title="result class"),
                 alt.Tooltip("change:Q", title="B − A", format="+.3f")])
    side = max(320, min(700, 34 * n + 120))  # a row per class, every label shown, as Explore's heatmap
    st.altair_chart(chart.properties(height=side, width=side), width="content")


def moved_images(c: Comparison, pixels_a, pixels_b, limit: int = 6) -> None:
    """The images whose neighbourhoods changed most, with their nearest in A and in B."""
    for first, row in enumerate(c.moved[:limit]):
        image, near_a, near_b = st.columns([1, 4, 4])
        if first == 0:
            near_a.caption("nearest in A")
            near_b.caption("nearest in B")
        image.image(enlarge(pixels_a[row["position_a"]], THUMB), width=THUMB,
                    caption=f"#{row['position_a']} · {row['label'] or 'unlabeled'} · agreement {row['agreement']:.2f}")
        near_a.image([enlarge(pixels_a[p], 48) for p in row["neighbours_a"][:8]], width=48)
        near_b.image([enlarge(pixels_b[p], 48) for p in row["neighbours_b"][:8]], width=48)


def changed_queries(rows: list[dict], pixels_a, pixels_b, limit: int = 5) -> None:
    """Queries with both runs' top results side by side (✓ the result carries the query's label)."""
    if not rows:
        st.caption("None.")
        return
    for first, row in enumerate(rows[:limit]):
        query, results_a, results_b = st.columns([1, 4, 4])
        if first == 0:
            results_a.caption("top results in A")
            results_b.caption("top results in B")
        query.image(enlarge(pixels_a[row["position_a"]], THUMB), width=THUMB,
                    caption=f"#{row['position_a']} · {row['label']}")
        query.caption(f"AP {row['ap_a']:.3f} → {row['ap_b']:.3f}")
        with results_a:
            hits_row(pixels_a, row["results_a"], mark_wrong=True)
        with results_b:
            hits_row(pixels_b, row["results_b"], mark_wrong=True)


def settings_table(c: Comparison) -> None:
    """Both runs' settings, the differing ones first and marked."""
    def shown(value) -> str:
        return "—" if value is None else str(value)

    rows = sorted(c.settings, key=lambda row: not row["differs"])
    frame = pd.DataFrame([{"differs": "≠" if row["differs"] else "", "setting": row["title"],
                           "A": shown(row["a"]), "B": shown(row["b"])} for row in rows])
    differing = sum(row["differs"] for row in rows)
    st.caption(f"{differing} of {len(rows)} settings differ." if differing else "The two runs' settings are the same.")
    st.dataframe(frame, hide_index=True, width="stretch")
