"""The embedding space across epochs: the probe stored at every epoch with its Precision@1, the
aligned maps (identity kept, stiller than independent fits), the job through `project`, and the
Explore page's view of it."""
import json

import numpy as np
import pytest
from sqlalchemy import select

from core.explore import evolution
from core.explore.evolution import (
    aligned_maps, consecutive_displacement, load_probe, precision_at_1, probe_epochs, probe_positions,
    similarity_align,
)
from core.explore.metrics import retrieval_metrics
from storage import artifacts
from storage.db import transaction
from storage.schema import EpochRow, ProjectionRow, Run
from tests.helpers import completed_digits_run


def clustered_sequence(seed: int, scales=(1.5, 2.0, 2.5), n: int = 300, classes: int = 5, d: int = 16):
    """Embeddings of the same n points at len(scales) epochs: class centres pulling apart, each
    point keeping its own offset (its identity) with a little noise per epoch."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, d))
    own = rng.normal(size=(n, d))
    frames = []
    for scale in scales:
        x = scale * centres[labels] + own + 0.3 * rng.normal(size=(n, d))
        frames.append((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))
    return labels, frames


def test_probe_is_the_test_images_or_a_fixed_sample():
    split = np.array(["train", "test"] * 50)
    assert probe_positions(split).tolist() == list(range(1, 100, 2))
    assert probe_positions(np.array(["train"] * 7)).tolist() == list(range(7))  # no test split: every image
    sample = probe_positions(split, max_points=10)
    assert len(sample) == 10 and set(sample) <= set(range(1, 100, 2)) and list(sample) == sorted(sample)
    assert sample.tolist() == probe_positions(split, max_points=10).tolist()  # the same images every time


def test_precision_at_1_equals_core_metrics():
    rng = np.random.default_rng(0)
    labels = np.append(rng.integers(0, 4, 199), 9)  # class 9 has one image: not a query
    x = rng.normal(size=(4, 8))[labels % 4] + rng.normal(size=(200, 8)) * 1.5
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    expected = retrieval_metrics(x, labels)["precision_at_1"]
    assert 0.2 < expected < 1.0
    assert precision_at_1(x, labels) == pytest.approx(expected, abs=1e-12)
    assert precision_at_1(x, None) is None
    assert precision_at_1(x, np.zeros(200, dtype=int)) is None  # one class: the metric means nothing


def test_store_probe_gives_the_model_back_in_its_mode(lab_home, tmp_path):
    from core.data.datasets import DatasetArrays
    from models.encoders import build_encoder

    model = build_encoder("small_cnn", 1, 8)
    pixels = np.random.default_rng(0).integers(0, 255, (30, 8, 8, 1), dtype=np.uint8)
    data = DatasetArrays(pixels, np.arange(30) % 3, np.array(["train", "test", "test"] * 10), ["a", "b", "c"])
    for mode in (True, False):
        model.train(mode)
        staged = evolution.store_probe(tmp_path / f"staging-{mode}", 1, 1, model, data)
        assert model.training is mode
        assert staged.precision_at_1 is not None
        stored = np.load(staged.moves[-1][0])
        assert stored.dtype == np.float16 and stored.shape == (20, 8)  # the 20 test images


@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory):
    """A two-epoch digits run trained in this process (no map job), in a data home of its own."""
    from storage.db import make_engine

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EMBEDDING_LAB_HOME", str(tmp_path_factory.mktemp("evolution") / "lab"))
        patch.delenv("EMBEDDING_LAB_DB", raising=False)
        engine = make_engine()
        yield engine, completed_digits_run(engine, epochs=2)
        engine.dispose()


def test_a_run_stores_its_probe_and_precision_at_1_every_epoch(two_epoch_run):
    from core.data.datasets import load_arrays
    from core.explore.service import run_embeddings

    engine, run_id = two_epoch_run
    with transaction(engine) as session:
        dataset_id, dim = session.get(Run, run_id).dataset_id, session.get(Run, run_id).config["embedding_dim"]
        stored = {row.epoch: row.probe_precision_at_1
                  for row in session.scalars(select(EpochRow).where(EpochRow.run_id == run_id))}
    data = load_arrays(engine, dataset_id)
    assert probe_epochs(run_id) == [1, 2] == sorted(stored)
    positions, frames = load_probe(run_id)
    assert positions.tolist() == data.test_index.tolist()  # digits' held-out images, in order
    assert all(f.shape == (len(positions), dim) for f in frames)
    assert not np.allclose(frames[0], frames[1], atol=1e-2)  # the second epoch moved the embedding
    for epoch, frame in zip((1, 2), frames):
        expected = retrieval_metrics(frame, data.labels[positions])["precision_at_1"]
        assert stored[epoch] == pytest.approx(expected, abs=1e-9)
    # the last epoch's probe is the finished encoder's embedding of those very images, row by row
    final = run_embeddings(engine, run_id)[positions]
    assert np.abs(frames[1] - final).max() < 5e-3


def test_aligned_maps_keep_each_point_and_move_less_than_independent_fits():
    from core.explore.projection import project_umap

    aligned, independent = [], []
    for seed in (1, 3):
        _, frames = clustered_sequence(seed)
        maps = aligned_maps(frames, refine_epochs=60)
        assert maps.shape == (3, 300, 2) and maps.dtype == np.float32
        aligned.append(consecutive_displacement(maps))
        independent.append(consecutive_displacement(np.stack([project_umap(f) for f in frames])))
    aligned, independent = np.concatenate(aligned), np.concatenate(independent)
    assert aligned.mean() < 0.75 * independent.mean(), (aligned, independent)


def test_an_epoch_identical_up_to_a_rotation_gets_the_same_map():
    labels, frames = clustered_sequence(0, scales=(3.0,))
    x = frames[0]
    rng = np.random.default_rng(5)
    rotation, _ = np.linalg.qr(rng.normal(size=(x.shape[1], x.shape[1])))
    maps = aligned_maps([x @ rotation.astype(np.float32), x], refine_epochs=60)
    step = consecutive_displacement(maps)[0]
    shuffled = consecutive_displacement(np.stack([maps[0][rng.permutation(len(x))], maps[1]]))[0]
    assert step < 0.5 * shuffled, (step, shuffled)
    # identity: each point lands in its own cluster of the other frame (UMAP jitters inside clusters)
    a, b = maps[0] - maps[0].mean(0), maps[1] - maps[1].mean(0)
    nearest = np.argmin(((b[:, None, :] - a[None, :, :]) ** 2).sum(-1), axis=1)
    assert (labels[nearest] == labels).mean() > 0.95


def test_a_point_that_changes_class_is_followed_to_its_new_cluster():
    labels, frames = clustered_sequence(2, scales=(3.0, 3.0))
    movers = np.flatnonzero(labels == 0)[:4]
    later = labels.copy()
    later[movers] = 1
    # the movers carry class 1's embedding at epoch 2 (the same points, now among another class)
    donors = np.flatnonzero(labels == 1)[:4]
    frames[1] = frames[1].copy()
    frames[1][movers] = frames[1][donors] + 0.01
    maps = aligned_maps(frames, refine_epochs=60)
    for frame, truth in ((maps[0], labels), (maps[1], later)):
        others = np.setdiff1d(np.arange(len(labels)), movers)
        centres = np.stack([np.median(frame[others][truth[others] == c], axis=0) for c in range(5)])
        nearest = np.linalg.norm(frame[movers][:, None] - centres[None], axis=2).argmin(axis=1)
        assert (nearest == truth[movers]).all(), (nearest, truth[movers])


def test_similarity_align_undoes_a_similarity():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(50, 2))
    angle = 0.7
    turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = 3.0 * points @ turn * np.array([1, -1]) + [5, -2]  # turned, mirrored, scaled, shifted
    assert np.allclose(similarity_align(moved, points), points, atol=1e-9)


def test_the_evolution_job_runs_through_project_and_can_be_cancelled(two_epoch_run, monkeypatch, capsys):
    from core.runs import jobs, lifecycle
    from core.cli import main
    from core.explore.evolution import EVOLUTION_PARAMS, load_evolution
    from core.explore.projection import params_key
    from core.runs.worker import compute_evolution
    from storage import queries

    engine, run_id = two_epoch_run
    from core.runs import launch

    monkeypatch.setattr(launch, "start", lambda *args, **kwargs: launch.Launched(pid=0))  # the job process is this test, below
    jobs.start_projection(engine, run_id)
    with transaction(engine) as session:
        queued = {row.method: row.status for row in session.scalars(
            select(ProjectionRow).where(ProjectionRow.run_id == run_id))}
        evolution_id = queries.projection(session, run_id, "evolution", params_key(EVOLUTION_PARAMS)).id
    assert queued == {"statistics": "queued", "umap": "queued", "evolution": "queued"}

    # cancelled mid-way (as the app does): it stops at its next progress write and stores nothing
    lifecycle.cancel(engine, ProjectionRow, evolution_id)  # a queued row: cancelled before it starts
    assert main(["project", "--run", str(run_id), "--quiet", "--queued-only"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["status"] == "done" and "no longer queued" in result["evolution"]
    with transaction(engine) as session:
        assert session.get(ProjectionRow, evolution_id).status == "cancelled"

    def cancel_while_laying_out(phase, fraction, message):
        if phase == "frames":
            lifecycle.cancel(engine, ProjectionRow, evolution_id)

    assert compute_evolution(engine, run_id, report=cancel_while_laying_out).status == "cancelled"
    assert not artifacts.absolute(f"runs/{run_id}/{evolution.EVOLUTION_FILE}").exists()

    # queued again and run by `project` after the map
    jobs.start_projection(engine, run_id)
    assert main(["project", "--run", str(run_id), "--quiet", "--queued-only"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["evolution"] == "done", result
    with transaction(engine) as session:
        row = session.get(ProjectionRow, evolution_id)
        stored = [r.probe_precision_at_1 for r in session.scalars(
            select(EpochRow).where(EpochRow.run_id == run_id).order_by(EpochRow.epoch))]
    stored_map = load_evolution(row.path)
    positions, _ = load_probe(run_id)
    assert stored_map.maps.shape == (2, len(positions), 2) and np.isfinite(stored_map.maps).all()
    assert stored_map.epochs == [1, 2] and stored_map.precision_at_1 == stored
    assert stored_map.positions.tolist() == positions.tolist()
    assert jobs.start_projection(engine, run_id) is None  # all three done: nothing to start


def test_explore_shows_the_epochs_with_a_scrubber(two_epoch_run):
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from core.explore.evolution import load_evolution
    from core.explore.service import evolution_path
    from core.runs.worker import compute_evolution

    engine, run_id = two_epoch_run
    assert compute_evolution(engine, run_id).status == "done"  # at once when the test above made it
    st.cache_resource.clear()
    st.cache_data.clear()
    at = AppTest.from_file("../pages/explore.py", default_timeout=120)
    at.query_params["run"] = str(run_id)
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    view = next(r for r in at.radio if r.label == "Show")
    assert view.value == "map"
    view.set_value("epochs").run()
    assert not at.exception, [e.message for e in at.exception]
    [element] = at.get("component_instance")
    args = json.loads(element.proto.json_args)
    stored = load_evolution(evolution_path(engine, run_id))
    assert [f["epoch"] for f in args["frames"]] == [1, 2]
    assert [f["precision_at_1"] for f in args["frames"]] == stored.precision_at_1
    assert args["n"] == len(stored.positions) and args["points_url"] == args["frames"][-1]["url"]
    assert args["positions_url"].startswith("app/static/maps/")
    # each frame's file holds that epoch's map, scaled by one transform for all frames
    from core.explore.map_files import static_root

    files = [np.fromfile(static_root() / f["url"][len("app/static/"):], dtype=np.float32).reshape(-1, 2)
             for f in args["frames"]]
    for drawn, frame in zip(files, stored.maps):
        assert np.allclose(similarity_align(frame, drawn), drawn, atol=1e-4)
    scale = [np.ptp(drawn, axis=0).max() / np.ptp(frame, axis=0).max() for drawn, frame in zip(files, stored.maps)]
    assert scale[0] == pytest.approx(scale[1], rel=1e-4)
    assert "Across epochs" in [s.value for s in at.subheader]


@pytest.mark.parametrize("chunk", [1, 7, 64, 512])
def test_nearest_other_by_half_blocks_equals_the_full_square(monkeypatch, chunk):
    """The block-triangle search answers what an argmax over the whole similarity matrix
    (itself left out) answers, ties to the lowest index, whatever the block size. Small whole
    numbers make every product exact in any order of summation, so the ties are real ties;
    real-valued rows get a most similar other row to float rounding."""
    from core.explore import evolution

    monkeypatch.setattr(evolution, "NEAREST_CHUNK", chunk)
    rng = np.random.default_rng(3)
    whole = rng.integers(-2, 3, (200, 4)).astype(np.float32)  # few distinct rows: many exact ties
    similarity = whole @ whole.T
    np.fill_diagonal(similarity, -np.inf)
    got = evolution._nearest_other(whole)
    assert (got == similarity.argmax(axis=1)).all()  # numpy: the first maximum
    real = rng.normal(size=(300, 8)).astype(np.float32)
    real /= np.linalg.norm(real, axis=1, keepdims=True)
    similarity = real.astype(np.float64) @ real.T.astype(np.float64)
    np.fill_diagonal(similarity, -np.inf)
    got = evolution._nearest_other(real)
    assert (got != np.arange(len(real))).all()
    assert np.allclose(similarity[np.arange(len(real)), got], similarity.max(axis=1), atol=1e-6)
