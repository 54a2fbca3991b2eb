"""Triplets: what the run's miner picked and its loss used, epoch by epoch."""
import altair as alt
import pandas as pd
import streamlit as st

from core.metric import registry
from core.metric.categories import CATEGORIES
from core.explore.triplets import image_labels, inspected_rows, triplets_run
from pages.common import engine, pixels_of
from pages.run_widgets import has_epochs, pick_run
from pages.triplets_views import first_epoch_pending, memory_negatives, most_mined_negatives, picked_rows

CATEGORY_COLOURS = alt.Scale(domain=list(CATEGORIES), range=["#4caf50", "#ff9800", "#e53935"])

st.title("Triplets")
st.caption("easy: d(A,N) > d(A,P) + m · semi-hard: d(A,P) < d(A,N) ≤ d(A,P) + m · hard: d(A,N) ≤ d(A,P)")
run_id = pick_run("Run", completed_only=False, kind="train", shows=has_epochs)
if run_id is None:
    st.info("No training run yet: start one on the Train page.")
    st.stop()

with st.spinner("Loading the run's epochs…"):
    shown = triplets_run(engine(), run_id)
config, dataset_id, classes, epochs = shown.config, shown.dataset_id, shown.classes, shown.epochs
version = shown.dataset_version
if not epochs:
    first_epoch_pending(run_id)
    st.stop()

margin = config.get("margin")
objective = registry.objectives().get(config.get("loss"))
miner = registry.miners().get(config.get("miner"))
if objective is not None and miner is not None:
    st.markdown(f"**{objective.title}** loss: {objective.explanation}  \n"
                f"**{miner.title}** miner: {miner.explanation}")
if config.get("triplet_variant") == "squared":
    st.caption("Squared variant: every distance on this page is a squared euclidean distance, as the loss, "
               "the miner and the counts compare them.")

counts = pd.DataFrame(
    [{"epoch": e.epoch, "category": c, "triplets": getattr(e, key), "rank": rank}
     for e in epochs for rank, (c, key) in enumerate((("hard", "hard"), ("semi-hard", "semi_hard"), ("easy", "easy")))]
)
st.subheader("Triplets of each category per epoch")
st.caption(f"Share of all valid triplets in the epoch's batches (m = {margin}), whatever the miner kept, counted "
           "from sorted distances without listing them.")
st.altair_chart(
    alt.Chart(counts).mark_bar().encode(
        x="epoch:O", y=alt.Y("triplets:Q", stack="normalize", title="share of triplets"),
        color=alt.Color("category:N", scale=CATEGORY_COLOURS, sort=["hard", "semi-hard", "easy"]),
        order=alt.Order("rank:Q"),
        tooltip=["epoch", "category", alt.Tooltip("triplets:Q", format=",")],
    ).properties(height=240),
    width="stretch",
)

memory_negatives(epochs, CATEGORY_COLOURS)  # nothing for a run without a cross-batch memory

epoch = st.select_slider("Epoch", [e.epoch for e in epochs], value=epochs[-1].epoch) if len(epochs) > 1 else epochs[0].epoch
row = next(e for e in epochs if e.epoch == epoch)
if row.gap_histogram:
    edges, hist = row.gap_histogram["edges"], row.gap_histogram["counts"]
    bins = pd.DataFrame({"from": edges[:-1], "to": edges[1:], "triplets": hist})
    st.subheader("d(A,P) − d(A,N) of random triplets")
    bars = alt.Chart(bins).mark_bar().encode(
        x=alt.X("from:Q", bin="binned", title="d(A,P) − d(A,N)"), x2="to", y="triplets:Q")
    rules = alt.Chart(pd.DataFrame({"x": [-margin, 0.0], "what": ["−margin", "0"]})).mark_rule(
        color="#e53935", strokeDash=[4, 4]).encode(x="x:Q", tooltip=["what"])
    st.altair_chart((bars + rules).properties(height=200), width="stretch")
    st.caption(f"Triplets drawn uniformly from the epoch's last batch. Right of 0: hard · between −{margin} and 0: "
               f"semi-hard · left of −{margin}: easy")

with st.spinner(f"Loading what the miner picked in epoch {epoch}…"):
    rows = inspected_rows(engine(), run_id, epoch)
    labels = image_labels(engine(), dataset_id, [p for r in rows for p in (r["anchor"], r["positive"], r["negative"])
                                                 if p is not None], version)
    pixels = pixels_of(dataset_id)
softmax = any(r["weight"] is not None for r in rows)
pairs = any(r["category"] in ("similar", "dissimilar") for r in rows)
st.subheader(f"What the miner picked in the last batch of epoch {epoch}")
if softmax:
    st.caption("Every other image of the batch is a negative, weighed by the softmax. Shown: a few random anchors, "
               "each with its hardest positive and its hardest negatives (the highest softmax weight); the loss is "
               "the anchor's term, which the loss averages over anchors.")
elif pairs:
    st.caption("A sample of the pairs the miner kept and the loss used (dissimilar pairs with a non-zero term), "
               "with the term each contributed: D² for a similar pair, max(0, m − D)² for a dissimilar one.")
else:
    st.caption("A sample, at most a few of each category, of the triplets the miner returned and the loss averaged "
               "over, with the loss each contributed under this run's loss. An empty category had none.")
if not rows:
    st.info("No triplets were recorded for this epoch: its last batch had none that the loss used.")
picked_rows(rows, pixels, labels, classes, margin, pairs)

st.subheader(f"Images most used as negatives in epoch {epoch}")
with st.spinner(f"Counting the images most used as negatives in epoch {epoch}…"):
    most_mined_negatives(run_id, epoch, pixels, lambda positions: image_labels(engine(), dataset_id, positions, version),
                         classes)
