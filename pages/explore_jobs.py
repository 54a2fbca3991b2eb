"""The Explore page's after-work jobs (statistics, UMAP map, map across epochs): what each is
doing, and the button that starts them."""
from typing import Optional

import streamlit as st

from core.explore.service import JobState
from core.runs.jobs import start_projection
from pages.common import engine

PHASES = {"importing": "Loading UMAP", "compiling": "Compiling UMAP's code", "neighbours": "Finding neighbours",
          "layout": "Laying out the map", "index": "Building the search index",
          "statistics": "Finding where the encoder fails", "sprites": "Writing the map's images",
          "loading": "Reading the probe's embeddings", "frames": "Laying out each epoch"}


def show_job(title: str, state: JobState) -> None:
    if state.status == "queued":
        st.info(f"{title}: the process is starting.")
    elif state.status == "running":
        text = f"{title} · {PHASES.get(state.phase, 'starting')}" + (f": {state.message}" if state.message else "")
        if state.progress is not None:
            st.progress(min(1.0, max(0.0, state.progress)), text=text)
        else:
            st.info(text)
    elif state.status in ("failed", "interrupted", "cancelled"):
        st.warning(f"{title} {state.status}: {((state.reason or '').strip() or 'no reason recorded').splitlines()[0]}")


def jobs_panel(run_id: int, jobs: list[tuple], states: list[Optional[JobState]]) -> None:
    """jobs: (title, method, params, stored path or None); states: each one's job, None when never
    queued. Shows the jobs not done yet, and offers to start them when none is queued or running."""
    for (title, *_, have), state in zip(jobs, states):
        if not have and state is not None:
            show_job(title, state)
    known = [s for s in states if s is not None]
    if any(s.status in ("queued", "running") for s in known):
        st.caption("These run in a process of their own; the PCA preview, neighbours and search work meanwhile.")
    elif any(s is None or s.status != "done" for s in states):
        if all(s is not None and s.status == "done" for s in states[:2]):
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
