import os
import sys

import pytest


@pytest.fixture(autouse=True)
def keep_the_main_module():
    """Streamlit's script runner (AppTest) makes the page it ran `__main__` and leaves it there; a
    later test's spawned process would then start by running that page. Put the real one back."""
    main = sys.modules.get("__main__")
    yield
    if main is not None:
        sys.modules["__main__"] = main


@pytest.fixture
def fresh_caches():
    """Streamlit's caches emptied: the engine is a cached resource, and each test's own database
    must not meet the last one's (page tests: pytestmark = usefixtures("fresh_caches"))."""
    import streamlit as st

    st.cache_resource.clear()
    st.cache_data.clear()
    yield


@pytest.fixture
def lab_home(tmp_path, monkeypatch):
    """A fresh data folder and SQLite database for one test."""
    home = tmp_path / "lab"
    monkeypatch.setenv("EMBEDDING_LAB_HOME", str(home))
    monkeypatch.delenv("EMBEDDING_LAB_DB", raising=False)
    return home


@pytest.fixture
def sqlite_home(tmp_path, monkeypatch):
    """lab_home for the tests of SQLite files and of the data folder, in modules whose lab_home
    is any_home."""
    home = tmp_path / "lab"
    monkeypatch.setenv("EMBEDDING_LAB_HOME", str(home))
    monkeypatch.delenv("EMBEDDING_LAB_DB", raising=False)
    return home


@pytest.fixture(scope="session")
def postgres_server():
    """One PostgreSQL server for the whole session, started on first use (tests/postgres.py)."""
    from tests.postgres import PostgresServer

    server = PostgresServer()
    reason = server.start()
    if reason:
        server.stop()
        pytest.skip(reason)
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_home(request, tmp_path, monkeypatch):
    """A fresh data folder with a fresh database: SQLite inside it, or a new database on the
    session's PostgreSQL server (named by a plain postgresql:// URL, as a user would)."""
    home = tmp_path / "lab"
    monkeypatch.setenv("EMBEDDING_LAB_HOME", str(home))
    if request.param == "postgresql":
        server = request.getfixturevalue("postgres_server")
        database = server.new_database()
        request.addfinalizer(lambda: server.drop_database(database))  # after the test's engines are gone
        monkeypatch.setenv("EMBEDDING_LAB_DB", database)
    else:
        monkeypatch.delenv("EMBEDDING_LAB_DB", raising=False)
    return home


@pytest.fixture
def any_engine(any_home):
    from storage.db import make_engine

    engine = make_engine()
    yield engine
    engine.dispose()


@pytest.fixture
def engine(lab_home):
    from storage.db import make_engine

    engine = make_engine()
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny batches: OpenMP threads cost more than they save there, and on a busy
    machine a parallel region waits for a descheduled thread (seen: 4x the wall time)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def pytest_configure(config):
    # a skipped test always says why (the PostgreSQL and Ray tests skip only when their server
    # cannot be started here, and that must never pass unnoticed)
    if "s" not in (config.option.reportchars or ""):
        config.option.reportchars = (config.option.reportchars or "") + "s"
    # keep numba's compiled UMAP between test processes and runs
    os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "embedding-lab-numba"))


def pytest_sessionfinish(session, exitstatus):
    # the tests' temporary data folders are gone now: so are their static map files
    from core.explore.map_files import prune_other_homes

    prune_other_homes()


# The files that take longest, first: the test processes take whole files in collection order
# (--dist loadfile), so a long file collected last (test_ray.py, ~4 minutes of Ray heads and jobs)
# ran alone at the end while the other process sat idle, and the suite went past 10 minutes. This
# order holds only with --no-loadscope-reorder (.pytest.ini): by default pytest-xdist re-sorts the
# files by their number of tests, which put the long files of few tests (the command line, the
# browser, sign-in) last. Roughly by their time on the loaded 2-core machine (--durations), most
# first; the files not named follow in collection order, each well under a minute.
LONGEST_FIRST = (
    "test_ray.py",  # ~4 min: a Ray head, its jobs, a two-worker run cancelled and resumed
    "test_cli.py", "test_cli_errors.py", "test_database.py", "test_queue.py",  # processes and trainings
    "test_browser_map.py", "test_inspector.py", "test_signin.py", "test_browser.py", "test_lifecycle.py",
    "test_pages.py", "test_browser_train.py", "test_browser_compare.py", "test_deploy.py", "test_status.py",
    "test_evolution.py", "test_stalls.py", "test_run_files.py", "test_parallel.py",
)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
