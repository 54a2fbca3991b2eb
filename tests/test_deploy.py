"""Hosted Streamlit: the requirements file the host installs, the entrypoint it runs, the app's
secrets, and what the app says when its data folder does not survive a restart."""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from storage import artifacts
from storage.db import transaction
from storage.hosting import Mount, database_in_data_home, ephemeral_reason, lost_files, mount_of
from storage.schema import Dataset, Run
from tests.helpers import digits_store

ROOT = Path(__file__).resolve().parent.parent
HOSTED = ROOT / "deploy" / "requirements.txt"
TIMEOUT = 120
WHEELS = Path("/opt/wheels")  # where this kind of machine keeps PyTorch's CPU wheel (pip's find-links)


@pytest.fixture(autouse=True)
def fresh_caches():
    import streamlit as st

    st.cache_resource.clear()
    st.cache_data.clear()
    yield


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    yield from digits_store(tmp_path_factory, epochs=1)


def hosted_copy(tmp_path: Path) -> Path:
    """deploy/requirements.txt and the file it includes, with PyTorch's download host replaced by
    a local copy of the very wheel it names (this machine cannot reach download.pytorch.org)."""
    text = HOSTED.read_text()
    url = next(line.split("@", 1)[1].strip() for line in text.splitlines() if line.startswith("torch @"))
    wheel = WHEELS / urllib.request.url2pathname(url.rsplit("/", 1)[1])
    if not wheel.exists():
        pytest.skip(f"{wheel.name} is not on this machine ({WHEELS}), so the CPU wheel cannot be resolved offline")
    (tmp_path / "deploy").mkdir()
    shutil.copy(ROOT / "requirements.txt", tmp_path / "requirements.txt")
    copy = tmp_path / "deploy" / "requirements.txt"
    copy.write_text(text.replace(url, wheel.as_uri()))
    return copy


def resolve(resolver: str, requirements: Path) -> dict[str, str]:
    """{package name: version} as pip's or uv's resolver picks them for Python 3.11 on x86_64 Linux."""
    if resolver == "pip":
        report = requirements.parent / "report.json"
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
                   "--report", str(report), "-r", str(requirements)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        import json

        return {item["metadata"]["name"].lower(): item["metadata"]["version"]
                for item in json.loads(report.read_text())["install"]}
    uv = shutil.which("uv") or str(Path(sys.executable).parent / "uv")
    command = [uv, "pip", "compile", str(requirements), "--python-version", "3.11",
               "--python-platform", "x86_64-manylinux_2_28", "--no-header", "--no-annotate", "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    pins = {}
    for line in done.stdout.splitlines():
        if " @ " in line:
            name, url = line.split(" @ ", 1)
            pins[name.strip().lower()] = urllib.request.url2pathname(url.rsplit("/", 1)[1]).split("-")[1]
        elif "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower()] = version.strip()
    return pins


def pinned(requirements: Path) -> dict[str, str]:
    pins = {}
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line and not line.startswith("-"):
            name, version = line.split("==", 1)
            pins[name.split("[", 1)[0].strip().lower()] = version.strip()
    return pins


@pytest.mark.parametrize("resolver", ["pip", "uv"])
def test_the_hosted_requirements_resolve_to_the_cpu_build_of_torch(tmp_path, resolver):
    resolved = resolve(resolver, hosted_copy(tmp_path))
    assert resolved["torch"] == "2.13.0+cpu"
    cuda = sorted(name for name in resolved if name.startswith("nvidia-") or name == "triton")
    assert not cuda, f"the hosted file pulls CUDA libraries: {cuda}"
    # every other pin of the app is honoured as it is: the host runs what the tests ran
    for name, version in pinned(ROOT / "requirements.txt").items():
        if name != "torch":
            assert resolved.get(name) == version, (name, resolved.get(name), version)


def test_the_top_level_requirements_would_bring_cuda_to_a_host(tmp_path):
    """Why the host needs its own file: uv resolves the plain torch pin to the CUDA build on Linux."""
    shutil.copy(ROOT / "requirements.txt", tmp_path / "requirements.txt")
    resolved = resolve("uv", tmp_path / "requirements.txt")
    assert resolved["torch"] == "2.13.0"
    assert any(name.startswith("nvidia-") for name in resolved)


def test_the_hosted_entrypoint_runs_the_app_with_its_pages_and_static_files(store, tmp_path):
    at = AppTest.from_file(str(ROOT / "deploy" / "streamlit_app.py"), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    assert [t.value for t in at.title] == ["Data"]
    assert any(b.label == "Use digits" for b in at.button)
    # Streamlit serves static/ beside the entrypoint: deploy/static must be the app's own folder
    assert (ROOT / "deploy" / "static").resolve() == (ROOT / "static").resolve()
    probe = ROOT / "static" / f"probe-{os.getpid()}.txt"
    probe.write_text("served")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "deploy/streamlit_app.py", "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    try:
        body, deadline = None, time.monotonic() + TIMEOUT
        while body is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/app/static/{probe.name}", timeout=5) as reply:
                    body = reply.read().decode()
            except OSError:
                time.sleep(0.3)
        assert body == "served"
    finally:
        server.terminate()
        server.wait(timeout=30)
        probe.unlink()


def test_the_database_url_in_the_apps_secrets_wins_over_the_environment(store, tmp_path, monkeypatch):
    engine, run_id = store
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.setenv("EMBEDDING_LAB_DB", f"sqlite:///{other / 'empty.db'}")  # restored after the test
    at = AppTest.from_file(str(ROOT / "pages" / "runs.py"), default_timeout=TIMEOUT)
    at.secrets["EMBEDDING_LAB_DB"] = str(engine.url)  # the store with the finished run
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    assert run_id in list(at.dataframe[0].value["run"])
    assert os.environ["EMBEDDING_LAB_DB"] == str(engine.url)  # what the worker processes are given
    # without the secret, the environment's (empty) database is the one shown
    at = AppTest.from_file(str(ROOT / "pages" / "runs.py"), default_timeout=TIMEOUT)
    monkeypatch.setenv("EMBEDDING_LAB_DB", f"sqlite:///{other / 'empty.db'}")
    at.run()
    assert not at.exception
    assert any("No run yet" in i.value for i in at.info)


def test_what_counts_as_a_data_folder_wiped_on_restart(tmp_path, monkeypatch):
    monkeypatch.delenv("EMBEDDING_LAB_EPHEMERAL", raising=False)
    mounts = [Mount(Path("/"), "overlay"), Mount(Path("/data"), "ext4"), Mount(Path("/data/scratch"), "tmpfs")]
    assert mount_of(Path("/data/lab"), mounts).fstype == "ext4"
    assert mount_of(Path("/data/scratch/lab"), mounts).fstype == "tmpfs"
    assert "overlay" in ephemeral_reason(Path("/srv/lab"), mounts)
    assert "tmpfs" in ephemeral_reason(Path("/data/scratch/lab"), mounts)
    assert ephemeral_reason(Path("/data/lab"), mounts) is None  # a mounted volume is kept
    assert "hosted Streamlit" in ephemeral_reason(Path("/mount/src/embedding-lab/.embedding-lab"), mounts[1:2])
    monkeypatch.setenv("EMBEDDING_LAB_EPHEMERAL", "0")
    assert ephemeral_reason(Path("/data/scratch/lab"), mounts) is None
    monkeypatch.setenv("EMBEDDING_LAB_EPHEMERAL", "1")
    assert ephemeral_reason(Path("/data/lab"), mounts)
    monkeypatch.setenv("EMBEDDING_LAB_EPHEMERAL", "perhaps")
    with pytest.raises(ValueError, match="EMBEDDING_LAB_EPHEMERAL must be 1 or 0"):
        ephemeral_reason(Path("/data/lab"), mounts)


def runs_page(monkeypatch, ephemeral: str) -> AppTest:
    monkeypatch.setenv("EMBEDDING_LAB_EPHEMERAL", ephemeral)
    at = AppTest.from_file(str(ROOT / "pages" / "runs.py"), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def test_the_runs_page_says_what_a_restart_loses(store, monkeypatch, tmp_path):
    engine, run_id = store
    assert database_in_data_home(str(engine.url))
    assert not runs_page(monkeypatch, "0").warning and not runs_page(monkeypatch, "0").info
    warned = " ".join(w.value for w in runs_page(monkeypatch, "1").warning)
    assert "Nothing stored here survives a restart" in warned and "EMBEDDING_LAB_DB" in warned
    # the database elsewhere (as with PostgreSQL): the runs are kept, their files are not
    elsewhere = tmp_path / "db"
    elsewhere.mkdir()
    copy = elsewhere / "lab.db"
    with transaction(engine):
        pass
    engine.dispose()
    shutil.copy(Path(engine.url.database), copy)
    monkeypatch.setenv("EMBEDDING_LAB_DB", f"sqlite:///{copy}")
    told = " ".join(i.value for i in runs_page(monkeypatch, "1").info)
    assert "Runs are kept; their files are not" in told and str(copy) in told


def test_runs_whose_files_were_wiped_say_so_and_built_in_images_come_back(store, monkeypatch):
    engine, run_id = store
    with transaction(engine) as session:
        run = session.get(Run, run_id)
        embeddings, dataset_folder = run.embeddings, session.get(Dataset, run.dataset_id).folder
    assert lost_files([embeddings]) == []
    saved = artifacts.absolute(embeddings).read_bytes()
    pixels = artifacts.absolute(dataset_folder) / "pixels.npy"
    before = np.load(pixels)
    artifacts.absolute(embeddings).unlink()
    pixels.unlink()  # what a redeploy does to the data folder, the database living elsewhere
    try:
        at = runs_page(monkeypatch, "1")
        table = at.dataframe[0].value
        assert list(table.loc[table["run"] == run_id, "files"]) == ["lost"]
        at = AppTest.from_file(str(ROOT / "pages" / "explore.py"), default_timeout=TIMEOUT)
        at.query_params["run"] = str(run_id)
        at.run()
        assert not at.exception, [e.message for e in at.exception]
        warned = " ".join(w.value for w in at.warning)
        assert f"Run #{run_id} is stored, but its files are gone" in warned and embeddings in warned
        # a built-in dataset's images are written again from their source when next needed
        from core.explore.service import dataset_pixels

        assert np.array_equal(dataset_pixels(engine, run.dataset_id), before)
    finally:
        artifacts.absolute(embeddings).write_bytes(saved)
