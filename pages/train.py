"""Train: choose the objective, start a worker process, watch its stored progress."""
import streamlit as st

from core.data.catalog import dataset_summaries
from core.data.datasets import builtin_names
from core.runs.jobs import create_training_run, start_worker
from core.runs.overview import epoch_curves, runs_to_follow
from core.training.config import RunConfig
from pages.common import engine, show_flash
from pages.run_widgets import run_card, steady_places
from pages.signin import can, why_not
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

if not can("train"):
    st.info(why_not("train"))
if st.button("Start training", type="primary", disabled=not names or learns_from is None or not can("train")):
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


PAGE_DRAWN, PAGE_RERUN_DUE = "train-page-drawn", "train-page-rerun-due"
st.session_state[PAGE_DRAWN] = True  # this run draws the whole page, the panel's lists included,
st.session_state.pop(PAGE_RERUN_DUE, None)  # so a rerun the panel had asked for is done


@st.fragment(run_every=1.0)
def progress_panel() -> None:
    """Polls the runs' stored progress (the worker process writes it): the active runs, the newest
    finished and the newest completed one (so a run that ended while the page was away still shows
    its result) and the one this session started. Only this fragment reruns each second, so when a
    run it showed as active has ended, the whole page reruns next: the lists below then include it.

    That rerun waits for the panel's next poll. Asked for at once, it stopped the poll that drew
    the ended run before Streamlit removed what that poll no longer drew: the page rerun then
    showed, for its 2-3 s, a Cancel button on the finished run and the card of a run no longer
    followed under it (seen in Chromium). A poll that finishes removes them."""
    if st.session_state.pop(PAGE_RERUN_DUE, False):
        st.rerun(scope="app")  # before drawing anything: the last poll left the cards whole
    runs = runs_to_follow(engine(), st.session_state.get("watching"))
    training = [run.id for run in runs if run.active and run.kind == "train"]
    curves = epoch_curves(engine(), training) if training else []
    # (run, status) in each card's place at the last poll and the one before. What a poll drew may
    # never reach the browser: when the next run of this fragment (or of the page) starts, Streamlit
    # drops the deltas it has not sent yet (ForwardMsgQueue.clear), which on a loaded machine can be
    # the tail of the poll before, the live chart's removal included. So a card draws its header
    # first only where both polls drew the same run in the same status (steady_places).
    shown = st.session_state.get("panel-shown", [])
    before = st.session_state.get("panel-shown-before", [])
    steady = steady_places(shown, before)
    for place, run in enumerate(runs):
        run_card(run, [row for row in curves if row["run"] == f"#{run.id}"],
                 shown_here=steady[place] if place < len(steady) else None, place=place)
    st.session_state["panel-shown-before"] = shown
    st.session_state["panel-shown"] = [(run.id, run.status) for run in runs]
    active_now = {run.id for run in runs if run.active}
    ended = st.session_state.get("active_runs", set()) - active_now
    st.session_state["active_runs"] = active_now
    page_drawn = st.session_state.pop(PAGE_DRAWN, False)
    if ended and not page_drawn:  # (a whole-page run has drawn the lists below with the run ended)
        st.session_state[PAGE_RERUN_DUE] = True


st.subheader("Runs")
st.caption("Active runs, the newest finished and completed ones and the last one you started; every run is on "
           "the Runs page.")
progress_panel()

st.divider()
load_encoder_section(names)
