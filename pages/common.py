"""What every page shares: the engine (one per server process) and small widgets."""
from __future__ import annotations

import os
from typing import Any, Callable, Collection, Optional

import numpy as np
import streamlit as st
from sqlalchemy import Engine

from core.explore.service import dataset_pixels
from core.runs.jobs import cancel_run
from storage import queries
from storage.db import make_engine, transaction
from storage.schema import Dataset, Run
from storage.hosting import EPHEMERAL_ENV, database_in_data_home, ephemeral_reason, lost_files
from storage.settings import DB_ENV, HOME_ENV, StorageError, data_home, database_url, shown_url

# the settings a host's secrets may hold (hosted Streamlit: the app's Secrets), over the environment
SECRET_SETTINGS = (DB_ENV, HOME_ENV, EPHEMERAL_ENV, "EMBEDDING_LAB_RAY_ADDRESS")


def _run_under_app_navigation() -> None:
    """A deep link to a page on a freshly started server runs that page on its own, under
    Streamlit's legacy pages/ navigation (a class flag set from the folder's existence until
    some session runs app.py). Clear the flag and rerun, so app.py's navigation takes over."""
    from streamlit.runtime.pages_manager import PagesManager

    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        st.rerun()


_run_under_app_navigation()


def use_secrets() -> list[str]:
    """Copy the settings found in the app's secrets (.streamlit/secrets.toml, or the Secrets of a
    hosted app) into the environment, where storage.settings and the worker processes read them;
    a secret wins over a variable already set. Returns the names copied."""
    if not st.secrets.load_if_toml_exists():
        return []
    copied = []
    for name in SECRET_SETTINGS:
        value = st.secrets.get(name)
        if isinstance(value, (str, int, float)) and str(value).strip():
            os.environ[name] = str(value).strip()
            copied.append(name)
    return copied


METRIC_NAMES = {"precision_at_1": "Precision@1", "r_precision": "R-Precision", "map_at_r": "MAP@R",
                "recall_at_1": "Recall@1", "recall_at_5": "Recall@5", "recall_at_10": "Recall@10"}

# Material icons: they render without an emoji font (hosted machines often lack one)
STATUS_ICON = {
    "queued": ":material/schedule:", "running": ":material/directions_run:", "completed": ":material/check_circle:",
    "failed": ":material/error:", "cancelled": ":material/cancel:", "interrupted": ":material/warning:",
}


def engine() -> Engine:
    """The server's engine for the database the settings name (the app's secrets first, then the
    environment); a store that cannot be opened stops the page with the reason."""
    try:
        use_secrets()
        return _engine(database_url(), str(data_home()))
    except StorageError as exc:
        st.error(f"The run store cannot be opened. {exc}")
        st.stop()


@st.cache_resource
def _engine(url: str, home: str) -> Engine:
    from core.explore.map_files import prune_other_homes

    engine = make_engine(url)
    prune_other_homes()  # static map files of data folders that no longer exist
    return engine


def pixels_of(dataset_id: int) -> np.ndarray:
    """The dataset's pixel array, memory-mapped; never mutated. Cached under the dataset's
    cache_key (id and creation time), never its bare id."""
    with transaction(engine()) as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None:
            raise LookupError(f"dataset {dataset_id} does not exist")
        key = dataset.cache_key
    return _pixels(key, dataset_id)


@st.cache_resource(max_entries=8)
def _pixels(dataset_key: str, dataset_id: int) -> np.ndarray:
    try:
        return dataset_pixels(engine(), dataset_id)
    except LookupError as exc:  # an imported dataset's file is gone with a wiped data folder
        st.warning(f"{str(exc)[0].upper()}{str(exc)[1:]}.")
        st.stop()


def stop_if_files_lost(run: Run) -> None:
    """A run whose embeddings are gone from the data folder (wiped on restart while the database
    lives on) is named with what is missing, and the page stops there."""
    lost = lost_files([run.embeddings])
    if lost:
        where = data_home()
        reason = ephemeral_reason()
        st.warning(f"Run #{run.id} is stored, but its files are gone from the data folder {where}: "
                   f"{', '.join(lost)}." + (f" The folder does not survive a restart: {reason}." if reason else "")
                   + " Train the run again (or embed with a checkpoint file) to use it here.")
        st.stop()


def storage_notice() -> None:
    """On a host whose data folder does not survive a restart, say what is kept and what is not."""
    try:
        reason = ephemeral_reason()
    except ValueError as exc:
        st.warning(str(exc))
        return
    if reason is None:
        return
    url = database_url()
    if database_in_data_home(url):
        st.warning(f"**Nothing stored here survives a restart.** The data folder {data_home()} is wiped when the "
                   f"app restarts ({reason}), and the runs are stored in a SQLite file inside it. To keep them, "
                   f"give the app a database elsewhere: `{DB_ENV}` in its secrets, e.g. a PostgreSQL URL.")
    else:
        st.info(f"**Runs are kept; their files are not.** Runs, epochs and metrics are stored in the database "
                f"{shown_url(url)}. Checkpoints, embeddings and maps are written to the data folder {data_home()}, "
                f"which is wiped when the app restarts ({reason}); a run whose files are gone says so below.")


def run_label(run) -> str:
    metric = ""
    if run.metrics and "precision_at_1" in run.metrics:
        metric = f" · P@1 {run.metrics['precision_at_1']:.3f}"
    config = run.config or {}
    what = f"{config.get('loss', 'loaded encoder')}" if run.kind == "train" else "loaded encoder"
    return f"#{run.id} {run.dataset.name} · {what} · {run.status}{metric}"


def run_card(run: Run) -> None:
    """A run's status, progress, mining counts and result (metrics, or why it ended); Cancel while active."""
    with st.container(border=True):
        head, button = st.columns([5, 1])
        details = " · ".join(filter(None, [run.config.get("loss"), run.phase, run.device]))
        head.markdown(f"**Run #{run.id}** {STATUS_ICON.get(run.status, '')} {run.status} · {details}")
        if run.status in queries.ACTIVE and button.button("Cancel", key=f"cancel-{run.id}"):
            try:
                cancel_run(engine(), run.id)
            except StorageError as exc:  # the database stayed locked (a stalled worker): a sentence
                st.error(str(exc))
            else:
                flash(f"Asked run #{run.id} to stop.", "info")  # shown once the run has ended and the page reruns
        fraction = run.step / run.total_steps if run.total_steps else 0.0
        st.progress(min(1.0, fraction), text=f"epoch {run.epoch} · step {run.step}/{run.total_steps or '?'}")
        if run.last_loss is not None:
            counts = run.recent_counts or {}
            a, b, c, d = st.columns(4)
            a.metric("loss", f"{run.last_loss:.4f}")
            b.metric("easy", f"{counts.get('easy', 0):,}")
            c.metric("semi-hard", f"{counts.get('semi-hard', counts.get('semi_hard', 0)):,}")
            d.metric("hard", f"{counts.get('hard', 0):,}")
        if run.status == "completed" and run.metrics and "unavailable" in run.metrics:
            st.success(f"Done in {run.seconds:.0f} s · no retrieval metrics: {run.metrics['unavailable']}")
        elif run.status == "completed" and run.metrics:
            st.success(f"Done in {run.seconds:.0f} s · " + " · ".join(
                f"{title} {run.metrics[key]:.3f}" for key, title in METRIC_NAMES.items() if key in run.metrics))
        elif run.reason and run.status != "completed":  # a cancel is no error
            {"failed": st.error, "interrupted": st.warning}.get(run.status, st.info)(run.reason.splitlines()[0])


def has_epochs(run: Run) -> bool:
    """What the Triplets page can show: a training run with at least one stored epoch."""
    return run.kind == "train" and bool(run.epochs)


def has_embeddings(run: Run) -> bool:
    """What the Explore page can show: a completed run with embeddings."""
    return run.status == "completed" and bool(run.embeddings)


def pick_run(label: str, completed_only: bool = True, kind: Optional[str] = None, key: str = "run",
             shows: Callable[[Run], bool] = has_embeddings) -> Optional[int]:
    """A select box of runs, newest first. It opens on the run the URL names (`?run=N`) when that is
    listed, else on the newest run the page can show (`shows`), so an interrupted run with nothing
    stored is never the first thing a page offers. The choice goes back into the URL."""
    with transaction(engine()) as session:
        runs = queries.completed_runs(session) if completed_only else queries.list_runs(session)
        runs = [run for run in runs if kind is None or run.kind == kind]
        options = {run.id: run_label(run) for run in runs}
        showable = [run.id for run in runs if shows(run)]
    if not options:
        return None
    ids = list(options)
    wanted = st.query_params.get("run")
    if wanted and wanted.isdigit() and int(wanted) in ids:
        index = ids.index(int(wanted))
    else:
        index = ids.index(showable[0]) if showable else 0
    run_id = st.selectbox(label, ids, index=index, format_func=options.get, key=key)
    st.query_params["run"] = str(run_id)
    return run_id


def between(low: float, high: float) -> Callable[[float], bool]:
    """A range check for `kept_in_url` (NaN is outside every range)."""
    return lambda value: low <= value <= high


def parse_bool(text: str) -> bool:
    return {"true": True, "false": False}[text.lower()]


def kept_in_url(key: str, default: Any, valid: Collection | Callable[[Any], bool],
                parse: Callable[[str], Any] = str) -> str:
    """Keeps a keyed widget's value in the URL's query parameter `key`, so a reload keeps it.

    Use it as the widget's key and give the widget no default of its own (the default lives here):
    ``st.selectbox("Encoder", ENCODERS, key=kept_in_url("encoder", "small_cnn", ENCODERS))``.
    When the session has no value for `key` yet (a new session, or a widget that was hidden), the
    URL's text seeds it if `parse` accepts it and the value is `valid` (a collection it must be in,
    or a predicate); otherwise the value kept this session (across page switches), else `default`.
    Garbage in the URL is ignored, never raised. The current value then goes back into the URL:
    Streamlit applies the browser's widget changes before the script runs, so the value here is
    the one the widget is about to show. Values are written as the options' own names (not their
    display labels), so links stay short and survive rewording.
    """
    kept = st.session_state.setdefault("_kept_in_url", {})
    if key not in st.session_state:
        check = valid if callable(valid) else valid.__contains__
        candidates = [kept[key]] if key in kept else []
        if key in st.query_params:  # a link names a value: it goes first
            try:
                candidates.insert(0, parse(st.query_params[key]))
            except (ValueError, TypeError, KeyError):
                pass
        st.session_state[key] = next((value for value in candidates if check(value)), default)
    value = kept[key] = st.session_state[key]
    text = str(value).lower() if isinstance(value, bool) else str(value)
    if st.query_params.get(key) != text:
        st.query_params[key] = text
    return key


def flash(message: str, kind: str = "success") -> None:
    """Show `message` on the page's next run: a confirmation written right before st.rerun() is
    wiped by that rerun before anyone sees it. `kind`: success, info, warning or error."""
    st.session_state["_flash"] = (kind, message)


def show_flash() -> None:
    """Show, once, the message `flash` left for this run."""
    note = st.session_state.pop("_flash", None)
    if note is not None:
        kind, message = note
        {"success": st.success, "info": st.info, "warning": st.warning, "error": st.error}[kind](message)
