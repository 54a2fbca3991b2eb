"""Train: choose the objective, start a worker process, watch its stored progress."""
import streamlit as st

from core.data.catalog import dataset_summaries
from core.data.datasets import builtin_names
from core.runs.jobs import create_training_run, start_worker
from core.runs.overview import runs_to_follow
from core.training.config import RunConfig
from pages.common import engine, show_flash
from pages.run_widgets import run_card
from pages.train_form import new_run_form
from pages.train_views import load_encoder_section
from storage.settings import StorageError

st.title("Train")
show_flash()

# each dataset by name (its newest version) and, once it has several, each version as NAME@VERSION
stored = {ref: (d.id, d.labeled) for d in dataset_summaries(engine()) for ref in d.refs}
names = list(stored) + [n for n, ok in builtin_names().items() if ok and n not in stored]

st.subheader("New run")
arguments, learns_from = new_run_form(names, stored)

if st.button("Start training", type="primary", disabled=not names or learns_from is None):
    try:
        run_id = create_training_run(engine(), RunConfig(**arguments))
    except (ValueError, LookupError, FileNotFoundError, StorageError) as exc:
        st.error(str(exc))
    else:
        try:
            start_worker(engine(), run_id)
        except ValueError as exc:  # the Ray cluster did not take the job: the run is failed with this reason
            st.error(str(exc))
        else:
            st.toast(f"Run #{run_id} started")
        st.session_state["watching"] = run_id


@st.fragment(run_every=1.0)
def progress_panel() -> None:
    """Polls the runs' stored progress (the worker process writes it): the active runs, the newest
    finished and the newest completed one (so a run that ended while the page was away still shows
    its result) and the one this session started. Only this fragment reruns each second, so when a run it showed as active
    has ended, the whole page reruns: the lists below then include it."""
    runs = runs_to_follow(engine(), st.session_state.get("watching"))
    for run in runs:
        run_card(run)
    active_now = {run.id for run in runs if run.active}
    ended = st.session_state.get("active_runs", set()) - active_now
    st.session_state["active_runs"] = active_now
    if ended:
        st.rerun(scope="app")


st.subheader("Runs")
st.caption("Active runs, the newest finished and completed ones and the last one you started; every run is on "
           "the Runs page.")
progress_panel()

st.divider()
load_encoder_section(names)
