"""Every user mistake on the command line is one line on stderr and a non-zero exit, with nothing
half-stored: bad settings, unknown runs, degenerate datasets, bad checkpoints."""
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def core(*args, home: Path, db: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, EMBEDDING_LAB_HOME=str(home))
    env.pop("EMBEDDING_LAB_DB", None)
    if db is not None:
        env["EMBEDDING_LAB_DB"] = db
    return subprocess.run([sys.executable, "-m", "core", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def refused(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The command failed with one line on stderr (no traceback) that holds every fragment."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (result.returncode, result.stdout[-500:], result.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def stored_runs(home: Path) -> list:
    """(id, status) of every run in the data folder's database."""
    import sqlite3

    path = home / "lab.db"
    if not path.exists():
        return []
    with sqlite3.connect(path) as connection:
        return connection.execute("SELECT id, status FROM runs ORDER BY id").fetchall()


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A data folder with digits and one completed run (#1), made in this process."""
    home = tmp_path_factory.mktemp("cli-errors")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EMBEDDING_LAB_HOME", str(home))
        patch.delenv("EMBEDDING_LAB_DB", raising=False)
        from storage.db import make_engine
        from tests.helpers import completed_digits_run

        engine = make_engine()
        completed_digits_run(engine)
        engine.dispose()
    return home


def zip_of(path: Path, classes: dict[str, int]) -> Path:
    """A zip with `count` distinct grey images in each class folder."""
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as archive:
        for label, count in classes.items():
            for i in range(count):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (10, 10), dtype=np.uint8)).save(buffer, "PNG")
                archive.writestr(f"{label}/{i}.png", buffer.getvalue())
    return path


def test_bad_storage_settings_are_one_line(tmp_path):
    refused(core("runs", home=tmp_path / "a", db="not a url"), "EMBEDDING_LAB_DB")
    refused(core("runs", home=tmp_path / "b", db=f"sqlite:///{tmp_path}/missing/folder/lab.db"))
    refused(core("runs", home=tmp_path / "c", db="sqlite:///:memory:"), "memory")
    refused(core("runs", home=tmp_path / "d", db="sqlite://"), "memory")
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    refused(core("runs", home=a_file), str(a_file))


def test_unknown_and_unfinished_runs(home, tmp_path):
    refused(core("project", "--run", "99", home=home), "run 99 does not exist")
    assert not (home / "runs" / "99").exists()
    refused(core("delete-run", "99", home=home), "run 99 does not exist")
    refused(core("search", "--run", "99", "--image", str(tmp_path), home=home))

    from storage.db import make_engine, transaction
    from storage.schema import Run

    os.environ["EMBEDDING_LAB_HOME"] = str(home)
    try:
        engine = make_engine()
        with transaction(engine) as session:
            failed = Run(dataset_id=1, kind="train", config={}, status="failed", reason="RuntimeError: it broke")
            session.add(failed)
            session.flush()
            failed_id = failed.id
    finally:
        del os.environ["EMBEDDING_LAB_HOME"]
    refused(core("project", "--run", str(failed_id), home=home), f"run {failed_id} has no embeddings", "failed")


def test_search_arguments(home, tmp_path):
    refused(core("search", "--run", "1", "--image", str(tmp_path), home=home), "is a folder")
    refused(core("search", "--run", "1", "--image", str(tmp_path / "nope.png"), home=home), "nope.png")
    query = tmp_path / "query.png"
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(query)
    refused(core("search", "--run", "1", "--image", str(query), "-k", "0", home=home), "k must be from 1 to 1797")
    refused(core("search", "--run", "1", "--image", str(query), "-k", "100000", home=home), "got 100000")
    hits = json.loads(core("search", "--run", "1", "--image", str(query), "-k", "1797", home=home).stdout)
    assert len(hits) == 1797 and all(h["position"] >= 0 for h in hits)


def test_bad_training_settings_store_nothing(home):
    before = stored_runs(home)
    refused(core("train", "--dataset", "digits", "--seed", "-5", home=home), "seed")
    refused(core("train", "--dataset", "digits", "--epochs", "0", home=home), "epochs")
    refused(core("train", "--dataset", "digits", "--width", "2", home=home), "width must be a whole number from 4 to 512, got 2")
    refused(core("train", "--dataset", "digits", "--width", "wide", home=home), "--width")
    refused(core("train", "--dataset", "999", home=home), "999")
    assert stored_runs(home) == before


def test_dataset_names_and_ids_are_never_confused(home, tmp_path):
    archive = zip_of(tmp_path / "two.zip", {"a": 3, "b": 3})
    refused(core("import", str(archive), "--name", "1", home=home), "digits")
    imported = json.loads(core("import", str(archive), "--name", "two", home=home).stdout)
    listed = core("datasets", home=home).stdout
    assert "two" in listed and imported["images"] == 6
    refused(core("import", str(archive), "--name", "two", home=home), "already exists")


def test_degenerate_datasets_are_refused_before_a_run_is_stored(home, tmp_path):
    one_class = zip_of(tmp_path / "one.zip", {"cats": 6})
    assert core("import", str(one_class), "--name", "one-class", home=home).returncode == 0
    singles = zip_of(tmp_path / "singles.zip", {"a": 1, "b": 1, "c": 1})
    assert core("import", str(singles), "--name", "singles", home=home).returncode == 0
    before = stored_runs(home)
    refused(core("train", "--dataset", "one-class", "--loss", "triplet", home=home), "one class")
    refused(core("train", "--dataset", "one-class", "--loss", "contrastive", home=home), "one class")
    refused(core("train", "--dataset", "singles", "--loss", "supcon", home=home), "one image each")
    assert stored_runs(home) == before


def test_bad_checkpoints_store_nothing(home, tmp_path):
    from safetensors.numpy import save_file

    before, files_before = stored_runs(home), sorted(p.name for p in (home / "runs").iterdir())
    huge = tmp_path / "huge.safetensors"
    save_file({"w": np.zeros(1, np.float32)}, str(huge), metadata={
        "format": "embedding-lab/encoder", "format_version": "1", "in_channels": "1",
        "config": json.dumps({"encoder": "small_cnn", "embedding_dim": 6_000_000})})
    refused(core("embed", "--dataset", "digits", "--checkpoint", str(huge), home=home), "huge.safetensors")
    refused(core("embed", "--dataset", "digits", "--checkpoint", str(tmp_path), home=home))
    assert stored_runs(home) == before
    assert sorted(p.name for p in (home / "runs").iterdir()) == files_before


def test_cuda_on_a_machine_without_it_is_refused_before_a_run_is_stored(home, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # torch then sees no GPU, whatever this machine has
    before = stored_runs(home)
    refused(core("train", "--dataset", "digits", "--epochs", "1", "--device", "cuda", home=home),
            "device 'cuda' was asked for, but this machine has no CUDA GPU", "choose auto or cpu")
    refused(core("embed", "--dataset", "digits", "--run", "1", "--device", "cuda", home=home), "no CUDA GPU")
    assert stored_runs(home) == before
