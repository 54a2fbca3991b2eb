"""What a run card shows while its run trains: the time since it started, the time left at the pace
so far, and a live loss curve: the loss of each stored epoch, and the losses of the recent steps
this page has seen (the worker stores only the latest, so the page keeps what it polled)."""
from __future__ import annotations

from typing import Optional

import altair as alt
import pandas as pd
import streamlit as st

from core.runs.overview import RunSnapshot

SEEN_STEPS = 600  # step losses kept per run: ten minutes of the panel's one-second polls


def clock(seconds: float) -> str:
    """12 s, 4:05 or 1:02:03 (h:mm:ss)."""
    seconds = int(round(max(0.0, seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{minutes}:{secs:02d}" if minutes else f"{secs} s"


def timing(run: RunSnapshot) -> Optional[str]:
    """"4:05 elapsed · about 12:30 left at the pace so far", for an active run that has started."""
    if not run.active or run.seconds is None:
        return None
    parts = [f"{clock(run.seconds)} elapsed"]
    left = run.seconds_left()
    if left is not None:
        parts.append(f"about {clock(left)} left at the pace so far")
    elif run.phase == "training":
        parts.append("time left: after the first steps")
    elif run.phase:
        parts.append(f"training done, now {run.phase}")
    return " · ".join(parts)


def seen_steps(run: RunSnapshot) -> list[tuple[int, float]]:
    """The (step, loss) pairs this session has polled of the run, the newest SEEN_STEPS."""
    seen = st.session_state.setdefault(f"seen-steps-{run.cache_key}", [])
    if run.active and run.last_loss is not None and run.step > 0 and (not seen or seen[-1][0] != run.step):
        if seen and run.step < seen[-1][0]:  # resumed from an earlier epoch: start over
            seen.clear()
        seen.append((run.step, float(run.last_loss)))
        del seen[:-SEEN_STEPS]
    return seen


def loss_curve(run: RunSnapshot, epochs: list[dict]) -> Optional[alt.LayerChart]:
    """The loss against the epoch: each stored epoch's mean (points), the recent steps seen here
    (a thin line, at their fraction of an epoch). epochs: core.runs.overview.epoch_curves' rows of
    this run. None while there is nothing to draw."""
    planned = run.config.get("epochs")
    per_epoch = run.total_steps / planned if run.total_steps and isinstance(planned, int) and planned > 0 else None
    steps = seen_steps(run)
    rows = [{"epoch": row["epoch"], "loss": row["loss"], "what": "epoch mean"} for row in epochs]
    if per_epoch:
        rows += [{"epoch": step / per_epoch, "loss": loss, "what": "recent steps"} for step, loss in steps]
    if not rows:
        return None
    frame = pd.DataFrame(rows)
    colour = alt.Color("what:N", title=None, scale=alt.Scale(domain=["epoch mean", "recent steps"],
                                                              range=["#1f77b4", "#aaaaaa"]))
    base = alt.Chart(frame).encode(
        x=alt.X("epoch:Q", title="epoch", axis=alt.Axis(tickMinStep=1, format="d"),
                scale=alt.Scale(domain=[0, planned]) if per_epoch else alt.Scale(domainMin=0)),
        y=alt.Y("loss:Q", scale=alt.Scale(zero=False)), color=colour,
        tooltip=[alt.Tooltip("epoch:Q", format=".2f"), alt.Tooltip("loss:Q", format=".4f"), "what"])
    steps_line = base.transform_filter(alt.datum.what == "recent steps").mark_line(strokeWidth=1)
    epoch_points = base.transform_filter(alt.datum.what == "epoch mean").mark_line(point=True)
    return alt.layer(steps_line, epoch_points).properties(height=160)
