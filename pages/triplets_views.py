"""Sections of the Triplets page: a run still in its first epoch, the negatives its cross-batch
memory gave, the miner's picks of an epoch's last batch, and the images most mined as negatives
(the run's per-image mining counts, core.training.tally_files)."""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional, Sequence

import altair as alt
import pandas as pd
import streamlit as st

from core.data.display import enlarge
from core.runs.overview import run_snapshot
from core.training.tally_files import most_mined
from pages.common import engine

THUMB = 104
CLASSES_SHOWN = 3  # confused-with classes in a caption
SHOWN = ("hard", "semi-hard", "easy", "similar", "dissimilar")
FROM_MEMORY = "from memory — an earlier batch"


def first_epoch_pending(run_id: int) -> None:
    """What a run that has stored no epoch yet is doing, polled every 2 s while it is active; the
    whole page reruns once its first epoch is stored. (It used to say one line and never change.)"""
    run = run_snapshot(engine(), run_id)

    @st.fragment(run_every=2.0 if run.active else None)
    def progress() -> None:
        now = run_snapshot(engine(), run_id)
        if now.stored_epochs:
            st.rerun(scope="app")
        if not now.active:
            ended = f" ({now.reason.splitlines()[0]})" if now.reason else ""
            st.info(f"Run #{run_id} is {now.status}{ended}: it has not finished an epoch yet, so it has no "
                    "triplets to show.")
            return
        planned = now.config.get("epochs", "?")
        st.info(f"Run #{run_id} is {now.status} in its first epoch: the first epoch's triplets appear here when "
                "it ends.")
        fraction = now.step / now.total_steps if now.total_steps else 0.0
        st.progress(min(1.0, fraction), text=f"epoch {max(now.epoch, 1)} of {planned} · step {now.step}/"
                                             f"{now.total_steps or '?'}" + (f" · {now.phase}" if now.phase else ""))

    progress()


def memory_negatives(epochs: Sequence, colours: alt.Scale) -> None:
    """For a run trained with a cross-batch memory (core.metric.memory): per epoch, how many of its
    counted triplets took their negative from the memory (earlier batches) rather than from the
    batch itself, by category, with the share of all. epochs: core.explore.triplets.EpochCounts;
    nothing is shown when none has memory counts (a run without a memory, or one stored before
    they were kept)."""
    remembered = [e for e in epochs if e.memory is not None]
    if not remembered:
        return
    table = pd.DataFrame(
        [{"epoch": e.epoch, "category": c, "from memory": int(e.memory.get(c, 0)), "rank": rank}
         for e in remembered for rank, c in enumerate(("hard", "semi-hard", "easy"))])
    st.subheader("Negatives from the cross-batch memory per epoch")
    last = remembered[-1]
    total = sum(int(v) for v in last.memory.values())
    share = total / last.total if last.total else 0.0
    st.caption(f"Of the valid triplets counted in each epoch, those whose negative came from the memory (the "
               f"embeddings of earlier batches) rather than from the batch itself. Epoch {last.epoch}: "
               f"{total:,} of {last.total:,} ({share:.0%}).")
    st.altair_chart(
        alt.Chart(table).mark_bar().encode(
            x="epoch:O", y=alt.Y("from memory:Q", title="triplets", axis=alt.Axis(format="~s")),
            color=alt.Color("category:N", scale=colours, sort=["hard", "semi-hard", "easy"]),
            order=alt.Order("rank:Q"),
            tooltip=["epoch", "category", alt.Tooltip("from memory:Q", format=",")],
        ).properties(height=240),
        width="stretch",
    )


def picked_rows(rows: list[dict], pixels, labels: Mapping[int, Optional[int]], classes: list[str], margin,
                pairs: bool) -> None:
    """The inspected rows (core.explore.triplets.inspected_rows) by category: each with its
    anchor, positive and negative thumbnails, its distances and the loss it contributed. labels:
    {position: label} of (at least) the rows' images. pairs: the rows are pairs of a pair loss,
    which has no margin to print beside each. A row whose negative came from the run's cross-batch
    memory (from_memory) says so: FROM_MEMORY."""

    def caption(role: str, position: int) -> str:
        label = labels.get(position)
        return f"{role} #{position}" + (f" · {classes[label]}" if label is not None else "")

    for category in SHOWN:
        chosen = [t for t in rows if t["category"] == category]
        if not chosen:
            continue
        st.markdown(f"**{category}** · {len(chosen)} shown")
        for t in chosen:
            cols = st.columns([1, 1, 1, 3])
            members = [("A", t["anchor"]), ("P", t["positive"]), ("N", t["negative"])]
            for col, (role, position) in zip(cols, [m for m in members if m[1] is not None]):
                remembered = " · from memory" if role == "N" and t.get("from_memory") else ""
                col.image(enlarge(pixels[position]), width=64, caption=caption(role, position) + remembered)
            facts = []
            if t["d_ap"] is not None:
                facts.append(f"d(A,P) = {t['d_ap']:.3f}")
            if t["d_an"] is not None:
                facts.append(f"d(A,N) = {t['d_an']:.3f}")
            if not pairs:
                facts.append(f"m = {margin}")
            if t["weight"] is not None:
                facts.append(f"softmax weight of N = {t['weight']:.3f}")
            remembered = f"  \nN: *{FROM_MEMORY}*" if t.get("from_memory") else ""
            cols[3].markdown(" · ".join(facts) + f"  \nloss = {_loss_text(t['loss'])} · **{category}**" + remembered)


def _loss_text(value) -> str:
    return "not recorded (a run from an earlier version)" if value is None else f"{value:.4f}"


def most_mined_negatives(run_id: int, epoch: int, pixels,
                         labels_of: Callable[[Iterable[int]], Mapping[int, Optional[int]]], classes: list[str],
                         top: int = 24) -> None:
    """A gallery of the epoch's images most used as hard negatives (then semi-hard), each captioned
    with its counts and the classes of the anchors it was a negative for (the classes it was
    confused with), over every valid triplet of every batch of the epoch. labels_of: the labels
    of some images, {position: label}."""
    try:
        rows = most_mined(run_id, epoch, top)
    except ValueError as exc:  # a damaged stored file
        st.warning(str(exc))
        return
    if not rows:
        st.info(f"No mining counts stored for epoch {epoch} (runs trained before they were kept have none), "
                "or no image was a hard or semi-hard negative in it.")
        return
    st.caption("Counted over every valid triplet of every batch of the epoch, not only the miner's picks. "
               "Confused with: the classes of the anchors of its hard and semi-hard triplets.")
    labels = labels_of(row["position"] for row in rows)
    st.image([enlarge(pixels[row["position"]], THUMB) for row in rows], width=THUMB,
             caption=[_caption(row, labels, classes) for row in rows])


def _name(label: Optional[int], classes: list[str]) -> str:
    if label is None or label < 0:
        return "unlabeled"
    return classes[label] if label < len(classes) else str(label)


def _caption(row: dict, labels: Mapping[int, Optional[int]], classes: list[str]) -> str:
    position = row["position"]
    text = (f"#{position} · {_name(labels.get(position), classes)} · hard ×{row['hard_negative']:,}"
            f" · semi ×{row['semi_hard_negative']:,}")
    confused = row["confused_with"][:CLASSES_SHOWN]
    if confused:
        text += " · vs " + ", ".join(f"{_name(c, classes)} ({n:,})" for c, n in confused)
        if len(row["confused_with"]) > CLASSES_SHOWN:
            text += ", …"
    return text
