"""What every page shares: the engine (one per server process), the dataset's pixels, notices
about the data folder, widgets kept in the URL, and messages shown after a rerun."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, Collection, Optional

import numpy as np
import streamlit as st

from core.data.catalog import dataset_cache_key
from core.explore.service import dataset_pixels
from core.runs.overview import open_store
from storage.hosting import EPHEMERAL_ENV, database_in_data_home, ephemeral_reason, lost_files
from storage.settings import DB_ENV, HOME_ENV, StorageError, data_home, database_url, shown_url

if TYPE_CHECKING:  # the engine is only passed on to core's services
    from sqlalchemy import Engine

# the settings a host's secrets may hold (hosted Streamlit: the app's Secrets), over the environment
SECRET_SETTINGS = (DB_ENV, HOME_ENV, EPHEMERAL_ENV, "EMBEDDING_LAB_RAY_ADDRESS", "EMBEDDING_LAB_MAX_JOBS",
                   "EMBEDDING_LAB_DEMO", "EMBEDDING_LAB_PERSON_JOBS", "EMBEDDING_LAB_PERSON_UPLOAD_MB")


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

    engine = open_store(url)
    prune_other_homes()  # static map files of data folders that no longer exist
    return engine


def pixels_of(dataset_id: int) -> np.ndarray:
    """The dataset's pixel array, memory-mapped; never mutated. Cached under the dataset's
    cache_key (id and creation time), never its bare id."""
    return _pixels(dataset_cache_key(engine(), dataset_id), dataset_id)


@st.cache_resource(max_entries=8)
def _pixels(dataset_key: str, dataset_id: int) -> np.ndarray:
    try:
        return dataset_pixels(engine(), dataset_id)
    except LookupError as exc:  # an imported dataset's file is gone with a wiped data folder
        st.warning(f"{str(exc)[0].upper()}{str(exc)[1:]}.")
        st.stop()


def stop_if_files_lost(run_id: int, embeddings: Optional[str]) -> None:
    """A run whose embeddings (a path relative to the data folder) are gone from the data folder
    (wiped on restart while the database lives on) is named with what is missing, and the page stops there."""
    lost = lost_files([embeddings])
    if lost:
        where = data_home()
        reason = ephemeral_reason()
        st.warning(f"Run #{run_id} is stored, but its files are gone from the data folder {where}: "
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


def between(low: float, high: float) -> Callable[[float], bool]:
    """A range check for `kept_in_url` (NaN is outside every range)."""
    return lambda value: low <= value <= high


def parse_bool(text: str) -> bool:
    return {"true": True, "false": False}[text.lower()]


def kept_in_url(key: str, default: Any, valid: Collection | Callable[[Any], bool],
                parse: Callable[[str], Any] = str) -> str:
    """Keeps a keyed widget's value in the URL's query parameter `key`, so a reload keeps it.

    Use it as the widget's key and give the widget no default of its own (the default lives here):
    ``st.selectbox("Encoder", ENCODERS, key=kept_in_url("encoder", "vgg_grid", ENCODERS))``.
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
