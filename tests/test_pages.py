"""Every page once through Streamlit's AppTest, on a store with one finished run."""
import io
import time

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from core.training.config import RunConfig
from core.runs.jobs import cancel_run, create_training_run
from core.runs.worker import execute_run
from storage import queries
from storage.db import transaction
from storage.schema import Run
from tests.helpers import cancelled_in_epoch_two, completed_digits_run, digits_store

TIMEOUT = 120


pytestmark = pytest.mark.usefixtures("fresh_caches")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One data folder for the module, with one finished two-epoch run on digits."""
    yield from digits_store(tmp_path_factory, epochs=2)


def finish(engine, epochs: int) -> int:
    return completed_digits_run(engine, epochs)


@pytest.fixture
def engine(store):
    return store[0]


@pytest.fixture
def finished_run(store):
    return store[1]


def page(name: str, run: int | None = None) -> AppTest:
    at = AppTest.from_file(f"../pages/{name}.py", default_timeout=TIMEOUT)
    if run is not None:
        at.query_params["run"] = str(run)  # how a link to a run opens a page
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def texts(at: AppTest) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption] + [s.value for s in at.subheader]
    parts += [x.value for x in at.info] + [x.value for x in at.success] + [x.value for x in at.error]
    parts += [x.value for x in at.warning]
    return "\n".join(str(p) for p in parts)


def test_data_page_gallery_and_import_report(engine, finished_run):
    at = page("data")
    assert "digits" in at.selectbox[0].options[0]
    assert "1,797 images" in texts(at) and "**0** · " in texts(at)
    assert "Fashion-MNIST" in texts(at) or any("fashion-mnist" in b.label for b in at.button)

    # the import path the form uses, with one bad file among good ones
    from core.data.importing import import_uploads

    good = []
    for i in range(4):
        buffer = io.BytesIO()
        Image.fromarray(np.full((10, 10, 3), 40 * i, np.uint8)).save(buffer, "PNG")
        good.append((f"img{i}.png", buffer.getvalue()))
    report = import_uploads(engine, "mixed", good + [("broken.jpg", b"\xff\xd8\xff garbage")], 16)
    assert report.n_images == 4 and [r.name for r in report.rejected] == ["broken.jpg"]
    at = page("data")
    names = [str(o) for o in at.selectbox[0].options]
    assert any("mixed (4 images)" in n for n in names)


def test_data_pages_class_chart_labels_every_bar(engine, finished_run):
    """Altair drops axis labels that would overlap unless told not to: the chart must give each
    class its own labelled row (it labelled 5 of 10 bars at 22 px a bar)."""
    import json

    import pyarrow as pa

    at = page("data")
    chosen = at.selectbox[0].value
    [chart] = at.get("vega_lite_chart")
    spec = json.loads(chart.proto.spec)
    axis = spec["encoding"]["y"]["axis"]
    assert spec["encoding"]["y"]["field"] == "class" and axis["labelOverlap"] is False
    assert spec["height"]["step"] >= 18  # a row at least the label's height with its padding
    assert spec["encoding"]["y"]["sort"] == list(chosen.classes)
    [dataset] = chart.proto.datasets
    rows = pa.ipc.open_stream(dataset.data.data).read_all().to_pylist()
    assert len(chosen.classes) == 10 and [row["class"] for row in rows] == list(chosen.classes)
    assert sum(row["images"] for row in rows) == chosen.n_images


def png_bytes(level: int, side: int = 10) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), level, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_data_page_keeps_the_form_after_a_failed_import_and_empties_it_after_a_success(engine, finished_run):
    at = page("data")
    name = next(t for t in at.text_input if t.label == "Dataset name")
    name.input("pets-form")
    mixed = zip_bytes({"cats/0.png": png_bytes(10), "dogs/1.png": png_bytes(90), "loose.png": png_bytes(170)})
    at.file_uploader[0].set_value(("pets.zip", mixed, "application/zip"))
    next(b for b in at.button if b.label == "Import").click().run()
    assert not at.exception, [e.message for e in at.exception]
    [error] = [e.value for e in at.error]
    assert error.startswith("Nothing was imported.") and "pets.zip/loose.png is in none" in error
    assert "pets.zip/cats/" in error  # a class folder it belongs in, beside the others
    # what the person entered is still there, to fix and import again
    assert next(t for t in at.text_input if t.label == "Dataset name").value == "pets-form"
    assert [f.name for f in at.file_uploader[0].value] == ["pets.zip"]

    good = zip_bytes({"cats/0.png": png_bytes(10), "dogs/1.png": png_bytes(90)})
    at.file_uploader[0].set_value(("pets.zip", good, "application/zip"))  # the name is not typed again
    next(b for b in at.button if b.label == "Import").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert "Imported 2 images into “pets-form” (2 classes)." in [s.value for s in at.success]
    assert next(t for t in at.text_input if t.label == "Dataset name").value == ""  # ready for the next one
    assert not at.file_uploader[0].value
    assert any("pets-form (2 images)" in str(o) for o in at.selectbox[0].options)


def test_train_page_starts_a_run_and_shows_its_progress(engine, finished_run):
    at = page("train")
    assert "every image of the same label is a positive" in texts(at)  # supcon, RunConfig's default
    assert widget(at, "Objective").value == "supcon" and widget(at, "Temperature τ").value == 0.07
    objective = next(s for s in at.selectbox if s.label == "Objective")
    objective.select("contrastive").run()
    miner = next(s for s in at.selectbox if s.label == "Miner")
    assert list(miner.options) == ["All pairs", "Hard pairs"]  # triplet miners do not apply to pairs
    next(n for n in at.number_input if n.label == "Epochs").set_value(300)
    width = widget(at, "Encoder width")
    assert width.value == "default" and "default (32)" in width.options  # vgg_grid's (models.widths)
    width.set_value(24).run()
    assert at.query_params["width"] == "24"
    augment = widget(at, "Augmentation")  # digits' own default: a mirrored digit is another glyph
    assert augment.value == "default" and augment.options[0] == "default (none)"
    assert augment.options[-1] == "mirror and blank a square (each in half the images)"
    augment.set_value("erase").run()
    assert at.query_params["augment"] == "erase"
    next(b for b in at.button if b.label == "Start training").click().run()
    assert not at.exception and not at.error
    with transaction(engine) as session:
        newest = queries.list_runs(session)[0]
        assert newest.id != finished_run and newest.config["loss"] == "contrastive"
        assert newest.config["epochs"] == 300 and newest.config["width"] == 24
        assert newest.config["augment"] == "erase"
        new_id = newest.id
    assert f"Run #{new_id}" in texts(at)
    cancel_run(engine, new_id)


def test_triplets_page_shows_rows_counts_and_histogram(engine, finished_run):
    from core.explore.triplets import inspected_rows

    at = page("triplets", run=finished_run)
    body = texts(at)
    assert "What the miner picked in the last batch of epoch 2" in body
    assert "Semi-hard** miner: every semi-hard triplet" in body  # the run's own miner, in the registry's words
    assert "d(A,P) = " in body and "d(A,N) = " in body and "m = 0.2" in body
    shown = inspected_rows(engine, finished_run, 2)
    assert shown and {r["category"] for r in shown} == {"semi-hard"}  # the semi-hard miner's picks only
    for row in shown:  # each with the loss it contributed, as the page prints it
        assert f"loss = {row['loss']:.4f} · **semi-hard**" in body
    assert "**hard**" not in body and "**easy**" not in body
    assert "cross-batch memory" not in body and "from memory" not in body  # a run without one
    assert len(at.get("vega_lite_chart")) >= 2  # category counts per epoch, gap histogram
    # anchor, positive, negative thumbnails, and one gallery of the epoch's most used negatives
    assert len(at.get("image")) == 3 * len(shown) + 1 and "Images most used as negatives in epoch 2" in body


def test_triplets_page_shows_a_default_supcon_run_s_hardest_in_batch_negatives(engine):
    """RunConfig's default loss is supcon: the page shows anchors with their hardest positive and
    their hardest in-batch negatives, each with its softmax weight, and no margin histogram."""
    from core.explore.triplets import inspected_rows

    run_id = completed_digits_run(engine, epochs=1, loss="supcon")
    at = page("triplets", run=run_id)
    body = texts(at)
    assert "Every other image of the batch is a negative, weighed by the softmax" in body
    shown = inspected_rows(engine, run_id, 1)
    assert shown and all(row["weight"] is not None and 0 < row["weight"] < 1 for row in shown)
    anchors = {row["anchor"] for row in shown}
    assert len(shown) == 3 * len(anchors)  # NEGATIVES_SHOWN hardest negatives per anchor
    assert "No triplets were recorded" not in body
    assert len(at.get("image")) == 3 * len(shown) + 1  # A, P, N per row, and the most used negatives


def test_triplets_page_reads_only_the_labels_of_the_images_it_shows(engine, finished_run, monkeypatch):
    """Reading every image's label (70,000 on Fashion-MNIST) was half of the page's time; the
    captions still name each shown image's class."""
    from core.explore.triplets import inspected_rows

    def refuse(*args, **kwargs):
        raise AssertionError("the Triplets page read the whole image table")

    monkeypatch.setattr(queries, "dataset_image_table", refuse)
    at = page("triplets", run=finished_run)
    with transaction(engine) as session:
        dataset_id = session.get(Run, finished_run).dataset_id
    monkeypatch.undo()
    with transaction(engine) as session:
        table = queries.dataset_image_table(session, dataset_id)
        classes = list(session.get(Run, finished_run).dataset.classes)
    captions = [c for image in at.get("image") for c in (i.caption for i in image.proto.imgs)]
    shown = inspected_rows(engine, finished_run, 2)
    for row in shown:
        anchor = row["anchor"]
        assert f"A #{anchor} · {classes[table[anchor].label]}" in captions
    assert any(" · hard ×" in c for c in captions)  # the most used negatives' gallery, with classes
    assert all(not c.startswith("#") or " · unlabeled · " not in c for c in captions)


def test_triplets_page_follows_a_run_in_its_first_epoch(engine, finished_run):
    """Before its first epoch is stored, a run's progress and when its triplets will appear."""
    import os
    import socket

    from sqlalchemy import delete

    from storage.schema import utcnow

    with transaction(engine) as session:
        run = Run(dataset_id=session.get(Run, finished_run).dataset_id, kind="train",
                  config={"loss": "triplet", "miner": "semi-hard", "epochs": 2}, status="running", phase="training",
                  epoch=1, step=5, total_steps=22, last_loss=0.3, started_at=utcnow(), pid=os.getpid(),
                  host=socket.gethostname(), heartbeat_at=utcnow())
        session.add(run)
        session.flush()
        run_id = run.id
    try:
        at = page("triplets", run=run_id)
        assert f"Run #{run_id} is running in its first epoch: the first epoch's triplets appear here when it ends." \
            in [i.value for i in at.info]
        [bar] = at.get("progress")
        assert "epoch 1 of 2 · step 5/22 · training" in str(bar.proto.text)
        assert not at.get("image")
    finally:
        with transaction(engine) as session:
            session.execute(delete(Run).where(Run.id == run_id))


def map_args(at: AppTest) -> dict:
    """The arguments the page gave the map component (it renders in a browser, not in AppTest)."""
    import json

    [element] = at.get("component_instance")
    return json.loads(element.proto.json_args)


def test_explore_page_shows_metrics_map_and_search(engine, finished_run):
    at = page("explore", run=finished_run)
    labels = [m.label for m in at.metric]
    assert labels[:3] == ["Precision@1", "R-Precision", "MAP@R"] and "Recall@10" in labels
    with transaction(engine) as session:
        p1 = session.get(Run, finished_run).metrics["precision_at_1"]
    assert at.metric[0].value == f"{p1:.3f}"
    assert "Map (PCA preview while UMAP computes)" in texts(at)  # nothing computed yet: the instant preview
    assert any(b.label == "Compute the statistics and the UMAP map" for b in at.button)
    args = map_args(at)
    assert args["n"] == 1797 and args["points_url"].startswith("app/static/maps/")
    assert sum(e["count"] for e in args["legend"]) == 1797 and args["colour_title"] == "label"
    assert "the run's statistics are not computed yet" in texts(at)
    assert [t.label for t in at.tabs] == ["Failing queries", "Confusion", "Label errors", "Search", "Export"]


def test_explore_page_follows_the_map_job(engine, finished_run):
    """While the map's own job runs, Explore works on the PCA preview and says what the job does;
    a failed job shows its reason and offers to compute again."""
    import os
    import socket

    from core.explore.projection import UMAP_DEFAULTS, params_key
    from storage.schema import ProjectionRow, utcnow

    with transaction(engine) as session:
        row = ProjectionRow(run_id=finished_run, method="umap", params_key=params_key(UMAP_DEFAULTS),
                            params=dict(UMAP_DEFAULTS), status="running", pid=os.getpid(), host=socket.gethostname(),
                            heartbeat_at=utcnow(), phase="compiling", owner="someone",
                            message="first time on this machine: usually about 60 s here")
        session.add(row)
        session.flush()
        row_id = row.id
    try:
        at = page("explore", run=finished_run)
        body = texts(at)
        assert "Map (PCA preview" in body and "UMAP map · Compiling UMAP's code: first time on this machine" in body
        assert map_args(at)["n"] == 1797 and at.metric  # the page works meanwhile
        with transaction(engine) as session:
            row = session.get(ProjectionRow, row_id)
            row.phase, row.progress, row.message = "layout", 0.4, "epoch 40 of 100"
        at = page("explore", run=finished_run)
        bars = at.get("progress")
        assert bars and "UMAP map · Laying out the map: epoch 40 of 100" in str(bars[0].proto.text)
        with transaction(engine) as session:
            row = session.get(ProjectionRow, row_id)
            row.status, row.reason = "failed", "MemoryError: out of memory"
        at = page("explore", run=finished_run)
        assert "UMAP map failed: MemoryError: out of memory" in texts(at)
        assert any(b.label == "Compute them again" for b in at.button)
    finally:
        with transaction(engine) as session:
            session.delete(session.get(ProjectionRow, row_id))


def test_explore_page_with_statistics_colours_fails_and_links_to_the_map(engine, finished_run):
    from core.runs.worker import compute_statistics

    assert compute_statistics(engine, finished_run).status == "done"
    at = page("explore", run=finished_run)
    colour = at.get("button_group")[0]
    assert list(colour.proto.options[i].content for i in range(len(colour.proto.options))) == [
        "label", "nearest neighbour has the same label", "average precision as a query", "split (train / test)",
        # a training run's mining counts (core.training.tally_files)
        "times used as a hard negative", "times used as a semi-hard negative", "times an anchor with its margin violated"]
    show = [b for b in at.button if b.label == "Show on map"]
    assert len(show) >= 10  # the failing queries (10 by default) and the label errors
    assert len(at.get("vega_lite_chart")) == 1  # the confusion heatmap
    assert "labelled" in texts(at) and "looks like" in texts(at)  # a likely label error, named
    assert map_args(at)["focus"] is None
    show[0].click().run()
    focus = map_args(at)["focus"]["point"]
    assert isinstance(focus, int) and map_args(at)["selected"] == [focus]
    assert "Nearest neighbours" in texts(at) and f"query #{focus}" in str([i.proto for i in at.get("image")])


def test_explore_pages_parquet_download_is_the_command_lines_file(engine, finished_run, tmp_path, monkeypatch):
    """The page's Parquet button and `python -m core export` write the same file, statistics included."""
    import pyarrow.parquet as pq
    from streamlit.runtime.media_file_manager import MediaFileManager

    from core.cli import main
    from core.explore.export import STATISTICS_COLUMNS
    from core.runs.worker import compute_statistics

    assert compute_statistics(engine, finished_run).status == "done"
    downloads = {}  # file name → the callable a click on its button runs
    add_deferred = MediaFileManager.add_deferred

    def recorded(self, data_callable, mimetype, coordinates, file_name=None, **kwargs):
        downloads[file_name] = data_callable
        return add_deferred(self, data_callable, mimetype, coordinates, file_name, **kwargs)

    monkeypatch.setattr(MediaFileManager, "add_deferred", recorded)
    page("explore", run=finished_run)
    (tmp_path / "page.parquet").write_bytes(downloads[f"run-{finished_run}-embeddings.parquet"]())
    assert main(["export", "--run", str(finished_run), "--format", "parquet", "--out", str(tmp_path / "cli.parquet")]) == 0
    from_page, from_cli = pq.read_table(tmp_path / "page.parquet"), pq.read_table(tmp_path / "cli.parquet")
    assert set(STATISTICS_COLUMNS) <= set(from_cli.column_names)
    assert from_page.column_names == from_cli.column_names
    for name in from_cli.column_names:  # (NaN average precision for an image that is no query)
        assert from_page.column(name).to_pylist() == from_cli.column(name).to_pylist() or np.array_equal(
            from_page.column(name).to_numpy(), from_cli.column(name).to_numpy(), equal_nan=True), name


def test_explore_page_of_a_one_class_run_has_nothing_to_compare(engine):
    """No retrieval metrics in the header, so no per-class Precision@1 of 1.000 in the tabs either."""
    from core.explore.metrics import retrieval_metrics
    from core.runs.worker import compute_statistics
    from tests.helpers import clustered_run

    made = clustered_run(engine, 60, classes=1, seed=11)
    with pytest.raises(ValueError) as refused:
        retrieval_metrics(made["embeddings"], made["labels"])
    with transaction(engine) as session:
        session.get(Run, made["run_id"]).metrics = {"unavailable": str(refused.value)}
    try:
        assert compute_statistics(engine, made["run_id"]).status == "done"
        at = page("explore", run=made["run_id"])
        assert f"No retrieval metrics for this run: {refused.value}" in texts(at)
        failing, confusion, errors = at.tabs[:3]
        for tab in (failing, confusion, errors):
            assert [i.value for i in tab.info] == [f"Nothing to compare in this run: {refused.value}."]
        assert not confusion.dataframe and "Precision@1" not in texts(at)
    finally:
        from core.runs.jobs import delete_run

        delete_run(engine, made["run_id"])  # (a made-up run: the other pages need not list it)


def test_runs_page_lists_compares_and_deletes(engine, finished_run):
    doomed = finish(engine, epochs=1)
    at = page("runs")
    frame = at.dataframe[0].value
    assert {finished_run, doomed} <= set(frame["run"].tolist())
    assert frame.loc[frame["run"] == finished_run, "precision_at_1"].iloc[0] > 0.5
    assert "Loss per epoch" in texts(at)
    next(s for s in at.selectbox if s.label == "Run").select(doomed).run()
    at.checkbox[0].check().run()
    next(b for b in at.button if b.label == "Delete run").click().run()
    with transaction(engine) as session:
        assert session.get(Run, doomed) is None
        assert session.get(Run, finished_run) is not None


def test_runs_page_scales_each_objective_plots_precision_and_counts_stored_epochs(engine, finished_run):
    """InfoNCE's loss (about 6) and a contrastive one (0.09) each get their own y-scale; the probe's
    Precision@1 per epoch is drawn; a run cancelled in epoch 4 of 4 shows the 3 epochs it stored."""
    import json

    from core.runs.jobs import delete_run
    from storage.schema import EpochRow

    with transaction(engine) as session:
        dataset_id = session.get(Run, finished_run).dataset_id
        made = {}
        for loss, level in (("infonce", 6.0), ("contrastive", 0.09)):
            run = Run(dataset_id=dataset_id, kind="train", config={"loss": loss, "epochs": 4}, status="cancelled",
                      epoch=4)
            session.add(run)
            session.flush()
            session.add_all([EpochRow(run_id=run.id, epoch=e, loss=level / e, easy=1, semi_hard=1, hard=1, seconds=1.0,
                                      probe_precision_at_1=0.2 * e) for e in (1, 2, 3)])
            made[loss] = run.id
    try:
        at = page("runs")
        frame = at.dataframe[0].value
        for run_id in made.values():
            assert frame.loc[frame["run"] == run_id, "epochs"].iloc[0] == "3/4"
        assert frame.loc[frame["run"] == finished_run, "epochs"].iloc[0] == "2/2"
        compare = next(m for m in at.multiselect if m.label == "Compare runs")
        compare.set_value([finished_run, *made.values()]).run()
        losses, precision = at.get("vega_lite_chart")[:2]
        spec = json.loads(losses.proto.spec)
        assert spec["facet"]["field"] == "objective" and spec["resolve"]["scale"]["y"] == "independent"
        import pyarrow as pa

        rows = pa.ipc.open_stream(losses.proto.datasets[0].data.data).read_all().to_pylist()
        assert {row["objective"] for row in rows} == {"triplet", "infonce", "contrastive"}
        spec = json.loads(precision.proto.spec)
        assert spec["encoding"]["y"]["field"] == "precision_at_1"
        rows = pa.ipc.open_stream(precision.proto.datasets[0].data.data).read_all().to_pylist()
        with transaction(engine) as session:
            stored = [e.probe_precision_at_1 for e in queries.epoch_rows(session, [finished_run])]
        assert all(value is not None for value in stored)  # a labelled digits run has its probe's
        assert [r["precision_at_1"] for r in rows if r["run"] == f"#{finished_run}"] == stored
        assert "Precision@1 per epoch" in texts(at)
    finally:
        for run_id in made.values():
            delete_run(engine, run_id)


def test_train_page_offers_every_option_and_previews_self_supervised_views(engine, finished_run):
    at = page("train")
    labels = {w.label for w in list(at.selectbox) + list(at.number_input) + list(at.checkbox)}
    assert {"Supervision", "Batches", "K images per class", "Precision", "Temperature τ",
            "torch.compile the encoder"} <= labels  # supcon, the default objective
    next(s for s in at.selectbox if s.label == "Objective").select("triplet").run()
    labels = {w.label for w in list(at.selectbox) + list(at.number_input) + list(at.checkbox)}
    assert {"Triplet variant", "Distance", "Margin m"} <= labels and "Temperature τ" not in labels
    body = texts(at)
    for formula in ("d(A,P) < d(A,N) ≤ d(A,P) + m", "per anchor, its farthest positive", "Σ_{p∈P(i)}"):
        assert formula in body  # every objective and miner explained, with its formula
    assert len(at.get("image")) == 0  # supervised by labels on digits: no view preview

    next(s for s in at.selectbox if s.label == "Objective").select("infonce").run()
    assert not at.exception
    assert list(next(s for s in at.selectbox if s.label == "Miner").options) == ["In-batch negatives"]
    assert "Self-supervised" in texts(at)
    images = at.get("image")
    assert len(images) == 6  # six pairs of views of stored digits

    next(s for s in at.selectbox if s.label == "Supervision").select("labels").run()
    assert "InfoNCE / NT-Xent learns from two views" in texts(at)
    assert next(b for b in at.button if b.label == "Start training").disabled


def test_train_page_offers_workers_only_with_a_ray_cluster(engine, monkeypatch):
    """The Workers field (core.runs.parallel) shows where runs go to a Ray cluster, and what it
    holds reaches the run's config."""
    monkeypatch.delenv("EMBEDDING_LAB_RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert "Workers" not in {w.label for w in page("train").number_input}
    monkeypatch.setenv("EMBEDDING_LAB_RAY_ADDRESS", "http://127.0.0.1:1")  # nobody there: the job is not taken
    at = page("train")
    next(w for w in at.number_input if w.label == "Workers").set_value(2).run()
    next(b for b in at.button if b.label == "Start training").click().run()
    with transaction(engine) as session:
        run = session.query(Run).order_by(Run.id.desc()).first()
        assert run.config["workers"] == 2
        assert run.status == "failed" and "http://127.0.0.1:1" in run.reason  # said, not left queued


def test_runs_page_resumes_a_cancelled_run(engine):
    run_id = cancelled_in_epoch_two(engine)
    at = AppTest.from_file("../pages/runs.py", default_timeout=TIMEOUT)
    at.run()
    next(s for s in at.selectbox if s.label == "Run").select(run_id).run()
    assert "checkpoint after epoch 1 of 2" in texts(at)
    next(b for b in at.button if b.label == "Resume from epoch 1").click().run()
    assert not at.exception and not at.error
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:  # the worker trains epoch 2, then embeds and projects
        with transaction(engine) as session:
            run = session.get(Run, run_id)
            if run.status not in queries.ACTIVE or run.phase in ("embedding", "projecting"):
                break
        time.sleep(0.3)
    cancel_run(engine, run_id)  # no need to wait for UMAP here
    assert run.status in ("running", "completed") and run.epoch == 2, (run.status, run.reason)
    with transaction(engine) as session:
        assert [e.epoch for e in queries.epoch_rows(session, [run_id])] == [1, 2]


FORM_IN_URL = {  # every Train form value, none of them its default
    "dataset": "digits", "encoder": "resnet18", "dim": "32", "device": "cpu", "loss": "contrastive",
    "miner": "hard-pairs", "margin": "0.7", "distance": "cosine", "epochs": "12", "batch_size": "64", "lr": "0.01",
    "supervision": "labels", "sampler": "random", "k": "8", "precision": "fp32", "compile": "true",
}


def widget(at: AppTest, label: str):
    return next(w for w in [*at.selectbox, *at.number_input, *at.select_slider, *at.checkbox] if w.label == label)


def test_train_form_comes_back_from_the_url_after_a_reload(engine, finished_run):
    at = AppTest.from_file("../pages/train.py", default_timeout=TIMEOUT)
    for key, value in FORM_IN_URL.items():
        at.query_params[key] = value
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    shown = {label: widget(at, label).value for label in (
        "Dataset", "Encoder", "Embedding size", "Device", "Objective", "Miner", "Margin m", "Distance", "Epochs",
        "Batch size", "Learning rate", "Supervision", "Batches", "K images per class", "Precision",
        "torch.compile the encoder")}
    assert shown == {"Dataset": "digits", "Encoder": "resnet18", "Embedding size": 32, "Device": "cpu",
                     "Objective": "contrastive", "Miner": "hard-pairs", "Margin m": 0.7, "Distance": "cosine", "Epochs": 12,
                     "Batch size": 64, "Learning rate": 0.01, "Supervision": "labels", "Batches": "random",
                     "K images per class": 8, "Precision": "fp32", "torch.compile the encoder": True}

    widget(at, "Epochs").set_value(40).run()  # a change goes into the URL, under the options' own names
    assert at.query_params["epochs"] == "40" and at.query_params["loss"] == "contrastive"
    reloaded = AppTest.from_file("../pages/train.py", default_timeout=TIMEOUT)
    for key, value in at.query_params.items():
        reloaded.query_params[key] = value
    reloaded.run()
    assert widget(reloaded, "Epochs").value == 40 and widget(reloaded, "Objective").value == "contrastive"


def test_train_form_ignores_garbage_in_the_url(engine, finished_run):
    at = AppTest.from_file("../pages/train.py", default_timeout=TIMEOUT)
    garbage = {"epochs": "abc", "loss": "nope", "margin": "nan", "lr": "5", "batch_size": "99", "dim": "",
               "compile": "maybe", "k": "1", "dataset": "no-such-set", "device": "tpu", "width": "3",
               "augment": "flip+crop"}
    for key, value in garbage.items():
        at.query_params[key] = value
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    recipe = RunConfig(dataset="digits")  # the form falls back to RunConfig's defaults
    assert widget(at, "Epochs").value == recipe.epochs and widget(at, "Objective").value == recipe.loss == "supcon"
    assert widget(at, "Temperature τ").value == recipe.temperature and widget(at, "Learning rate").value == recipe.lr
    assert not any(w.label == "Margin m" for w in at.number_input)  # supcon has none: the garbage margin is unused
    assert widget(at, "Batch size").value == recipe.batch_size
    assert widget(at, "Embedding size").value == recipe.embedding_dim
    assert widget(at, "torch.compile the encoder").value is False
    assert widget(at, "K images per class").value == recipe.samples_per_class
    assert widget(at, "Device").value == "auto" and widget(at, "Dataset").value == "digits"
    assert widget(at, "Encoder width").value == "default" and widget(at, "Augmentation").value == "default"
    assert at.query_params["epochs"] == str(recipe.epochs)  # the URL holds what is shown
    assert at.query_params["loss"] == "supcon"

    # a miner that does not apply to the objective named beside it falls back to that objective's default
    at = AppTest.from_file("../pages/train.py", default_timeout=TIMEOUT)
    at.query_params["loss"], at.query_params["miner"] = "contrastive", "semi-hard"
    at.run()
    assert widget(at, "Miner").value == "all-pairs" and widget(at, "Margin m").value == 0.5


def test_train_page_shows_a_run_that_finished_while_it_was_away(engine):
    run_id = finish(engine, epochs=1)  # completed by a worker no page was watching
    later = create_training_run(engine, RunConfig(dataset="digits", epochs=1, batch_size=128))
    cancel_run(engine, later)  # a newer run that ended without a result does not hide it
    at = page("train")
    body = texts(at)
    assert f"**Run #{run_id}**" in body and "Done in" in body
    assert f"**Run #{later}**" in body and "cancelled before it started" in [i.value for i in at.info]
    assert "Precision@1" in next(s.value for s in at.success if "Done in" in s.value)


def test_train_page_shows_a_run_that_ended_in_the_panel_and_the_lists_below(engine, monkeypatch):
    """A whole-page run draws the ended run everywhere at once, so it asks for no further rerun;
    a poll of the panel alone asks for one at its next poll (tests/test_browser_train.py)."""
    import streamlit as st

    reruns = []
    rerun = st.rerun
    monkeypatch.setattr(st, "rerun", lambda *args, **kwargs: (reruns.append(kwargs), rerun(*args, **kwargs)))
    run_id = create_training_run(engine, RunConfig(dataset="digits", epochs=1, batch_size=128))
    at = page("train")  # queued: shown as active, not yet among the encoders to load
    assert f"**Run #{run_id}** :material/schedule: queued" in texts(at)
    assert run_id in at.session_state["active_runs"] and reruns == []
    assert any(b.label == "Cancel" for b in at.button)
    assert execute_run(engine, run_id, project=False)["status"] == "completed"
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    assert reruns == [] and "train-page-rerun-due" not in at.session_state
    assert at.session_state["active_runs"] == set()
    assert f"**Run #{run_id}** :material/check_circle: completed" in texts(at)
    assert not any(b.label == "Cancel" for b in at.button)
    assert f"#{run_id} digits · vgg_grid" in next(s for s in at.selectbox if s.label == "Run").options


def test_train_page_shows_elapsed_time_time_left_and_a_live_loss_curve(engine):
    """A training run's card while it trains: the time since it started, the time left at the pace
    of its stored epochs, and its loss per stored epoch and per step seen, on a live chart."""
    import json
    import os
    import socket
    from datetime import timedelta

    import pyarrow as pa

    from storage.schema import EpochRow, utcnow

    with transaction(engine) as session:
        run = Run(dataset_id=1, kind="train", config={"loss": "triplet", "epochs": 3}, status="running",
                  phase="training", epoch=2, step=150, total_steps=300, last_loss=0.25,
                  started_at=utcnow() - timedelta(seconds=75), pid=os.getpid(), host=socket.gethostname(),
                  heartbeat_at=utcnow())
        session.add(run)
        session.flush()
        session.add(EpochRow(run_id=run.id, epoch=1, loss=0.4, easy=1, semi_hard=1, hard=1, seconds=60.0))
        run_id = run.id
    try:
        at = page("train")
        import re

        # 75 s since it started; 150 steps left at the stored epoch's 0.6 s a step
        assert re.search(r"1:1\d elapsed · about 1:30 left at the pace so far", texts(at)), texts(at)
        charts = at.get("vega_lite_chart")
        assert len(charts) == 1
        rows = pa.ipc.open_stream(charts[0].proto.datasets[0].data.data).read_all().to_pylist()
        assert {"epoch": 1.0, "loss": 0.4, "what": "epoch mean"} in rows
        assert {"epoch": 1.5, "loss": 0.25, "what": "recent steps"} in rows  # step 150 of 100 an epoch
        assert json.loads(charts[0].proto.spec)["layer"]
        with transaction(engine) as session:
            session.get(Run, run_id).step, session.get(Run, run_id).last_loss = 180, 0.2
        at.run()  # the next poll adds the step it sees to the curve
        rows = pa.ipc.open_stream(at.get("vega_lite_chart")[0].proto.datasets[0].data.data).read_all().to_pylist()
        assert [(r["epoch"], r["loss"]) for r in rows if r["what"] == "recent steps"] == [(1.5, 0.25), (1.8, 0.2)]
    finally:
        from sqlalchemy import delete

        with transaction(engine) as session:
            queries.delete_run_rows(session, run_id)
            session.execute(delete(Run).where(Run.id == run_id))


def test_train_page_says_when_no_encoder_can_be_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDDING_LAB_HOME", str(tmp_path / "empty-lab"))
    monkeypatch.delenv("EMBEDDING_LAB_DB", raising=False)
    at = page("train")
    assert "No completed training run yet." in texts(at)


def test_runs_page_confirms_a_delete_on_the_next_render(engine):
    doomed = finish(engine, epochs=1)
    at = page("runs")
    next(s for s in at.selectbox if s.label == "Run").select(doomed).run()
    next(c for c in at.checkbox if c.label.startswith(f"Yes, delete run #{doomed}")).check().run()
    next(b for b in at.button if b.label == "Delete run").click().run()
    assert not at.exception, [e.message for e in at.exception]
    assert f"Deleted run #{doomed}." in [s.value for s in at.success]
    at.run()
    assert f"Deleted run #{doomed}." not in [s.value for s in at.success]  # shown once


def test_triplets_page_opens_on_the_newest_run_it_can_show(engine, finished_run):
    with transaction(engine) as session:
        newest_with_epochs = max(r.id for r in queries.list_runs(session) if r.kind == "train" and r.epochs)
    empty = create_training_run(engine, RunConfig(dataset="digits", epochs=1, batch_size=128))
    cancel_run(engine, empty)  # a newer run that never stored an epoch
    at = page("triplets")
    assert at.selectbox[0].value == newest_with_epochs != empty
    assert "What the miner picked in the last batch of epoch" in texts(at)
    assert at.get("image")[0].proto.imgs[0].url  # the thumbnails are there
    at = page("triplets", run=empty)  # a link that names a run still opens on it
    assert at.selectbox[0].value == empty and "has not finished an epoch yet" in texts(at)


def test_train_page_refuses_cuda_where_there_is_none(engine, finished_run, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with transaction(engine) as session:
        before = [r.id for r in queries.list_runs(session)]
    at = AppTest.from_file("../pages/train.py", default_timeout=TIMEOUT)
    at.run()
    next(s for s in at.selectbox if s.label == "Device").select("cuda").run()
    next(b for b in at.button if b.label == "Start training").click().run()
    assert not at.exception
    assert any("this machine has no CUDA GPU" in e.value for e in at.error), texts(at)
    with transaction(engine) as session:
        assert [r.id for r in queries.list_runs(session)] == before


def test_explore_link_keeps_the_view_and_says_when_its_run_is_gone(engine, finished_run):
    """Explore's state lives in its link: the colouring, the tab and the selection come back from
    it; a link to a deleted run says so instead of silently showing another run."""
    at = AppTest.from_file("../pages/explore.py", default_timeout=TIMEOUT)
    at.query_params.update({"run": str(finished_run), "colour": "split", "tab": "Search", "region": "3-5.9"})
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    args = map_args(at)
    assert args["colour_title"] == "split (train / test)" and args["selected"] == [3, 4, 5, 9]
    assert "Selected region: 4 images" in texts(at)
    assert at.query_params["region"] == "3-5.9" and at.query_params["colour"] == "split"
    assert at.query_params["tab"] == "Search"
    # a malformed selection in a link is dropped, not raised
    at = AppTest.from_file("../pages/explore.py", default_timeout=TIMEOUT)
    at.query_params.update({"run": str(finished_run), "region": "5-3.x", "point": "99999999"})
    at.run()
    assert not at.exception and map_args(at)["selected"] == [] and "region" not in at.query_params
    # a deleted run
    at = AppTest.from_file("../pages/explore.py", default_timeout=TIMEOUT)
    at.query_params["run"] = "987654"
    at.run()
    assert not at.exception
    assert "Run 987654 does not exist: it was deleted" in texts(at)
    assert at.query_params["run"] != "987654" and map_args(at)["n"] == 1797  # another run, and it says which


def test_explore_finds_images_by_label_or_file_name(engine, finished_run):
    """Find: a class name selects that class's images (the map lights them); a file name's part
    selects those files; nothing found says so."""
    with transaction(engine) as session:
        run = session.get(Run, finished_run)
        rows = queries.dataset_image_table(session, run.dataset_id)
        classes = list(run.dataset.classes)
    at = page("explore", run=finished_run)
    at.text_input[0].set_value(classes[3])
    [find] = [b for b in at.button if b.label == "Find"]
    find.click().run()  # a form's text goes with its button
    threes = [i for i, image in enumerate(rows) if image.label == 3]
    named = [i for i, image in enumerate(rows) if classes[3].lower() in image.name.lower()]
    assert set(named) - set(threes)  # digits' file names hold the class names too: they are not found
    assert map_args(at)["selected"] == threes and len(threes) > 100
    assert f"Selected region: {len(threes):,} images" in texts(at)
    assert f"Found {len(threes):,} images labelled {classes[3]!r}." in texts(at)
    at.text_input[0].set_value("no-such-image-anywhere")
    [find] = [b for b in at.button if b.label == "Find"]
    find.click().run()
    assert "No class is named 'no-such-image-anywhere' and no file name contains it." in texts(at)
    assert map_args(at)["selected"] == threes  # the selection stays


def test_explore_fixes_a_selection_as_a_new_version(engine, finished_run):
    """A region selected on the map can be relabelled as a new version of the dataset; the run
    keeps its own version and labels."""
    from core.data.versions import list_versions

    with transaction(engine) as session:
        run = session.get(Run, finished_run)
        dataset_id, classes = run.dataset_id, list(run.dataset.classes)
        before = [image.label for image in queries.run_image_table(session, run)]
    at = AppTest.from_file("../pages/explore.py", default_timeout=TIMEOUT)
    at.query_params.update({"run": str(finished_run), "region": "0-4"})
    at.run()
    assert "Selected region: 5 images" in texts(at)
    at.selectbox(key=f"explore-{run.cache_key}-fix-label").set_value(classes[7])
    at.text_input(key=f"explore-{run.cache_key}-fix-note").set_value("these are sevens")
    [make] = [b for b in at.button if b.label == "Make the new version"]
    make.click().run()
    assert not at.exception, [e.message for e in at.exception]
    versions = list_versions(engine, dataset_id)
    newest = versions[-1]
    assert newest.note == "these are sevens" and newest.parent == 1
    assert sorted(p for p, _, after in newest.edits.relabelled if after == classes[7]) == \
        [p for p in range(5) if before[p] != 7]
    assert f"over version 1: 5 images relabelled as {classes[7]}." in texts(at)
    # the form starts blank for the next selection: no edit of this one is carried over silently
    assert at.text_input(key=f"explore-{run.cache_key}-fix-note").value in ("", None)
    assert at.selectbox(key=f"explore-{run.cache_key}-fix-label").value is None
    with transaction(engine) as session:  # the run still reads its own version's labels
        assert [image.label for image in queries.run_image_table(session, session.get(Run, finished_run))] == before


def test_failing_queries_and_label_errors_become_the_selection(engine, finished_run):
    """"Select these" makes the listed failing queries (or likely label errors) the page's
    selection: the map lights them and the region's fix section offers to edit them."""
    from core.explore.failures import label_errors, worst_queries
    from core.explore.service import load_run_statistics, statistics_path
    from core.runs.worker import compute_statistics

    assert compute_statistics(engine, finished_run).status == "done"
    stats = load_run_statistics(statistics_path(engine, finished_run))
    at = page("explore", run=finished_run)
    [select] = [b for b in at.button if b.label.startswith("Select these") and b.label.endswith("queries")]
    select.click().run()
    assert map_args(at)["selected"] == sorted(int(p) for p in worst_queries(stats, 10))
    assert any("Fix these 10 images" in e.label for e in at.expander)
    errors = label_errors(stats, 20, min_share=0.7)
    if errors:
        [select] = [b for b in at.button if b.label == f"Select these {len(errors)} images"]
        select.click().run()
        assert map_args(at)["selected"] == sorted(e["position"] for e in errors)


def test_runs_page_shows_the_compared_runs_settings_as_the_train_form_labels_them(engine, finished_run):
    """Two runs compared: their settings side by side under the Train form's labels (no raw config
    key), the settings that differ first and marked."""
    from core.runs.jobs import delete_run
    from core.training.config import FIELD_TITLES, flat_settings

    with transaction(engine) as session:
        base = session.get(Run, finished_run)
        config = dict(base.config, embedding_dim=base.config["embedding_dim"] // 2,
                      samples_per_class=base.config["samples_per_class"] * 2)
        other = Run(dataset_id=base.dataset_id, kind="train", config=config, status="cancelled")
        session.add(other)
        session.flush()
        other, base_config = other.id, dict(base.config)
    try:
        form = page("train")
        next(s for s in form.selectbox if s.label == "Objective").select(base_config["loss"]).run()  # the runs' own
        form_labels = {w.label for w in [*form.selectbox, *form.number_input, *form.select_slider, *form.checkbox]}
        at = page("runs")
        next(m for m in at.multiselect if m.label == "Compare runs").set_value([finished_run, other]).run()
        assert not at.exception, [e.message for e in at.exception]
        assert "Settings side by side" in texts(at)
        settings = next(frame.value for frame in at.dataframe if "setting" in frame.value.columns)
        labels = list(settings["setting"])
        assert not set(labels) & set(flat_settings(base_config))  # no raw key (samples_per_class, embedding_dim)
        # the one setting the form leaves to the CLI, and the workers it shows only with a Ray cluster
        assert set(labels) - form_labels == {FIELD_TITLES["seed"], FIELD_TITLES["workers"]}
        rows = {row["setting"]: row for row in settings.to_dict("records")}
        for key, value in (("embedding_dim", config["embedding_dim"]), ("samples_per_class", config["samples_per_class"])):
            row = rows[FIELD_TITLES[key]]
            assert (row[f"#{finished_run}"], row[f"#{other}"], row["differs"]) == (str(base_config[key]), str(value), "≠")
        assert [row["differs"] for row in settings.to_dict("records")][:3] == ["≠", "≠", ""]  # the differing first
        assert rows[FIELD_TITLES["lr"]][f"#{other}"] == str(base_config["lr"])
        metrics = next(frame.value for frame in at.dataframe if "Precision@1" in frame.value.index)
        assert {"MAP@R", "Recall@10"} <= set(metrics.index) and "precision_at_1" not in metrics.index
        assert list(metrics.columns) == [f"#{finished_run}", f"#{other}"] or \
            list(metrics.columns) == [f"#{other}", f"#{finished_run}"]
    finally:
        delete_run(engine, other)


def test_data_page_deletes_a_version_apart_from_training_again_and_only_once_confirmed(engine, finished_run):
    from core.data.versions import list_versions, make_version

    with transaction(engine) as session:
        dataset_id = session.get(Run, finished_run).dataset_id
    made = make_version(engine, dataset_id, exclude=[0], note="made to be deleted")
    at = page("data")
    chooser = next(s for s in at.selectbox if s.label == "Dataset")
    chooser.select_index(next(i for i, name in enumerate(chooser.options) if name.startswith("digits "))).run()

    def holding(label: str) -> list:
        return [e for e in at.expander if any(b.label == label for b in e.button)]

    [again], [deleting] = holding("Train again on this version"), holding("Delete this version")
    assert again.label != deleting.label  # two places: nobody deletes while looking for Train again
    assert not [b for b in again.button if b.label == "Delete this version"]
    assert not [b for b in deleting.button if b.label == "Train again on this version"]
    next(s for s in deleting.selectbox if s.label == "Version").set_value(made).run()
    [deleting] = holding("Delete this version")
    assert next(b for b in deleting.button if b.label == "Delete this version").disabled  # not before it is confirmed
    [confirm] = [c for c in deleting.checkbox if c.label.startswith(f"Yes, delete version {made} ")]
    confirm.check().run()
    [deleting] = holding("Delete this version")
    next(b for b in deleting.button if b.label == "Delete this version").click().run()
    assert not at.exception, [e.message for e in at.exception]
    assert made not in [info.version for info in list_versions(engine, dataset_id)]


def test_a_run_whose_metrics_come_from_sampled_queries_says_so_on_its_card_and_on_explore(engine, monkeypatch):
    import core.explore.metrics as metrics

    monkeypatch.setattr(metrics, "EXACT_UP_TO", 100)  # the digits test split (359 images) counts as large
    monkeypatch.setattr(metrics, "SAMPLE", 50)
    run_id = finish(engine, epochs=1)
    with transaction(engine) as session:
        from storage.schema import Run

        stored = dict(session.get(Run, run_id).metrics)
    assert stored["sampled_queries"] == 50 and stored["n_queries"] == 359
    at = page("explore", run=run_id)
    assert "Means over 50 randomly sampled queries of the 359 test images" in texts(at)
    at = page("train")
    assert any("over 50 sampled queries" in str(s.value) for s in at.success)


def test_a_run_card_trusts_what_two_polls_in_a_row_drew_at_its_place():
    """A card draws its header first (no blank blink each poll) only where the last two polls drew the
    same run in the same status: one poll's tail can be dropped before it reaches the browser, so
    after a run ends, the next poll (and the page rerun it asks for) still draws the header last."""
    from pages.run_widgets import steady_places

    running, ended, other = (2, "running"), (2, "completed"), (1, "completed")
    assert steady_places([ended], [running]) == [None]  # the poll that saw the run end, and the one after
    assert steady_places([ended], [ended]) == [ended]
    assert steady_places([ended, other], [ended]) == [ended, None]  # a place the poll before did not draw
    assert steady_places([ended], [other, running]) == [None]
    assert steady_places([], [ended]) == []
