"""Sections of the Triplets page built on the run's per-image mining counts (core.training.tally_files)."""
from __future__ import annotations

from typing import Optional

import streamlit as st

from core.data.display import enlarge
from core.training.tally_files import most_mined

THUMB = 104
CLASSES_SHOWN = 3  # confused-with classes in a caption


def most_mined_negatives(run_id: int, epoch: int, pixels, labels: list[Optional[int]], classes: list[str],
                         top: int = 24) -> None:
    """A gallery of the epoch's images most used as hard negatives (then semi-hard), each captioned
    with its counts and the classes of the anchors it was a negative for (the classes it was
    confused with), over every valid triplet of every batch of the epoch."""
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
    st.image([enlarge(pixels[row["position"]], THUMB) for row in rows], width=THUMB,
             caption=[_caption(row, labels, classes) for row in rows])


def _name(label: Optional[int], classes: list[str]) -> str:
    if label is None or label < 0:
        return "unlabeled"
    return classes[label] if label < len(classes) else str(label)


def _caption(row: dict, labels: list[Optional[int]], classes: list[str]) -> str:
    position = row["position"]
    text = (f"#{position} · {_name(labels[position], classes)} · hard ×{row['hard_negative']:,}"
            f" · semi ×{row['semi_hard_negative']:,}")
    confused = row["confused_with"][:CLASSES_SHOWN]
    if confused:
        text += " · vs " + ", ".join(f"{_name(c, classes)} ({n:,})" for c, n in confused)
        if len(row["confused_with"]) > CLASSES_SHOWN:
            text += ", …"
    return text
