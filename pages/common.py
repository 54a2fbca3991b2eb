"""What every page shares: the engine (one per server process) and small widgets."""
from __future__ import annotations

from typing import Optional

import numpy as np
import streamlit as st
from sqlalchemy import Engine

from core.explore import dataset_pixels
from storage import queries
from storage.db import make_engine, transaction


def _run_under_app_navigation() -> None:
    """A deep link to a page on a freshly started server runs that page on its own, under
    Streamlit's legacy pages/ navigation (a class flag set from the folder's existence until
    some session runs app.py). Clear the flag and rerun, so app.py's navigation takes over."""
    from streamlit.runtime.pages_manager import PagesManager

    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        st.rerun()


_run_under_app_navigation()

METRIC_NAMES = {"precision_at_1": "Precision@1", "r_precision": "R-Precision", "map_at_r": "MAP@R",
                "recall_at_1": "Recall@1", "recall_at_5": "Recall@5", "recall_at_10": "Recall@10"}

# Material icons: they render without an emoji font (hosted machines often lack one)
STATUS_ICON = {
    "queued": ":material/schedule:", "running": ":material/directions_run:", "completed": ":material/check_circle:",
    "failed": ":material/error:", "cancelled": ":material/cancel:", "interrupted": ":material/warning:",
}


@st.cache_resource
def engine() -> Engine:
    return make_engine()


@st.cache_resource(max_entries=8)
def pixels_of(dataset_id: int) -> np.ndarray:
    """The dataset's pixel array, memory-mapped; never mutated."""
    return dataset_pixels(engine(), dataset_id)


def run_label(run) -> str:
    metric = ""
    if run.metrics and "precision_at_1" in run.metrics:
        metric = f" · P@1 {run.metrics['precision_at_1']:.3f}"
    config = run.config or {}
    what = f"{config.get('loss', 'loaded encoder')}" if run.kind == "train" else "loaded encoder"
    return f"#{run.id} {run.dataset.name} · {what} · {run.status}{metric}"


def pick_run(label: str, completed_only: bool = True, kind: Optional[str] = None, key: str = "run") -> Optional[int]:
    """A select box of runs, newest first; the choice survives page switches via the query string."""
    with transaction(engine()) as session:
        runs = queries.completed_runs(session) if completed_only else queries.list_runs(session)
        options = {run.id: run_label(run) for run in runs if kind is None or run.kind == kind}
    if not options:
        return None
    ids = list(options)
    wanted = st.query_params.get("run")
    index = ids.index(int(wanted)) if wanted and wanted.isdigit() and int(wanted) in ids else 0
    run_id = st.selectbox(label, ids, index=index, format_func=options.get, key=key)
    st.query_params["run"] = str(run_id)
    return run_id
