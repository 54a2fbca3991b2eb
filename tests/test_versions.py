"""Dataset versions (core.data.versions): edits stored and read back on SQLite and PostgreSQL, runs
that keep their version's labels, deletes refused with a sentence, the edit command's bad inputs,
training on NAME@VERSION, the migration from revision 0003, the Data page's form."""
import json

import numpy as np
import pytest
from sqlalchemy import create_engine, func, select, text

from core.data.datasets import load_arrays, save_dataset
from core.data.versions import (delete_version, describe_version, edit_selection, list_versions, make_version,
                                parse_dataset_ref, parse_edit_text, resolve_dataset_version)
from storage import queries
from storage.db import make_engine, transaction
from storage.schema import Dataset, DatasetVersion, ImageEdit, Run

CLASSES = ["a", "b", "c", "d"]


def small_dataset(engine, name: str = "small", n: int = 40, seed: int = 0) -> dict:
    """A stored dataset of n 12×12 grey images of 4 classes (a class's own grey level and stripe),
    every fifth image a test image; its id, labels and split."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(CLASSES)
    pixels = rng.integers(0, 40, (n, 12, 12, 1), dtype=np.uint8)
    pixels[:, :, :, 0] += (60 + 50 * labels).astype(np.uint8)[:, None, None]
    pixels[np.arange(n), labels * 3, :, 0] = 255
    split = np.where(np.arange(n) % 5 == 4, "test", "train")
    dataset_id = save_dataset(engine, name, "upload", pixels, labels, [f"{name}/{i:03d}.png" for i in range(n)],
                              [f"{name}-{i}" for i in range(n)], classes=CLASSES, split=split)
    return {"id": dataset_id, "labels": labels, "split": split}


def stored_edits(engine) -> tuple[int, int, int]:
    """(datasets, versions, edits) stored."""
    with transaction(engine) as session:
        return tuple(session.scalar(select(func.count()).select_from(table))
                     for table in (Dataset, DatasetVersion, ImageEdit))


# ---------------------------------------------------------------- stored, read back, restarted


def test_relabel_exclude_and_tag_persist_across_restarts(any_home):
    engine = make_engine()
    made = small_dataset(engine)
    two = make_version(engine, "small", relabel={0: "b", 5: "d"}, exclude=[2, 3], tag={0: "blurry", 9: ["odd", "dark"]},
                       note="fix two labels")
    three = make_version(engine, "small@2", relabel={0: "c"}, exclude=[7])
    engine.dispose()

    engine = make_engine()  # a new process's engine: what was stored is all there is
    try:
        assert (two, three) == (2, 3)
        with transaction(engine) as session:
            first = queries.dataset_image_table(session, made["id"], 1)
            second = queries.dataset_image_table(session, made["id"], 2)
            third = queries.dataset_image_table(session, made["id"], 3)
        assert [image.label for image in first] == made["labels"].tolist()  # version 1: as imported
        assert not any(image.excluded or image.tags for image in first)
        expected = made["labels"].copy()
        expected[[0, 5]] = [1, 3]
        assert [image.label for image in second] == expected.tolist()
        assert [image.position for image in second if image.excluded] == [2, 3]
        assert (second[0].tags, second[9].tags) == (("blurry",), ("odd", "dark"))
        expected[0] = 2  # version 3 relabels again over version 2, and keeps its exclusions and tags
        assert [image.label for image in third] == expected.tolist()
        assert [image.position for image in third if image.excluded] == [2, 3, 7]
        assert third[0].tags == ("blurry",)

        arrays = load_arrays(engine, made["id"], 3)
        assert arrays.labels.tolist() == expected.tolist()
        assert np.flatnonzero(arrays.excluded).tolist() == [2, 3, 7]
        assert 3 not in arrays.test_index and 7 not in arrays.test_index and 2 not in arrays.train_index

        infos = list_versions(engine, "small")
        assert [(i.version, i.parent, i.n_images) for i in infos] == [(1, None, 40), (2, 1, 38), (3, 2, 37)]
        assert infos[1].note == "fix two labels" and infos[1].edits.counts == {"relabelled": 2, "excluded": 2, "tagged": 3}
        assert infos[1].edits.relabelled == ((0, "a", "b"), (5, "b", "d"))
        assert infos[2].edits.relabelled == ((0, "b", "c"),)  # "before" is its parent's label
        assert infos[2].ref == "small@3"
    finally:
        engine.dispose()


def test_an_edit_is_checked_whole_and_changes_that_change_nothing_are_dropped(lab_home):
    engine = make_engine()
    made = small_dataset(engine)
    before = stored_edits(engine)
    refused = {
        "both": dict(relabel={1: "a"}, exclude=[1]),
        "tag": dict(tag={1: "  "}),
        "nothing": dict(relabel={0: "a"}),  # image 0 is an "a" already
        "everything": dict(exclude=list(range(39))),
        "bool": dict(exclude=[True]),
        "long tag": dict(tag={1: "x" * 101}),
    }
    for name, edit in refused.items():
        with pytest.raises(ValueError) as said:
            make_version(engine, "small", **edit)
        assert "\n" not in str(said.value), name
    assert "is both relabelled and excluded" in str(pytest.raises(ValueError, make_version, engine, "small",
                                                                  relabel={1: "a"}, exclude=[1]).value)
    assert stored_edits(engine) == before

    # the no-ops of an edit are dropped, the rest stored
    assert make_version(engine, "small", relabel={0: "a", 1: "c"}, exclude=[4]) == 2
    assert describe_version(engine, "small").edits.counts == {"relabelled": 1, "excluded": 1, "tagged": 0}
    with pytest.raises(ValueError, match="image 4 is excluded in version 2"):
        make_version(engine, "small", relabel={4: "b"})
    with pytest.raises(ValueError, match="changes nothing in small@2"):
        make_version(engine, "small@2", exclude=[4], tag={})

    # a class left without training images is stored, and said
    a_class = [p for p in range(40) if made["labels"][p] == 3 and made["split"][p] == "train"]
    third = make_version(engine, "small@1", exclude=a_class)
    info = describe_version(engine, "small", third)
    assert info.parent == 1 and info.warnings == ("class 'd' has no training image left; its test images are still queries",)
    assert edit_selection(engine, "small", [5, 6, 5], tag="checked") == 4  # a selection, duplicates once
    assert describe_version(engine, "small@4").edits.tagged == ((5, "checked"), (6, "checked"))
    with pytest.raises(ValueError, match="the selection is empty"):
        edit_selection(engine, "small", [], exclude=True)
    engine.dispose()


def test_dataset_at_version_names_a_version_wherever_a_dataset_is_named(lab_home):
    engine = make_engine()
    made = small_dataset(engine)
    make_version(engine, "small", exclude=[1])
    assert resolve_dataset_version(engine, "small")[1] == 2  # a bare name: the newest
    assert resolve_dataset_version(engine, "small@1")[1] == 1
    assert resolve_dataset_version(engine, f"{made['id']}@2")[0].name == "small"  # ID@VERSION
    assert resolve_dataset_version(engine, made["id"], 1)[1] == 1
    assert parse_dataset_ref("a@b@3") == ("a@b", 3)
    for bad, sentence in (("small@0", "no valid version"), ("small@", "no valid version"), ("@2", "names no dataset"),
                          ("small@two", "no valid version")):
        with pytest.raises(ValueError, match=sentence):
            resolve_dataset_version(engine, bad)
    with pytest.raises(LookupError, match=r"^dataset 'small' has no version 3; its versions are 1, 2 "):
        resolve_dataset_version(engine, "small@3")
    # a built-in not imported yet is not imported to be told it has no version 2
    with pytest.raises(LookupError, match="it is built in and not imported yet, so it has only version 1"):
        resolve_dataset_version(engine, "digits@2")
    assert stored_edits(engine)[0] == 1
    with pytest.raises(ValueError, match="cannot hold '@'"):
        save_dataset(engine, "x@2", "upload", np.zeros((2, 4, 4, 1), np.uint8), None, ["a", "b"], ["h1", "h2"])
    assert parse_edit_text("1=a, 2 = b\n3=c", " 4,5  6", "1=x, y") == ({1: "a", 2: "b", 3: "c"}, [4, 5, 6],
                                                                        {1: ["x, y"]})
    engine.dispose()


# ---------------------------------------------------------------- a run keeps its version


def _run_on(engine, dataset_id: int, version: int, embeddings_file: str) -> int:
    """A completed embedding run on `version` that shares another run's embeddings file."""
    from storage.schema import utcnow

    with transaction(engine) as session:
        run = Run(dataset_id=dataset_id, dataset_version=version, kind="embed", config={"encoder": "stored"},
                  status="completed", finished_at=utcnow(), embeddings=embeddings_file)
        session.add(run)
        session.flush()
        return run.id


def test_a_run_of_version_1_keeps_version_1s_labels_after_version_2_relabels(lab_home, tmp_path):
    """Explore's labels and map colours, the statistics (computed after the edit), the search
    results and the Parquet export of a version-1 run are version 1's; a run of version 2 on the
    same embeddings reads version 2's, and its statistics leave the excluded images out."""
    import pyarrow.parquet as pq

    from core.explore import failures, map_files
    from core.explore.export import export_run
    from core.explore.service import explore_run, load_run_index, load_run_statistics, map_payload, statistics_path
    from core.runs.worker import compute_statistics
    from tests.helpers import clustered_run

    engine = make_engine()
    made = clustered_run(engine, 160, classes=4, seed=5, umap=False)
    run_id, dataset_id, old = made["run_id"], made["dataset_id"], made["labels"]
    name = "clustered-160-5"
    moved = np.flatnonzero(old == 0)[:15]  # relabel 15 images of class 0 as class 1, exclude 10 test images
    dropped = [p for p in np.flatnonzero(made["split"] == "test") if p not in moved][:10]
    make_version(engine, name, relabel={int(p): "class 1" for p in moved}, exclude=[int(p) for p in dropped])
    new = old.copy()
    new[moved] = 1
    with transaction(engine) as session:
        embeddings_file = session.get(Run, run_id).embeddings
    second = _run_on(engine, dataset_id, 2, embeddings_file)

    for run, labels, excluded in ((run_id, old, []), (second, new, dropped)):
        assert explore_run(engine, run).labels == labels.tolist()
        assert explore_run(engine, run).dataset_version == (1 if run == run_id else 2)
        payload = map_payload(engine, run, "pca", np.zeros((160, 2), np.float32), "label")
        with transaction(engine) as session:
            key = session.get(Dataset, dataset_id).cache_key
        assert payload["labels_url"] == map_files.write_labels(dataset_id, key, labels.tolist())  # named by its content
        assert load_run_index(engine, run).labels == labels.tolist()

        assert compute_statistics(engine, run).status == "done"  # computed after the edit
        stats = load_run_statistics(statistics_path(engine, run))
        assert stats.labels.tolist() == labels.tolist()
        evaluated = (made["split"] == "test") & ~np.isin(np.arange(160), excluded)
        assert stats.evaluated.tolist() == evaluated.tolist()
        brute = failures.compute_statistics(made["embeddings"], labels, evaluated)  # the metrics, per class
        assert stats.per_class == brute.per_class

        table = pq.read_table(export_run(engine, run, "parquet", tmp_path / f"run-{run}.parquet"))
        assert table.column("label").to_pylist() == labels.tolist()
        assert json.loads(table.schema.metadata[b"embedding_lab"])["dataset_version"] == (1 if run == run_id else 2)
        if excluded:
            assert np.flatnonzero(table.column("excluded").to_numpy()).tolist() == [int(p) for p in excluded]
        else:
            assert "excluded" not in table.column_names
    engine.dispose()


def test_deleting_a_version_that_runs_use_is_refused_with_a_sentence(lab_home):
    engine = make_engine()
    made = small_dataset(engine)
    make_version(engine, "small", exclude=[1])  # 2
    make_version(engine, "small", exclude=[2])  # 3, from 2
    make_version(engine, "small@1", tag={3: "x"})  # 4, from 1
    used = _run_on(engine, made["id"], 4, "none.npy")
    before = stored_edits(engine)
    for ref, sentence in (
            ("small@4", f"small@4 cannot be deleted: run {used} uses it (its map, metrics and exports read its "
                        "labels); delete those runs first"),
            ("small@2", "small@2 cannot be deleted: version 3 edits it; delete those first"),
            ("small@1", "small@1 is the imported images; a dataset's version 1 cannot be deleted"),
            ("small", "say which version of 'small' to delete: NAME@VERSION")):
        with pytest.raises(ValueError) as refused:
            delete_version(engine, ref)
        assert str(refused.value) == sentence
    with pytest.raises(LookupError, match="has no version 9"):
        delete_version(engine, "small@9")
    assert stored_edits(engine) == before

    delete_version(engine, "small@3")  # a leaf no run uses
    delete_version(engine, "small", 2)
    assert [info.version for info in list_versions(engine, "small")] == [1, 4]
    assert stored_edits(engine) == (1, 2, 1)  # their edits went with them
    from core.runs.jobs import delete_run

    delete_run(engine, used)
    delete_version(engine, "small@4")  # once its run is gone
    assert [info.version for info in list_versions(engine, "small")] == [1]
    engine.dispose()


# ---------------------------------------------------------------- the command line


def test_the_edit_command_prints_the_version_and_refuses_bad_inputs_in_one_line(any_home, capsys):
    from core.cli import main

    engine = make_engine()
    small_dataset(engine)
    assert main(["edit", "--dataset", "small", "--relabel", "0=b", "1=c", "--exclude", "2", "--tag", "0=blurry",
                 "--note", "first fixes"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["version"], out["ref"], out["relabelled"], out["excluded"], out["tagged"]) == (2, "small@2", 2, 1, 1)
    before = stored_edits(engine)
    bad = {
        "unknown image id": (["--dataset", "small", "--relabel", "40=a"],
                             "error: image 40 does not exist in dataset 'small': its image ids are 0 to 39"),
        "unknown label": (["--dataset", "small", "--relabel", "3=z"],
                          "error: dataset 'small' has no label 'z' (image 3); its labels are 'a', 'b', 'c', 'd'"),
        "unknown dataset": (["--dataset", "nothing", "--exclude", "1"],
                            "error: no dataset named 'nothing'; `python -m core datasets` lists them"),
        "unknown version": (["--dataset", "small@7", "--exclude", "1"],
                            "error: dataset 'small' has no version 7; its versions are 1, 2 "
                            "(`python -m core versions --dataset small` lists them)"),
        "malformed id": (["--dataset", "small", "--exclude", "x1"],
                         "error: exclude 'x1': image ids are whole numbers from 0 (the position the pages and "
                         "exports show), got 'x1'"),
        "no edit": (["--dataset", "small"], "error: an edit needs at least one image to relabel, exclude or tag"),
        "a built-in's version": (["--dataset", "digits@2", "--exclude", "1"],
                                 "error: dataset 'digits' has no version 2: it is built in and not imported yet, "
                                 "so it has only version 1"),
    }
    for what, (arguments, line) in bad.items():
        assert main(["edit", *arguments]) == 2, what
        said = capsys.readouterr()
        assert said.err.splitlines() == [line], what
        assert said.out == ""
    assert stored_edits(engine) == before  # nothing stored, not even the built-in

    assert main(["versions", "--dataset", "small", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["version"] for line in lines] == [1, 2]
    assert lines[1]["edits"]["relabel"] == [{"image": 0, "from": "a", "to": "b"}, {"image": 1, "from": "b", "to": "c"}]
    assert main(["versions", "--dataset", "small"]) == 0
    assert "from 1: 2 relabelled, 1 excluded, 1 tagged" in capsys.readouterr().out
    assert main(["delete-version", "--dataset", "small@1"]) == 2
    assert capsys.readouterr().err.strip() == "error: small@1 is the imported images; a dataset's version 1 cannot be deleted"
    engine.dispose()


# ---------------------------------------------------------------- training on a version


def test_training_on_name_at_2_leaves_out_its_excluded_images_and_learns_its_labels(lab_home, monkeypatch,
                                                                                    one_torch_thread):
    from core.explore.metrics import retrieval_metrics
    from core.explore.service import run_embeddings
    from core.runs import worker
    from core.runs.jobs import create_training_run
    from core.runs.retrain import create_retraining_run
    from core.training import loop
    from core.training.config import RunConfig

    engine = make_engine()
    made = small_dataset(engine, n=64)
    excluded = [0, 3, 5, 7, 10]  # train and test images
    make_version(engine, "small", relabel={1: "c", 2: "a", 15: "a"}, exclude=excluded)
    labels = made["labels"].copy()
    labels[[1, 2, 15]] = [2, 0, 0]

    seen = []

    def recording_fit(cfg, data, *args, **kwargs):
        seen.append(loop.prepare(cfg, data, loop.resolve_device("cpu")))
        seen.append(data)
        return real_fit(cfg, data, *args, **kwargs)

    real_fit = worker.fit
    monkeypatch.setattr(worker, "fit", recording_fit)
    run_id = create_training_run(engine, RunConfig(dataset="small@2", epochs=1, batch_size=16, device="cpu",
                                                   embedding_dim=8))
    summary = worker.execute_run(engine, run_id, project=False)
    assert summary["status"] == "completed" and summary["dataset_version"] == 2
    prepared, data = seen
    assert data.labels.tolist() == labels.tolist()
    trained = np.flatnonzero((made["split"] == "train") & ~np.isin(np.arange(64), excluded))
    assert prepared.train_index.tolist() == trained.tolist()  # what its batches are drawn from
    assert prepared.labels.tolist() == labels[trained].tolist()

    tested = np.flatnonzero((made["split"] == "test") & ~np.isin(np.arange(64), excluded))
    with transaction(engine) as session:
        run = session.get(Run, run_id)
        assert (run.dataset_version, run.config["dataset"]) == (2, "small")
        metrics = dict(run.metrics)
    assert metrics["n_queries"] == len(tested)  # the excluded test images are no queries
    embeddings = run_embeddings(engine, run_id)
    assert len(embeddings) == 64  # every image embedded: the run's map lines up with every other run's
    assert metrics["precision_at_1"] == retrieval_metrics(embeddings[tested], labels[tested])["precision_at_1"]

    # "train again" on version 1: the same settings, the imported images
    again = create_retraining_run(engine, run_id, 1)
    with transaction(engine) as session:
        first, second = session.get(Run, run_id), session.get(Run, again)
        assert (second.dataset_version, second.status, second.kind) == (1, "queued", "train")
        assert second.config == first.config
    with pytest.raises(LookupError, match="has no version 5"):
        create_retraining_run(engine, run_id, 5)
    engine.dispose()


def test_retrain_on_version_starts_the_worker(lab_home, monkeypatch):
    from core.runs import retrain

    engine = make_engine()
    made = small_dataset(engine)
    source = _run_on(engine, made["id"], 1, "none.npy")
    with transaction(engine) as session:  # a training run's stored config
        from core.training.config import RunConfig

        session.get(Run, source).kind = "train"
        session.get(Run, source).config = RunConfig(dataset="small", epochs=2, batch_size=16).to_dict()
    make_version(engine, "small", exclude=[4])
    started = []
    monkeypatch.setattr(retrain, "start_worker", lambda engine, run_id: started.append(run_id))
    new_run = retrain.retrain_on_version(engine, source)  # the newest version
    assert started == [new_run]
    with transaction(engine) as session:
        assert session.get(Run, new_run).dataset_version == 2
        assert session.get(Run, new_run).config["epochs"] == 2
    engine.dispose()


# ---------------------------------------------------------------- the migration


def test_a_database_at_revision_0003_gets_version_1_of_each_dataset_and_its_runs(any_home):
    from alembic import command
    from alembic.config import Config

    from storage.db import MIGRATIONS, head_revision
    from storage.settings import database_url

    url = database_url()
    old = create_engine(url)
    with old.begin() as connection:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = connection
        command.upgrade(config, "0003")
        connection.execute(text(
            "INSERT INTO datasets (id, name, source, n_images, image_size, channels, classes, folder, created_at) "
            "VALUES (4, 'kept', 'upload', 3, 8, 1, '[\"a\", \"b\"]', 'datasets/4', '2026-11-01 10:00:00')"))
        for position in range(3):
            connection.execute(text(
                "INSERT INTO images (dataset_id, position, name, label, split, sha256) "
                f"VALUES (4, {position}, 'i{position}.png', {position % 2}, 'train', 'h{position}')"))
        connection.execute(text(
            "INSERT INTO runs (id, dataset_id, kind, config, status, cancel_requested, created_at, epoch, step, "
            "total_steps) VALUES (9, 4, 'train', '{}', 'completed', false, '2026-11-01 10:01:00', 1, 1, 1)"))
    old.dispose()

    engine = make_engine()
    try:
        with engine.connect() as connection:
            from alembic.runtime.migration import MigrationContext

            assert MigrationContext.configure(connection).get_current_revision() == head_revision()
        with transaction(engine) as session:
            assert session.get(Run, 9).dataset_version == 1
            rows = queries.version_rows(session, 4)
            assert [(row.version, row.parent, row.note) for row in rows] == [(1, None, "imported")]
            assert [image.label for image in queries.dataset_image_table(session, 4, 1)] == [0, 1, 0]
        assert [info.runs for info in list_versions(engine, "kept")] == [(9,)]
        assert make_version(engine, "kept", relabel={2: "b"}) == 2  # and it takes edits
        with transaction(engine) as session:
            assert [image.label for image in queries.run_image_table(session, session.get(Run, 9))] == [0, 1, 0]
    finally:
        engine.dispose()


# ---------------------------------------------------------------- the Data page


def test_the_data_page_lists_versions_and_makes_one_from_its_form(lab_home):
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    st.cache_resource.clear()
    st.cache_data.clear()
    engine = make_engine()
    small_dataset(engine)
    make_version(engine, "small", relabel={0: "b"}, note="a fix")
    at = AppTest.from_file("../pages/data.py", default_timeout=120)
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    table = at.dataframe[0].value
    assert table["version"].tolist() == [1, 2] and table["changed"].tolist()[1] == "1 relabelled"

    form_areas = {area.label: area for area in at.text_area}
    form_inputs = {field.label: field for field in at.text_input}
    form_inputs["Exclude"].input("3, 99")  # 99 is no image of it
    at.button[[b.label for b in at.button].index("Make the version")].click().run()
    assert any("image 99 does not exist in dataset 'small'" in e.value for e in at.error)
    assert [info.version for info in list_versions(engine, "small")] == [1, 2]  # nothing stored

    form_areas = {area.label: area for area in at.text_area}
    form_inputs = {field.label: field for field in at.text_input}
    form_inputs["Exclude"].input("3")
    form_areas["Relabel"].input("5=c")
    at.button[[b.label for b in at.button].index("Make the version")].click().run()
    assert not at.exception, [e.message for e in at.exception]
    assert [info.version for info in list_versions(engine, "small")] == [1, 2, 3]
    assert describe_version(engine, "small@3").edits.counts == {"relabelled": 1, "excluded": 1, "tagged": 0}
    assert any("excluded in this version" in m.value for m in at.markdown)  # the gallery shows the newest
    engine.dispose()
