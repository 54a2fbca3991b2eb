"""The Explore map's files (what the browser fetches) and the page's helpers: every point, in the
order of the dataset, with colours and legends that count what they show."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.explore import service as explore, map_files


def served(url: str) -> Path:
    """The file Streamlit serves at `url` (app/static/... → <app folder>/static/...)."""
    assert url.startswith("app/static/")
    return map_files.static_root() / url[len("app/static/"):]


def test_coordinates_keep_every_point_in_order_and_shape(lab_home):
    rng = np.random.default_rng(0)
    coords = np.concatenate([rng.normal(-5, 1, (700, 2)), rng.normal([40, 5], 1, (300, 2))])
    url = map_files.write_points(7, "7@t", "umap", coords)
    xy = np.fromfile(served(url), dtype=np.float32).reshape(-1, 2)
    assert len(xy) == 1000 and np.abs(xy).max() <= 0.95 + 1e-6
    # one scale for both axes: distances keep their ratios, and the point order is the dataset's
    original = np.linalg.norm(coords[1] - coords[0]) / np.linalg.norm(coords[900] - coords[0])
    scaled = np.linalg.norm(xy[1] - xy[0]) / np.linalg.norm(xy[900] - xy[0])
    assert scaled == pytest.approx(original, rel=1e-4)
    assert map_files.write_points(7, "7@t", "umap", coords) == url  # same content, same URL
    assert map_files.write_points(7, "7@t", "umap", coords + [1, 0]) == url  # a shift is the same map
    assert map_files.write_points(7, "7@t", "umap", coords * [1, -1]) != url  # another map, another URL


def test_files_of_a_recreated_run_never_share_a_folder_and_deleting_removes_them(lab_home):
    first = served(map_files.write_points(3, "3@2026-01-01", "pca", np.zeros((4, 2))))
    second = served(map_files.write_points(3, "3@2026-02-01", "pca", np.zeros((4, 2))))
    assert first.parent != second.parent
    map_files.remove_run_files(3)
    assert not first.exists() and not second.exists()


def test_static_files_of_a_vanished_data_home_are_pruned(tmp_path, monkeypatch):
    gone = tmp_path / "gone"
    monkeypatch.setenv("EMBEDDING_LAB_HOME", str(gone))
    folder = map_files.home_folder()
    assert (map_files.notes_root() / folder.name).read_text() == str(gone.resolve())
    assert not list(map_files.static_root().rglob("home.txt"))  # nothing under static/ names a data folder
    monkeypatch.setenv("EMBEDDING_LAB_HOME", str(tmp_path / "kept"))
    kept = map_files.home_folder()
    import shutil

    shutil.rmtree(gone)
    map_files.prune_other_homes()
    assert not folder.exists() and kept.exists() and not (map_files.notes_root() / folder.name).exists()
    shutil.rmtree(kept)

    # a folder written by an earlier version, with its note under static/: the note moves out
    old = map_files.static_root() / "maps" / "0123456789ab"
    old.mkdir(parents=True)
    (old / "home.txt").write_text(str(tmp_path / "never-made"))
    map_files.prune_other_homes()
    assert not (old / "home.txt").exists() and not old.exists()  # its home is gone: pruned too
    assert not (map_files.notes_root() / old.name).exists()


def test_sprite_sheets_hold_each_image_at_its_cell(lab_home):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (300, 6, 6, 3), dtype=np.uint8)
    thumbs = map_files.write_sprites(2, "2@t", pixels)
    assert thumbs.per_sheet == 256 and thumbs.cols == 16 and thumbs.cell == 6
    for i in (0, 17, 255, 256, 299):
        sheet = np.asarray(Image.open(served(f"{thumbs.base}sheet-{i // 256}.png")))
        r, c = divmod(i % 256, 16)
        np.testing.assert_array_equal(sheet[r * 6:(r + 1) * 6, c * 6:(c + 1) * 6], pixels[i])
    assert map_files.sprites_if_written(2, "2@t", 300) == thumbs
    assert map_files.sprites_if_written(2, "2@t", 301) is None  # another dataset size: not these sprites
    marker = served(thumbs.base + "sprites.json")
    assert json.loads(marker.read_text())["n"] == 300


def test_colour_columns_count_what_they_show():
    labels = [0, 1, 1, None, 2]
    classes = ["a", "b", "c"]
    split = ["train", "test", "test", "train", "test"]
    categories, legend = map_files.colour_column("label", labels, classes, split)
    assert categories.tolist() == [0, 1, 1, 3, 2]
    assert [(e["name"], e["count"]) for e in legend] == [("a", 1), ("b", 2), ("c", 1), ("unlabeled", 1)]
    categories, legend = map_files.colour_column("nn", labels, classes, split, nn_correct=np.array([1, 0, 1, -1, 0]))
    assert categories.tolist() == [1, 0, 1, 2, 0] and [e["count"] for e in legend] == [2, 2, 1]
    ap = np.array([np.nan, 0.05, 1.0, np.nan, 0.55])
    categories, legend = map_files.colour_column("ap", labels, classes, split, ap=ap)
    assert categories.tolist() == [10, 0, 9, 10, 5]
    assert legend[10] == {"name": "not a query", "colour": map_files.GREY, "count": 2, "background": True}
    assert not any(entry.get("background") for entry in legend[:10])  # drawn faint and underneath: only these
    categories, legend = map_files.colour_column("split", labels, classes, split)
    assert categories.tolist() == [0, 1, 1, 0, 1] and [e["count"] for e in legend] == [2, 3]
    with pytest.raises(ValueError, match="statistics"):
        map_files.colour_column("ap", labels, classes, split)


def test_many_classes_share_other_beyond_the_colour_budget():
    labels = list(range(300))
    categories, legend = map_files.colour_column("label", labels, [f"c{i}" for i in range(300)], ["train"] * 300)
    assert len(legend) == map_files.MAX_CATEGORIES + 2
    assert legend[-2]["name"] == "other classes" and legend[-2]["count"] == 300 - map_files.MAX_CATEGORIES
    assert len(set(e["colour"] for e in legend[:map_files.MAX_CATEGORIES])) == map_files.MAX_CATEGORIES


def test_map_payload_and_failing_query_rows_of_a_stored_run(engine):
    from core.explore.failures import compute_statistics
    from tests.helpers import clustered_run

    made = clustered_run(engine, 600, classes=4, seed=3)
    run_id, labels = made["run_id"], made["labels"]
    payload = explore.map_payload(engine, run_id, "umap", made["coords"], "label")
    assert payload["n"] == 600 and payload["classes"] == [f"class {c}" for c in range(4)]
    assert sum(e["count"] for e in payload["legend"]) == 600
    assert np.fromfile(served(payload["colour_url"]), dtype=np.uint8).tolist() == labels.tolist()
    assert np.fromfile(served(payload["labels_url"]), dtype=np.uint16).tolist() == labels.tolist()
    assert payload["thumbs"] is not None  # a small dataset's sprites are written on first view
    with pytest.raises(ValueError, match="600 images"):
        explore.map_payload(engine, run_id, "umap", made["coords"][:10], "label")

    evaluated = made["split"] == "test"
    stats = compute_statistics(made["embeddings"], labels, evaluated)
    ranker = explore.evaluated_index(engine, run_id, stats.evaluated)
    query = int(np.flatnonzero(evaluated)[0])
    [row] = explore.query_rows(ranker, stats, [query], 5, [f"class {c}" for c in range(4)])
    assert row["position"] == query and len(row["hits"]) == 5
    # results are other evaluated images, nearest first, and "correct" means the query's label
    hits = row["hits"]
    assert all(evaluated[h["position"]] and h["position"] != query for h in hits)
    assert [h["distance"] for h in hits] == sorted(h["distance"] for h in hits)
    assert all(h["correct"] == (labels[h["position"]] == labels[query]) for h in hits)
    with pytest.raises(ValueError, match="not one of the run's evaluated"):
        ranker.ranking(int(np.flatnonzero(~evaluated)[0]), 3)


def test_the_statistics_job_stores_statistics_and_a_big_run_s_approximate_index(engine, monkeypatch):
    """What a run's after-work job leaves: the statistics file (read back as the page reads it),
    and past APPROXIMATE_ABOVE images the approximate index that Explore then searches with."""
    from core.explore import search
    from core.explore.failures import STATISTICS_PARAMS
    from core.explore.projection import params_key
    from core.runs.worker import compute_statistics
    from storage import queries
    from storage.db import transaction
    from tests.helpers import clustered_run

    monkeypatch.setattr(search, "APPROXIMATE_ABOVE", 2_000)  # this run counts as big
    made = clustered_run(engine, 3_000, classes=5, seed=4)
    run_id = made["run_id"]
    assert explore.statistics_path(engine, run_id) is None
    row = compute_statistics(engine, run_id)
    assert row.status == "done", row.reason
    path = explore.statistics_path(engine, run_id)
    stats = explore.load_run_statistics(path)
    assert stats.labels.tolist() == made["labels"].tolist()
    assert stats.evaluated.tolist() == (made["split"] == "test").tolist()

    index = explore.load_run_index(engine, run_id).index
    assert index.kind == "ivf" and index.recall_at_10 >= 0.95 and index.size == 3_000
    assert "recall@10" in index.describe()
    # a second call finds the job done and computes nothing
    with transaction(engine) as session:
        first = queries.projection(session, run_id, "statistics", params_key(STATISTICS_PARAMS)).finished_at
    assert compute_statistics(engine, run_id).finished_at == first


def test_sprites_of_big_images_are_subsampled_and_two_channels_read_as_grey(lab_home):
    rng = np.random.default_rng(2)
    big = rng.integers(0, 256, (20, 200, 200, 3), dtype=np.uint8)
    thumbs = map_files.write_sprites(8, "8@t", big)
    assert thumbs.cell == 50  # every 4th pixel of 200
    sheet = np.asarray(Image.open(served(f"{thumbs.base}sheet-0.png")))
    np.testing.assert_array_equal(sheet[:50, 50:100], big[1, ::4, ::4])
    grey_alpha = rng.integers(0, 256, (5, 8, 8, 2), dtype=np.uint8)
    sheet = np.asarray(Image.open(served(f"{map_files.write_sprites(9, '9@t', grey_alpha).base}sheet-0.png")))
    np.testing.assert_array_equal(sheet[:8, 8:16], grey_alpha[1, :, :, 0])


def test_search_by_several_images_gives_each_and_all_together(engine):
    import io

    from core.data.images import ImageRejected
    from tests.helpers import completed_digits_run

    run_id = completed_digits_run(engine)
    pixels = explore.dataset_pixels(engine, 1)
    files = []
    for position in (3, 500):
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(pixels[position])[:, :, 0]).save(buffer, "PNG")
        files.append((buffer.getvalue(), f"digit-{position}.png"))
    index = explore.load_run_index(engine, run_id)
    each, together = explore.search_by_images(engine, run_id, files, 4, index)
    assert [len(hits) for hits in each] == [4, 4]
    # a stored image searched as an upload finds itself first
    assert each[0][0]["position"] == 3 and each[1][0]["position"] == 500
    single = explore.search_by_image(engine, run_id, files[0][0], files[0][1], 4, index)
    assert [h["position"] for h in single] == [h["position"] for h in each[0]]
    assert [h["distance"] for h in single] == pytest.approx([h["distance"] for h in each[0]], abs=1e-3)
    # together: the neighbours of the normalised mean of both images' embeddings
    stored = explore.run_embeddings(engine, run_id)
    _, ids = index.index.search_centroid(stored[[3, 500]], 4)
    assert [h["position"] for h in together] == ids[0].tolist()
    assert explore.search_by_images(engine, run_id, files[:1], 4, index)[1] is None
    with pytest.raises(ImageRejected, match="broken.png"):
        explore.search_by_images(engine, run_id, [files[0], (b"not an image", "broken.png")], 4, index)
    with pytest.raises(ValueError, match="at least one image"):
        explore.search_by_images(engine, run_id, [], 4, index)


def test_a_region_travels_in_a_link_as_ranges():
    from pages.explore_map import parse_region, region_text

    positions = [9, 1, 2, 3, 7, 10, 3]
    assert region_text(positions) == "1-3.7.9-10"
    assert parse_region("1-3.7.9-10", 11) == [1, 2, 3, 7, 9, 10]
    assert region_text([]) == ""
    for bad in ("3-1", "1-11", "x", "1..2", "-1", "4-"):
        with pytest.raises(ValueError):
            parse_region(bad, 11)
    # a region scattered over the dataset's order travels packed: ~1.8 characters a position
    import base64
    import zlib

    scattered = sorted(np.random.default_rng(0).choice(70_000, 500, replace=False).tolist())
    packed = region_text(scattered)
    assert packed.startswith("z") and len(packed) < 1000 and parse_region(packed, 70_000) == scattered
    with pytest.raises(ValueError):
        parse_region(packed, 1000)  # positions past the dataset
    bomb = "z" + base64.urlsafe_b64encode(zlib.compress(b"\x01" * 10_000_000)).decode()
    with pytest.raises(ValueError, match="more than the dataset holds"):
        parse_region(bomb, 1000)
    with pytest.raises(ValueError):
        parse_region("z!!!", 1000)


def test_a_searched_image_lands_among_its_neighbours_on_the_map():
    """place_on_map puts a query where its nearest images are: by the stored map's own nearest
    neighbours (2-D), the map point nearest the query is one of its nearest images in the
    embedding, and most of the map points around it are; query_marks uses the map's own scaling."""
    from core.explore.map_files import normalise_coordinates, normalise_like
    from core.explore.projection import project_pca
    from core.explore.search import NeighbourIndex
    from core.explore.service import place_on_map, query_marks

    rng = np.random.default_rng(0)
    # unit vectors near a 2-D patch of the sphere (clusters on it), so a 2-D map can keep their
    # neighbourhoods and the map's own kNN can be held to the embedding's
    plane, _ = np.linalg.qr(rng.normal(size=(16, 3)))
    flat = rng.normal(size=(6, 2))[rng.integers(0, 6, 600)] * 3 + rng.normal(size=(600, 2))
    embeddings = (plane[:, 0] * 40 + flat @ plane[:, 1:].T).astype(np.float32)
    embeddings += rng.normal(size=embeddings.shape).astype(np.float32) * 0.01
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    coords = project_pca(embeddings)
    index = NeighbourIndex(embeddings, approximate=False)
    landed = 0
    for source in rng.choice(600, 40, replace=False):
        query = embeddings[source] + rng.normal(size=16).astype(np.float32) * 0.002
        query /= np.linalg.norm(query)
        distances, ids = index.search(query[None], 10)
        hits = [{"position": int(i), "distance": float(d)} for d, i in zip(distances[0], ids[0])]
        placed = place_on_map(coords, hits)
        on_map = np.argsort(((coords - placed) ** 2).sum(axis=1))[:10]  # the map's own kNN of the place
        assert on_map[0] in set(ids[0].tolist())
        landed += len(set(on_map.tolist()) & set(ids[0].tolist())) >= 5
    assert landed >= 36  # 90% of the queries have most of their map neighbourhood right
    np.testing.assert_allclose(normalise_like(coords, coords), normalise_coordinates(coords), atol=1e-6)
    [mark] = query_marks(coords, ["q.png"], [hits])
    assert mark["name"] == "q.png" and abs(mark["x"]) <= 1 and abs(mark["y"]) <= 1
    with pytest.raises(ValueError, match="at least one neighbour"):
        place_on_map(coords, [])


def test_find_by_a_class_name_selects_that_class_only_and_else_by_file_name(engine):
    from core.data.datasets import save_dataset
    from tests.helpers import stored_run

    rng = np.random.default_rng(0)
    names = ["cat/8.png", "cat/18.png", "8/a.png", "8/b.png", "dog/x.png", "dog/y8.png"]
    dataset_id = save_dataset(engine, "pets", "upload", rng.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8),
                              ["cat", "cat", "8", "8", "dog", "dog"], names, [f"h{i}" for i in range(6)])
    run_id = stored_run(engine, dataset_id, rng.normal(size=(6, 4)), statistics=False)
    found, said = explore.find_images(engine, run_id, " 8 ")  # a class: its images, not the file names with an 8
    assert found == [2, 3] and said == "Found 2 images labelled '8'."
    found, said = explore.find_images(engine, run_id, "DOG")
    assert found == [4, 5] and said == "Found 2 images labelled 'DOG'."
    found, said = explore.find_images(engine, run_id, "y8")
    assert found == [5] and said == "Found 1 image whose file name contains 'y8'."
    assert explore.find_images(engine, run_id, "cow") == ([], "No class is named 'cow' and no file name contains it.")
    assert explore.find_images(engine, run_id, "  ")[0] == []


def test_explore_reads_a_run_s_labels_once_and_never_serves_another_database_s(engine, tmp_path, monkeypatch):
    """The Explore page asks for a run's labels on every rerun (a click on the map is one): the
    image table is read once per run, and another database whose run and dataset have the same
    ids (another data home) gets its own labels, not the first one's."""
    from core.explore import service
    from storage import queries
    from storage.db import make_engine
    from tests.helpers import clustered_run

    made = clustered_run(engine, 300, classes=3, seed=1, umap=False)
    reads = []
    real = queries.run_image_table
    monkeypatch.setattr(queries, "run_image_table", lambda session, run: reads.append(run.id) or real(session, run))
    first = service.explore_run(engine, made["run_id"]).labels
    assert first == made["labels"].tolist() and reads == [made["run_id"]]
    first.append(99)  # a caller changing its copy changes nobody else's
    assert service.explore_run(engine, made["run_id"]).labels == made["labels"].tolist()
    assert reads == [made["run_id"]]  # read once

    monkeypatch.setenv("EMBEDDING_LAB_HOME", str(tmp_path / "other"))
    other_engine = make_engine()
    try:
        other = clustered_run(other_engine, 200, classes=4, seed=2, umap=False)
        assert other["run_id"] == made["run_id"]  # the same ids, another database
        assert service.explore_run(other_engine, other["run_id"]).labels == other["labels"].tolist()
    finally:
        other_engine.dispose()
