"""Triplets: what the miner picked, epoch by epoch."""
import altair as alt
import pandas as pd
import streamlit as st

from core.display import enlarge
from pages.common import engine, has_epochs, pick_run, pixels_of
from storage import queries
from storage.db import transaction
from storage.schema import Run

CATEGORY_COLOURS = alt.Scale(domain=["easy", "semi-hard", "hard"], range=["#4caf50", "#ff9800", "#e53935"])

st.title("Triplets")
st.caption("easy: d(A,N) > d(A,P) + m · semi-hard: d(A,P) < d(A,N) ≤ d(A,P) + m · hard: d(A,N) ≤ d(A,P)")
run_id = pick_run("Run", completed_only=False, kind="train", shows=has_epochs)
if run_id is None:
    st.info("No training run yet: start one on the Train page.")
    st.stop()

with transaction(engine()) as session:
    run = session.get(Run, run_id)
    margin, dataset_id, classes = run.config["margin"], run.dataset_id, list(run.dataset.classes)
    epochs = list(queries.epoch_rows(session, [run_id]))
    labels = [row[2] for row in queries.dataset_image_table(session, dataset_id)]
if not epochs:
    st.info("This run has not finished an epoch yet.")
    st.stop()

counts = pd.DataFrame(
    [{"epoch": e.epoch, "category": c, "triplets": getattr(e, key), "rank": rank}
     for e in epochs for rank, (c, key) in enumerate((("hard", "hard"), ("semi-hard", "semi_hard"), ("easy", "easy")))]
)
st.subheader("Triplets of each category per epoch")
st.caption("Share of all valid triplets in the epoch's batches, counted from sorted distances without listing them.")
st.altair_chart(
    alt.Chart(counts).mark_bar().encode(
        x="epoch:O", y=alt.Y("triplets:Q", stack="normalize", title="share of triplets"),
        color=alt.Color("category:N", scale=CATEGORY_COLOURS, sort=["hard", "semi-hard", "easy"]),
        order=alt.Order("rank:Q"),
        tooltip=["epoch", "category", alt.Tooltip("triplets:Q", format=",")],
    ).properties(height=240),
    width="stretch",
)

epoch = st.select_slider("Epoch", [e.epoch for e in epochs], value=epochs[-1].epoch) if len(epochs) > 1 else epochs[0].epoch
row = next(e for e in epochs if e.epoch == epoch)
if row.gap_histogram:
    edges, hist = row.gap_histogram["edges"], row.gap_histogram["counts"]
    bins = pd.DataFrame({"from": edges[:-1], "to": edges[1:], "triplets": hist})
    st.subheader("d(A,P) − d(A,N) of sampled triplets")
    bars = alt.Chart(bins).mark_bar().encode(
        x=alt.X("from:Q", bin="binned", title="d(A,P) − d(A,N)"), x2="to", y="triplets:Q")
    rules = alt.Chart(pd.DataFrame({"x": [-margin, 0.0], "what": ["−margin", "0"]})).mark_rule(
        color="#e53935", strokeDash=[4, 4]).encode(x="x:Q", tooltip=["what"])
    st.altair_chart((bars + rules).properties(height=200), width="stretch")
    st.caption(f"Right of 0: hard · between −{margin} and 0: semi-hard · left of −{margin}: easy")

st.subheader(f"Mined triplets in the last batch of epoch {epoch}")
with transaction(engine()) as session:
    triplets = list(queries.triplet_rows(session, run_id, epoch))
pixels = pixels_of(dataset_id)


def caption(position: int) -> str:
    label = labels[position]
    return f"#{position}" + (f" · {classes[label]}" if label is not None else "")


for category in ("hard", "semi-hard", "easy"):
    chosen = [t for t in triplets if t.category == category]
    st.markdown(f"**{category}** · {len(chosen)} shown")
    for t in chosen:
        cols = st.columns([1, 1, 1, 3])
        cols[0].image(enlarge(pixels[t.anchor]), width=64, caption="A " + caption(t.anchor))
        cols[1].image(enlarge(pixels[t.positive]), width=64, caption="P " + caption(t.positive))
        cols[2].image(enlarge(pixels[t.negative]), width=64, caption="N " + caption(t.negative))
        cols[3].markdown(f"d(A,P) = {t.d_ap:.3f} · d(A,N) = {t.d_an:.3f} · m = {margin}  \n"
                         f"loss = {max(0.0, t.d_ap - t.d_an + margin):.3f} · **{category}**")
