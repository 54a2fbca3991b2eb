"""Compare: two runs over the images they share. Their two maps side by side, linked (a click,
box or lasso in one selects the same images in the other; hovering shows the image in both),
coloured by label, neighbourhood agreement, AP change or nearest-neighbour flip; below them the
metric differences with bootstrap intervals, per class, the confusion difference, the images that
moved most, the queries that got worse and better, and the settings that differ
(core.explore.compare; `python -m core compare --runs A B` prints the same figures)."""
import streamlit as st

from core.explore.service import explore_run
from pages import compare_views as views
from pages.common import engine, pixels_of, stop_if_files_lost

st.title("Compare")
pair = views.pick_pair()
if pair is None:
    st.stop()

runs = {side: explore_run(engine(), run_id) for side, run_id in zip(views.SIDES, pair)}
for run in runs.values():
    stop_if_files_lost(run.run_id, run.embeddings)
if views.statistics_missing(list(runs.values())):
    st.stop()

try:
    c, shared = views.comparison(runs["a"].run_key, runs["b"].run_key, *pair)
except ValueError as exc:  # no shared images, a run whose files do not add up: compare_runs's sentence
    st.warning(f"Runs #{pair[0]} and #{pair[1]} cannot be compared: {exc}")
    st.stop()

selected = views.take_pending(c, shared, runs)  # before either map is drawn
for side, column in zip(views.SIDES, st.columns(2)):
    with column:
        views.map_column(side, c, shared, runs, selected)
views.wait_for_maps(list(runs.values()))

pixels_a, pixels_b = pixels_of(runs["a"].dataset_id), pixels_of(runs["b"].dataset_id)
views.selection_summary(c, selected, pixels_a)

st.header("What changed")
views.headline(c)
if c.has_metrics:
    st.subheader("Per class")
    st.caption(f"Precision@1 and MAP@R of each class's queries in A and B, and B − A with its {views.PCT} "
               "bootstrap interval (a class is its label in A).")
    views.per_class_table(c)
    st.subheader("Confusion difference")
    st.caption("Per query class (row), the share of its queries whose nearest result carries each class (column), "
               "in B minus in A: blue where B finds that class more often, red less. The diagonal is the "
               "Precision@1 change.")
    views.confusion_heatmap(c)

st.subheader("Images that moved most")
st.caption(f"Lowest neighbourhood agreement first: each image, its {c.k} nearest in A (middle) and in B (right).")
views.moved_images(c, pixels_a, pixels_b)

if c.has_metrics:
    worse, better = st.tabs([f"Queries that got worse ({c.counts()['worse']:,})",
                             f"Queries that got better ({c.counts()['better']:,})"])
    with worse:
        st.caption("Each query, its top results in A (middle) and in B (right); ✓ the result has the query's label.")
        views.changed_queries(c.worse, pixels_a, pixels_b)
    with better:
        views.changed_queries(c.better, pixels_a, pixels_b)

st.subheader("Settings")
views.settings_table(c)
