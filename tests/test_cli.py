"""The command line end to end on digits, as a user runs it."""
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def core(*args, home: Path, check=True) -> subprocess.CompletedProcess:
    env = dict(os.environ, EMBEDDING_LAB_HOME=str(home))
    env.pop("EMBEDDING_LAB_DB", None)
    result = subprocess.run([sys.executable, "-m", "core", *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def last_json(result) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


def untrained_precision_at_1(home: Path) -> float:
    os.environ["EMBEDDING_LAB_HOME"] = str(home)
    import torch

    from core.data.datasets import load_arrays
    from core.explore.metrics import retrieval_metrics
    from core.training.loop import embed
    from models.encoders import build_encoder
    from storage.db import make_engine

    data = load_arrays(make_engine(), 1)
    torch.manual_seed(0)
    model = build_encoder("small_cnn", 1, 64)
    test = data.test_index
    return retrieval_metrics(embed(model, data.pixels[test]), data.labels[test])["precision_at_1"]


def test_train_on_digits_beats_an_untrained_encoder(tmp_path, monkeypatch):
    home = tmp_path / "lab"
    monkeypatch.setenv("EMBEDDING_LAB_HOME", str(home))
    result = core("train", "--dataset", "digits", "--epochs", "4", "--batch-size", "128", "--device", "auto",
                  "--no-projection", home=home)
    summary = last_json(result)
    for key in ("run_id", "status", "device", "seconds", "precision_at_1", "r_precision", "map_at_r", "recall_at_1"):
        assert key in summary, key
    assert summary["status"] == "completed" and summary["device"] == "cpu"
    assert "epoch" in result.stderr  # the progress bar
    baseline = untrained_precision_at_1(home)
    assert summary["precision_at_1"] > baseline + 0.05, (summary, baseline)
    assert summary["precision_at_1"] > 0.85

    listed = core("runs", "--json", home=home)
    assert json.loads(listed.stdout.splitlines()[0])["run_id"] == summary["run_id"]
    assert "digits" in core("datasets", home=home).stdout

    # search with an image file: a digit from the dataset finds itself first
    from core.data.datasets import load_arrays
    from storage.db import make_engine

    data = load_arrays(make_engine(), 1)
    query = tmp_path / "query.png"
    Image.fromarray(np.asarray(data.pixels[7])[..., 0]).save(query)
    hits = last_json(core("search", "--run", str(summary["run_id"]), "--image", str(query), "-k", "3", home=home))
    assert len(hits) == 3 and hits[0]["position"] == 7 and hits[0]["distance"] < 1e-3
    assert hits[0]["label"] == str(data.labels[7])

    # load that encoder instead of training: embed the same data as a run of its own
    embedded = last_json(core("embed", "--dataset", "digits", "--run", str(summary["run_id"]), "--no-projection",
                              home=home))
    assert embedded["kind"] == "embed" and embedded["status"] == "completed"
    assert embedded["precision_at_1"] == summary["precision_at_1"]


def test_import_and_bad_arguments(tmp_path):
    home = tmp_path / "lab"
    archive = tmp_path / "shapes.zip"
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(archive, "w") as zf:
        for label, value in (("dark", 30), ("light", 220)):
            for i in range(6):
                buffer = io.BytesIO()
                Image.fromarray(np.clip(value + rng.normal(0, 10, (12, 12)), 0, 255).astype(np.uint8)).save(buffer, "PNG")
                zf.writestr(f"{label}/{i}.png", buffer.getvalue())
        zf.writestr("dark/notes.png", b"not really a png")
    report = last_json(core("import", str(archive), "--name", "shapes", "--size", "16", home=home))
    assert report["images"] == 12 and report["classes"] == 2
    assert any("notes.png" in line for line in report["rejected"])

    bad = core("train", "--dataset", "shapes", "--loss", "contrastive", "--miner", "semi-hard", home=home, check=False)
    assert bad.returncode == 2 and "miner 'semi-hard' does not apply to the contrastive loss" in bad.stderr
    # a triplet miner without --loss: the default loss (supcon) refuses it and names the loss it serves
    alone = core("train", "--dataset", "shapes", "--miner", "semi-hard", home=home, check=False)
    assert alone.returncode == 2 and "Traceback" not in alone.stderr
    assert "does not apply to the supcon loss" in alone.stderr and "serves the triplet loss" in alone.stderr
    missing = core("train", "--dataset", "nope", home=home, check=False)
    assert missing.returncode == 2 and "no dataset named 'nope'" in missing.stderr
    bad_file = tmp_path / "weights.safetensors"
    bad_file.write_bytes(b"\x80\x04not a checkpoint")
    refused = core("embed", "--dataset", "shapes", "--checkpoint", str(bad_file), home=home, check=False)
    assert refused.returncode == 2 and "weights.safetensors: not a safetensors file" in refused.stderr


def test_every_training_option_and_resume_from_the_command_line(tmp_path, monkeypatch):
    home = tmp_path / "lab"
    monkeypatch.setenv("EMBEDDING_LAB_HOME", str(home))
    monkeypatch.delenv("EMBEDDING_LAB_DB", raising=False)
    from core.training.config import RunConfig
    from core.runs.jobs import create_training_run
    from core.training.loop import Cancelled
    from core.runs.worker import execute_run
    from storage import queries
    from storage.db import make_engine, transaction
    from storage.schema import Run

    options = ["--loss", "triplet", "--miner", "batch-hard", "--triplet-variant", "squared", "--supervision", "labels",
               "--sampler", "pk", "--samples-per-class", "8", "--precision", "fp32", "--no-compile",
               "--distance", "euclidean", "--margin", "0.3", "--epochs", "1", "--batch-size", "64", "--seed", "3"]
    summary = last_json(core("train", "--dataset", "digits", *options, "--no-projection", home=home))
    assert summary["status"] == "completed"
    engine = make_engine()
    with transaction(engine) as session:
        config = session.get(Run, summary["run_id"]).config
    assert (config["miner"], config["triplet_variant"], config["samples_per_class"], config["margin"],
            config["seed"], config["compile"]) == ("batch-hard", "squared", 8, 0.3, 3, False)

    # a run cancelled in its second epoch, resumed from the command line under the same id
    run_id = create_training_run(engine, RunConfig(dataset="digits", epochs=2, batch_size=128, loss="supcon"))

    def stop_in_epoch_two(progress):
        if progress.epoch == 2:
            raise Cancelled()

    assert execute_run(engine, run_id, on_step=stop_in_epoch_two, project=False)["status"] == "cancelled"
    refused = core("train", "--resume", str(run_id), "--epochs", "5", home=home, check=False)
    assert refused.returncode == 2 and "leave out --epochs" in refused.stderr
    resumed = core("train", "--resume", str(run_id), "--no-projection", home=home)
    assert last_json(resumed)["run_id"] == run_id and last_json(resumed)["status"] == "completed"
    assert f"resuming run {run_id} after epoch 1" in resumed.stderr
    with transaction(engine) as session:
        assert [e.epoch for e in queries.epoch_rows(session, [run_id])] == [1, 2]
    again = core("train", "--resume", str(run_id), home=home, check=False)
    assert again.returncode == 2 and f"run {run_id} is completed" in again.stderr
    wrong_miner = core("train", "--dataset", "digits", "--loss", "supcon", "--miner", "facenet", home=home, check=False)
    assert wrong_miner.returncode == 2 and "miner 'facenet' does not apply to the supcon loss" in wrong_miner.stderr


def test_train_prints_its_line_before_the_map_and_can_wait_for_it(tmp_path):
    """The JSON line comes once the run is completed, the map a job of its own; --wait-projection
    waits for that job and reports where the map is. (The one CLI test that waits on a UMAP
    compile: the map's own job compiles numba in a new process, cold on a fresh machine.)"""
    home = tmp_path / "lab"
    started = last_json(core("train", "--dataset", "digits", "--epochs", "1", "--batch-size", "128", home=home))
    assert started["status"] == "completed" and started["projection"] == "started"
    refused = core("project", "--run", str(started["run_id"]), home=home, check=False)
    assert refused.returncode in (0, 2)  # done already, or "already being computed by another process"
    if refused.returncode == 2:
        assert "already being computed" in refused.stderr and "Traceback" not in refused.stderr

    waited = last_json(core("train", "--dataset", "digits", "--epochs", "1", "--batch-size", "128",
                            "--wait-projection", home=home))
    assert waited["status"] == "completed" and waited["projection"]["status"] == "done", waited
    coords = np.load(waited["projection"]["path"])
    assert coords.shape == (1797, 2) and np.isfinite(coords).all()
