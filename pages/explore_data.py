"""The Explore page's cached reads. Every cache is keyed by Run.cache_key (id and creation time),
so a run made after a deleted one can never be served the deleted one's map, statistics, index
or encoder."""
import numpy as np
import streamlit as st

from core.explore.service import (
    evaluated_index, evolution_payload, load_run_index, load_run_statistics, map_coordinates, map_payload,
)
from pages.common import engine


@st.cache_data(max_entries=16, show_spinner=False)
def coordinates(run_key: str, run_id: int, method: str, path: str | None) -> np.ndarray:
    return map_coordinates(engine(), run_id, method, path)


@st.cache_resource(max_entries=4, show_spinner=False)
def run_index(run_key: str, run_id: int):
    """The run's faiss index and labels, built (or loaded) once per run for every click and search."""
    return load_run_index(engine(), run_id)


@st.cache_resource(max_entries=4, show_spinner=False)
def statistics(run_key: str, path: str):
    return load_run_statistics(path)


@st.cache_resource(max_entries=4, show_spinner=False)
def ranker(run_key: str, run_id: int, path: str):
    return evaluated_index(engine(), run_id, statistics(run_key, path).evaluated)


@st.cache_data(max_entries=8, show_spinner="Preparing the map across epochs…")
def epochs_payload(run_key: str, run_id: int, path: str):
    return evolution_payload(engine(), run_id, path)


@st.cache_data(max_entries=32, show_spinner="Preparing the map…")
def payload(run_key: str, run_id: int, method: str, path: str | None, colour: str, stats_path: str | None):
    stats = statistics(run_key, stats_path) if stats_path else None
    return map_payload(engine(), run_id, method, coordinates(run_key, run_id, method, path), colour, stats)
