"""Duplicates and leakage (core.data.duplicates and its near_pairs, core.explore.duplicates):
planted copies are found, nothing beyond the threshold is reported, leakage and label conflicts
are counted as defined, and the command line and the Data page say so."""
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.data import duplicates
from core.data.duplicates import PIXEL_THRESHOLD, descriptor_sets, find_in_embeddings, find_in_pixels, pixel_distance
from core.data.duplicates.near_pairs import TooManyPairs, pairs_within

ROOT = Path(__file__).resolve().parent.parent
SIDE = 32


def smooth_images(n: int, seed: int) -> np.ndarray:
    """(n, 32, 32, 1) uint8: a bicubic blow-up of random 6×6 grey levels, a sharp-edged square and
    noise; distinct images lie 0.7 or more apart by the pixel measure."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, SIDE, SIDE, 1), np.uint8)
    for k in range(n):
        coarse = Image.fromarray((rng.random((6, 6)) * 255).astype(np.uint8))
        image = np.asarray(coarse.resize((SIDE, SIDE), Image.BICUBIC), dtype=np.int16)
        y, x = rng.integers(2, SIDE - 10, 2)
        image[y:y + 8, x:x + 8] = rng.integers(0, 256)
        out[k, ..., 0] = np.clip(image + rng.integers(-10, 11, (SIDE, SIDE)), 0, 255)
    return out


def jpeg(image: np.ndarray, quality: int = 75) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0]).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())))[..., None]


def shifted(image: np.ndarray, dy: int, dx: int, fill: int) -> np.ndarray:
    """The image moved by (dy, dx) pixels, the uncovered edge filled with `fill`."""
    out = np.full_like(image, fill)
    height, width = image.shape[:2]
    out[max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = \
        image[max(-dy, 0):height + min(-dy, 0), max(-dx, 0):width + min(-dx, 0)]
    return out


@pytest.fixture(scope="module")
def planted():
    """600 distinct images with planted copies appended: exact, shifted by a pixel (every
    direction, black, white or edge fill), re-encoded as JPEG at quality 75, shifted and re-encoded;
    and look-alikes: blends with another image whose distances straddle the threshold."""
    base = smooth_images(600, seed=1)
    images, pairs, kinds = list(base), [], []

    def plant(source: int, image: np.ndarray, kind: str) -> None:
        images.append(image)
        pairs.append((source, len(images) - 1))
        kinds.append(kind)

    for source in (0, 1, 2):
        plant(source, base[source].copy(), "exact")
    plant(2, base[2].copy(), "exact")  # a third copy of image 2
    moves = [(0, 1), (1, 0), (0, -1), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1)]
    for source, (dy, dx), fill in zip(range(10, 18), moves, [0, 255, 0, 128, 0, 255, 0, 0]):
        plant(source, shifted(base[source], dy, dx, fill), "shift")
    for source in range(20, 30):
        plant(source, jpeg(base[source]), "jpeg")
    for source in range(30, 35):
        plant(source, jpeg(shifted(base[source], 0, 1, 0)), "shift+jpeg")
    rng = np.random.default_rng(2)
    blends = []
    for source, share in zip(range(40, 60), np.linspace(0.01, 0.08, 20)):
        other = base[rng.integers(100, 600)].astype(np.float32)
        images.append(np.clip((1 - share) * base[source] + share * other, 0, 255).astype(np.uint8))
        blends.append((source, len(images) - 1))
    return np.stack(images), pairs, kinds, blends


def brute_force(images: np.ndarray) -> np.ndarray:
    """(N, N) pixel measure between every two images, from the descriptors directly."""
    sets = list(descriptor_sets(images))
    plain = sets[0].astype(np.float64)
    distance = np.full((len(images), len(images)), np.inf)
    for moved in sets:
        d = np.sqrt(((moved.astype(np.float64)[:, None, :] - plain[None, :, :]) ** 2).sum(axis=2))
        distance = np.minimum(distance, np.minimum(d, d.T))
    return distance


def test_every_planted_copy_is_found_and_no_pair_beyond_the_threshold(planted):
    images, pairs, kinds, blends = planted
    finding = find_in_pixels(images)
    exact = [set(group.tolist()) for group in finding.exact]
    near = [set(group.tolist()) for group in finding.near]
    for (a, b), kind in zip(pairs, kinds):
        if kind == "exact":
            assert any({a, b} <= group for group in exact), (a, b)
        else:
            assert any({a, b} <= group for group in near), (kind, a, b, pixel_distance(images[a], images[b][None]))
    assert {frozenset(g) for g in exact} == {frozenset({0, 600}), frozenset({1, 601}), frozenset({2, 602, 603})}

    # the reported pairs are exactly the brute-force pairs within the threshold (between distinct
    # pictures: one member of each exact group stands for it)
    truth = brute_force(images)
    owner = duplicates.representatives(len(images), finding.exact)
    reps = np.flatnonzero(owner == np.arange(len(images)))
    within = truth[np.ix_(reps, reps)] <= PIXEL_THRESHOLD
    a, b = np.nonzero(np.triu(within, 1))
    assert set(zip(reps[a].tolist(), reps[b].tolist())) == set(zip(finding.pairs.a.tolist(), finding.pairs.b.tolist()))
    assert np.allclose(finding.pairs.distance, truth[finding.pairs.a, finding.pairs.b], atol=1e-5)
    assert (finding.pairs.distance <= PIXEL_THRESHOLD).all()
    # the look-alikes straddle the threshold, so the line was drawn where it says
    blended = np.array([truth[s, t] for s, t in blends])
    assert (blended < PIXEL_THRESHOLD).any() and (blended > PIXEL_THRESHOLD).any()
    for (source, copy), distance in zip(blends, blended):
        together = any({source, copy} <= group for group in near)
        assert together == (distance <= PIXEL_THRESHOLD), (source, copy, distance)
    # each member's distance to its group's first, and a link within the threshold
    for group, to_first, link in zip(finding.near, finding.distance, finding.link):
        assert np.allclose(to_first, truth[group[0], group], atol=1e-5)
        assert (link <= PIXEL_THRESHOLD + 1e-6).all()


def test_near_pairs_equal_brute_force_with_query_sets_and_nan_rows():
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(30, 24))
    vectors = (centres[rng.integers(0, 30, 3000)] + 0.06 * rng.normal(size=(3000, 24))).astype(np.float32)
    vectors[7] = np.nan
    moved = vectors + 0.05 * rng.normal(size=vectors.shape).astype(np.float32)
    found = pairs_within(vectors, 0.3, iter([vectors, moved]))
    plain = np.linalg.norm(vectors[:, None] - vectors[None], axis=2)
    across = np.linalg.norm(moved[:, None] - vectors[None], axis=2)
    truth = np.fmin(plain, np.fmin(across, across.T))
    np.fill_diagonal(truth, np.inf)
    a, b = np.nonzero(np.triu(truth <= 0.3, 1))
    assert len(a) > 1000  # many pairs, in many of the 54 clusters
    assert set(zip(a.tolist(), b.tolist())) == set(zip(found.a.tolist(), found.b.tolist()))
    assert np.allclose(found.distance, truth[found.a, found.b], atol=1e-5)
    assert 7 not in set(found.a.tolist()) | set(found.b.tolist())
    with pytest.raises(TooManyPairs, match="about .* pairs lie within 3 of each other.*choose a smaller threshold"):
        pairs_within(vectors, 3.0, max_pairs=10_000)  # refused from a sample, before the search
    with pytest.raises(TooManyPairs, match=f"more than {len(a) // 2:,} pairs lie within 0.3"):
        pairs_within(vectors, 0.3, max_pairs=len(a) // 2)  # not 4 times too many: found out by searching
    with pytest.raises(ValueError, match="positive"):
        pairs_within(vectors, 0.0)


def tiny_split():
    """Hand-made: image 0 (train) with an exact copy 1 (test); 2 (train) with a copy 3 shifted by a
    pixel (test); 4 and 5 (both test) copies of each other; 6 (train) with a JPEG copy 7 (train, other
    label); 8 (train) with an exact copy 9 (test) and a JPEG copy 10 (test); 11 alone (test)."""
    base = smooth_images(8, seed=3)
    images = np.stack([base[0], base[0], base[1], shifted(base[1], 1, 0, 0), base[2], jpeg(base[2]),
                       base[3], jpeg(base[3]), base[4], base[4], jpeg(base[4]), base[5]])
    split = ["train", "test", "train", "test", "test", "test", "train", "train", "train", "test", "test", "test"]
    labels = [0, 0, 1, 1, 2, 2, 0, 1, 2, 2, 2, 0]
    return images, split, labels


def test_leakage_and_label_disagreement_on_a_hand_made_split():
    images, split, labels = tiny_split()
    labels[9] = None  # unlabeled: never a disagreement
    finding = find_in_pixels(images)
    found = duplicates.report(finding, 1, "tiny", [f"img{i}.png" for i in range(12)], labels, split, ["a", "b", "c"])
    assert [g.positions for g in found.exact] == [[0, 1], [8, 9]]
    assert [g.positions for g in found.near] == [[2, 3], [4, 5], [6, 7], [8, 9, 10]]
    assert found.leaked_test == (1, 3, 9, 10)  # 5 has only a test copy; 11 has none
    assert [g.positions for g in found.label_disagreements] == [[6, 7]]  # 9 is unlabeled: no disagreement
    assert [g.spans_splits for g in found.near] == [True, False, False, True]
    summary = found.summary()
    assert (summary["exact_groups"], summary["near_groups"], summary["test_images_with_training_copy"],
            summary["label_disagreeing_groups"]) == (2, 4, 4, 1)
    member = found.near[2].members[1]
    assert (member.position, member.label, member.split, member.name) == (7, "b", "train", "img7.png")
    assert duplicates.positions_to_exclude(found, "copies") == [1, 3, 5, 7, 9, 10]
    assert duplicates.positions_to_exclude(found, "leaks") == [1, 3, 9, 10]
    with pytest.raises(ValueError, match="unknown exclusion"):
        duplicates.positions_to_exclude(found, "everything")


def test_a_versions_report_drops_its_excluded_images_and_reads_its_labels():
    images, split, labels = tiny_split()
    finding = find_in_pixels(images)
    excluded = np.zeros(12, dtype=bool)
    excluded[[3, 8]] = True  # a test copy of 2, and the training copy that 9 and 10 leak from
    labels[7] = 0  # relabelled: group (6, 7) agrees now
    found = duplicates.report(finding, 1, "tiny", [f"img{i}.png" for i in range(12)], labels, split,
                              ["a", "b", "c"], excluded=excluded, version=2)
    assert [g.positions for g in found.exact] == [[0, 1]]  # (8, 9) lost 8: one member is no group
    assert [g.positions for g in found.near] == [[4, 5], [6, 7], [9, 10]]
    assert found.leaked_test == (1,)  # 3 is excluded; 9 and 10 had a training copy only in 8
    assert found.label_disagreements == ()
    assert (found.version, found.excluded, found.summary()["excluded_by_version"]) == (2, 2, 2)
    assert duplicates.positions_to_exclude(found, "copies") == [1, 5, 7, 10]


def test_exclude_duplicates_makes_a_version_from_the_command_line_and_the_service(stored, lab_home):
    engine, dataset_id, _ = stored
    from core.data.versions import describe_version, list_versions
    from core.explore import duplicates as service

    status, _, err = cli("duplicates", "--dataset", "tiny", "--exclude", "leaks")
    assert status == 0 and "made version 2 of 'tiny' (tiny@2): 4 images excluded" in err
    info = describe_version(engine, "tiny@2")
    assert sorted(info.edits.excluded) == [1, 3, 9, 10] and "test images with a copy in the training" in info.note

    again = service.find_duplicates(engine, "tiny")  # the newest version: its leaks are gone
    assert again.version == 2 and again.leaked_test == () and again.excluded == 4
    with pytest.raises(ValueError, match="version 2 of 'tiny' has no test images with a training copy"):
        service.exclude_duplicates(engine, again, "leaks")
    number, count = service.exclude_duplicates(engine, again, "copies")
    assert (number, count) == (3, len(duplicates.positions_to_exclude(again, "copies"))) and count > 0
    assert service.find_duplicates(engine, "tiny").summary()["near_groups"] == 0
    assert service.find_duplicates(engine, "tiny@1").summary()["near_groups"] == 4  # version 1 as it was
    assert [v.version for v in list_versions(engine, "tiny")] == [1, 2, 3]

    status, _, err = cli("duplicates", "--dataset", "tiny", "--exclude", "copies")
    assert status == 2 and err.strip().startswith("error: ") and "no copies to exclude" in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1
    assert [v.version for v in list_versions(engine, "tiny")] == [1, 2, 3]  # nothing stored by the refusal


def test_near_copies_by_embeddings():
    images = smooth_images(6, seed=4)
    images[5] = images[0]  # an exact copy by its pixels, whatever its embedding
    embeddings = np.array([[1, 0, 0], [0.999, 0.04, 0], [0, 1, 0], [0, 0.7, 0.7], [np.nan, 0, 0], [0, 0, 1]],
                          dtype=np.float32) * 3  # lengths do not matter: the embeddings are normalised
    finding = find_in_embeddings(images, embeddings, threshold=0.05)
    assert [g.tolist() for g in finding.exact] == [[0, 5]]
    assert [g.tolist() for g in finding.near] == [[0, 1, 5]]
    second = np.array([0.999, 0.04, 0])
    assert finding.distance[0][1] == pytest.approx(np.linalg.norm(second / np.linalg.norm(second) - [1, 0, 0]), abs=1e-6)
    with pytest.raises(ValueError, match="5 embeddings but its dataset has 6"):
        find_in_embeddings(images, embeddings[:5])


@pytest.mark.parametrize("bad", ["abc", "0", "-0.1", "nan", "inf", "2.5", "", True])
def test_bad_thresholds_are_sentences(bad):
    with pytest.raises(ValueError, match="the threshold must be a positive number"):
        duplicates.check_threshold(bad)


# ---------------------------------------------------------------- stored datasets, the command line, the page


@pytest.fixture
def stored(lab_home):
    """The hand-made split stored as dataset "tiny", and a run of it with embeddings (no training)."""
    from core.data.datasets import save_dataset
    from storage import artifacts
    from storage.db import make_engine, transaction
    from storage.run_files import RunFiles
    from storage.schema import Run, utcnow

    engine = make_engine()
    images, split, labels = tiny_split()
    dataset_id = save_dataset(engine, "tiny", "upload", images, ["abc"[label] for label in labels],
                              [f"img{i}.png" for i in range(12)], [f"h{i}" for i in range(12)], split=np.array(split))
    embeddings = np.eye(12, dtype=np.float32)
    embeddings[11] = embeddings[4] + 0.01
    with transaction(engine) as session:
        run = Run(dataset_id=dataset_id, kind="embed", config={}, status="completed", finished_at=utcnow())
        session.add(run)
        session.flush()
        run_id = run.id
        run.embeddings = RunFiles(run_id).relative("embeddings.npy")
    RunFiles(run_id).make()
    np.save(artifacts.absolute(RunFiles(run_id).relative("embeddings.npy")), embeddings)
    yield engine, dataset_id, run_id
    engine.dispose()


def cli(*args) -> tuple[int, str, str]:
    """`python -m core ARGS` in this process: (exit status, stdout, stderr)."""
    from contextlib import redirect_stderr, redirect_stdout

    from core.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = main(list(args))
    return status, out.getvalue(), err.getvalue()


def test_command_line_json_and_text(stored, lab_home):
    _, dataset_id, run_id = stored
    env = dict(os.environ, EMBEDDING_LAB_HOME=str(lab_home))
    env.pop("EMBEDDING_LAB_DB", None)
    result = subprocess.run([sys.executable, "-m", "core", "duplicates", "--dataset", "tiny", "--json"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert (found["exact_groups"], found["near_groups"], found["test_images_with_training_copy"],
            found["label_disagreeing_groups"], found["measure"], found["threshold"]) == (2, 4, 4, 1, "pixels", 0.05)
    assert found["leaked_test"] == [1, 3, 9, 10]
    group = found["near"][0]
    assert [(m["position"], m["label"], m["split"]) for m in group["members"]] == [(2, "b", "train"), (3, "b", "test")]
    assert group["members"][0]["distance"] == 0 and group["members"][1]["distance"] <= 0.05 and group["spans_splits"]

    status, text, _ = cli("duplicates", "--dataset", str(dataset_id))
    assert status == 0
    assert "tiny@1: 12 images · 2 exact groups (4 images) · 4 near groups (9 images)" in text
    assert "4 test images with a training copy · 1 groups whose labels disagree" in text
    assert "near copies (within 0.05 by pixel descriptors) · group 3 of 4 · labels disagree" in text
    assert "        7  b              train  " in text and "img7.png" in text

    status, out, _ = cli("duplicates", "--run", str(run_id), "--threshold", "0.05", "--json")
    by_run = json.loads(out)
    assert status == 0 and by_run["measure"] == "embeddings" and by_run["run_id"] == run_id
    assert [[m["position"] for m in g["members"]] for g in by_run["near"]] == [[4, 11]]
    assert [[m["position"] for m in g["members"]] for g in by_run["exact"]] == [[0, 1], [8, 9]]


def test_command_line_bad_input_is_one_line(stored, lab_home):
    engine, dataset_id, run_id = stored
    from core.data.datasets import save_dataset

    other = save_dataset(engine, "other", "upload", smooth_images(3, seed=9), None, ["a", "b", "c"], ["x", "y", "z"])
    cases = [
        (("--dataset", "nope"), "no dataset named 'nope'"),
        (("--dataset", "99"), "no dataset with id 99"),
        (("--dataset", "tiny", "--threshold", "abc"), "the threshold must be a positive number at most 2"),
        (("--dataset", "tiny", "--threshold", "0"), "got '0'"),
        (("--dataset", "tiny", "--threshold", "abc"), "got 'abc'"),
        (("--dataset", "tiny", "--threshold", "-1"), "got '-1'"),
        (("--dataset", "tiny", "--threshold", "nan"), "got 'nan'"),
        (("--run", "42"), "run 42 does not exist"),
        (("--run", "x"), "a run id is a whole number, got 'x'"),
        (("--dataset", "other", "--run", str(run_id)), f"run {run_id} embedded dataset {dataset_id}, not 'other'"),
        ((), "name a dataset (--dataset NAME) or a run (--run ID)"),
    ]
    for args, fragment in cases:
        status, out, err = cli("duplicates", *args)
        lines = [line for line in err.splitlines() if line.strip()]
        assert status == 2 and not out and len(lines) == 1 and lines[0].startswith("error: "), (args, err)
        assert fragment in lines[0], (fragment, lines[0])
    from storage import artifacts

    # nothing was stored by the refusals
    assert not (artifacts.absolute(artifacts.dataset_folder(dataset_id)) / "duplicates").exists()
    assert not (artifacts.absolute(artifacts.dataset_folder(other)) / "duplicates").exists()


def test_findings_are_stored_and_read_back_only_for_their_source(stored, monkeypatch):
    engine, dataset_id, run_id = stored
    from core.explore import duplicates as service

    first = service.find_duplicates(engine, "tiny")
    chosen = service.target(engine, "tiny")
    assert chosen.path(0.05).exists()

    def never(*_):
        raise AssertionError("searched again")

    monkeypatch.setattr(service, "compute", never)
    again = service.find_duplicates(engine, "tiny")
    assert again.to_dict() == first.to_dict()
    assert service.stored_report(engine, chosen, 0.06) is None  # another threshold is another finding
    stale = service.Target(chosen.dataset_id, chosen.dataset, "another dataset of this id", None, None, chosen.pixels)
    assert service.load_finding(stale, 0.05) is None


def test_a_search_job_stores_its_finding_or_says_why_it_failed(stored):
    engine, dataset_id, _ = stored
    from core.explore import duplicates as service

    chosen = service.target(engine, dataset_id)
    service.start_job(chosen, 0.05)
    deadline = time.monotonic() + 120
    while service.job_state(chosen, 0.05) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert service.job_state(chosen, 0.05) is None
    assert service.stored_report(engine, chosen, 0.05).summary()["near_groups"] == 4

    chosen.pixels.unlink()  # an imported dataset whose data folder was wiped
    service.start_job(chosen, 0.07)
    while (state := service.job_state(chosen, 0.07)) is not None and state.status == "running":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert state.status == "failed" and "the images of dataset 'tiny' are gone" in state.reason


def test_data_page_finds_and_shows_duplicates(stored):
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    st.cache_resource.clear()
    at = AppTest.from_file("../pages/data.py", default_timeout=120)
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    next(b for b in at.button if b.label == "Find duplicates").click().run()
    assert not at.exception, [e.message for e in at.exception]
    figures = {m.label: m.value for m in at.metric}
    assert figures == {"Exact groups": "2", "Near groups": "4", "Test images with a training copy": "4",
                       "Groups whose labels disagree": "1"}
    shown = " ".join(m.value for m in at.markdown)
    assert "**Near copies** · 3 images · **train and test**" in shown and "· **labels disagree**" in shown
    at.radio(key="dup-filter").set_value("labels").run()
    assert [m.value for m in at.markdown if m.value.startswith("**Near") or m.value.startswith("**Exact")] == \
        ["**Near copies** · 2 images · **labels disagree**"]

    # "Exclude duplicates": a version without the copies; the section then shows that version
    engine, dataset_id, _ = stored
    from core.data.versions import describe_version

    button = next(b for b in at.button if b.label.startswith("Exclude the copies, keep one of each"))
    assert button.label.endswith("(6)")
    button.click().run()
    assert not at.exception, [e.message for e in at.exception]
    assert sorted(describe_version(engine, dataset_id, 2).edits.excluded) == [1, 3, 5, 7, 9, 10]
    assert any("Made version 2 of tiny (tiny@2): 6 images excluded" in s.value for s in at.success)
    figures = {m.label: m.value for m in at.metric}
    assert figures["Near groups"] == "0" and figures["Test images with a training copy"] == "0"
    assert any("without the 6 images it excludes" in c.value for c in at.caption)
    st.cache_resource.clear()
