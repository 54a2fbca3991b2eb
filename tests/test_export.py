"""Exporting a run: Parquet that reads back exactly, a folder TensorBoard's projector opens, the
encoder as safetensors; from core and from the command line, with nothing half-written on failure."""
import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.explore import export
from core.training.config import RunConfig
from core.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A data folder with: a one-epoch digits run with two stored UMAP maps (default parameters
    and others), an unlabeled RGB dataset whose run has stored embeddings and no checkpoint, a
    queued run (no embeddings), and a run whose stored checkpoint is damaged."""
    home = tmp_path_factory.mktemp("export") / "lab"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EMBEDDING_LAB_HOME", str(home))
        patch.delenv("EMBEDDING_LAB_DB", raising=False)
        from core.data.datasets import save_dataset
        from core.explore.projection import UMAP_DEFAULTS, params_key
        from storage import artifacts
        from storage.db import make_engine, transaction
        from storage.run_files import RunFiles
        from storage.schema import ProjectionRow, Run, utcnow
        from tests.helpers import completed_digits_run

        engine = make_engine()
        trained = completed_digits_run(engine)
        rng = np.random.default_rng(0)
        maps = {}
        for name, params in (("default", dict(UMAP_DEFAULTS)), ("other", dict(UMAP_DEFAULTS, n_neighbors=5))):
            maps[name] = rng.normal(size=(1797, 2)).astype(np.float32)
            relative = f"runs/{trained}/umap-{name}.npy"
            np.save(artifacts.absolute(relative), maps[name])
            with transaction(engine) as session:  # the other map finished last: the default must still win
                session.add(ProjectionRow(run_id=trained, method="umap", params_key=params_key(params), params=params,
                                          status="done", path=relative,
                                          finished_at=utcnow().replace(year=2000 if name == "default" else 2001)))

        pixels = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
        plain = save_dataset(engine, "plain", "upload", pixels, None, [f"img\t{i}.png" for i in range(10)],
                             [f"h{i}" for i in range(10)])
        embeddings = rng.normal(size=(10, 5)).astype(np.float32)
        with transaction(engine) as session:
            stored = Run(dataset_id=plain, kind="embed", config={}, status="completed")
            queued = Run(dataset_id=plain, kind="embed", config={}, status="queued")
            damaged = Run(dataset_id=plain, kind="embed", config={}, status="completed")
            session.add_all([stored, queued, damaged])
            session.flush()
            stored.embeddings = RunFiles(stored.id).relative("embeddings.npy")
            damaged.checkpoint = RunFiles(damaged.id).encoder
            RunFiles(stored.id).make(), RunFiles(damaged.id).make()
            ids = {"trained": trained, "stored": stored.id, "queued": queued.id, "damaged": damaged.id}
            np.save(artifacts.absolute(stored.embeddings), embeddings)
            artifacts.absolute(damaged.checkpoint).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
        yield {"home": home, "engine": engine, "ids": ids, "maps": maps, "pixels": pixels, "embeddings": embeddings}
        engine.dispose()


@pytest.fixture
def env(lab, monkeypatch):
    monkeypatch.setenv("EMBEDDING_LAB_HOME", str(lab["home"]))
    monkeypatch.delenv("EMBEDDING_LAB_DB", raising=False)
    return lab


def digits(engine, run_id):
    """(embeddings, labels, splits, classes) of the trained run, read from the store directly."""
    from core.data.datasets import load_arrays
    from core.explore.service import run_embeddings

    data = load_arrays(engine, 1)
    return run_embeddings(engine, run_id), data.labels, data.split, data.classes


def no_leftovers(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")], list(folder.iterdir())


# ---------------------------------------------------------------- parquet


def test_parquet_reads_back_exactly_with_the_default_map(env, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from core.explore.projection import project_pca

    run_id = env["ids"]["trained"]
    embeddings, labels, splits, classes = digits(env["engine"], run_id)
    path = export.export_run(env["engine"], run_id, "parquet", tmp_path / "e.parquet")
    assert path == (tmp_path / "e.parquet") and path.is_absolute()
    table = pq.read_table(path)
    assert table.num_rows == 1797
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), embeddings.shape[1])
    back = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    assert back.dtype == np.float32 and np.array_equal(back, embeddings)
    assert table.column("position").to_pylist() == list(range(1797))
    assert table.column("label").to_pylist() == labels.tolist()
    assert table.column("class").to_pylist() == [classes[i] for i in labels]
    assert table.column("split").to_pylist() == splits.tolist()
    np.testing.assert_array_equal(np.c_[table.column("umap_x"), table.column("umap_y")], env["maps"]["default"])
    np.testing.assert_allclose(np.c_[table.column("pca_x"), table.column("pca_y")], project_pca(embeddings), atol=1e-5)
    assert not set(export.STATISTICS_COLUMNS) & set(table.column_names)  # not computed yet
    assert json.loads(table.schema.metadata[b"embedding_lab"])["run"] == run_id


def test_parquet_of_an_unlabeled_run_without_a_map(env, tmp_path):
    import pyarrow.parquet as pq

    table = pq.read_table(export.export_run(env["engine"], env["ids"]["stored"], "parquet", tmp_path / "p.parquet"))
    assert table.num_rows == 10 and "umap_x" not in table.column_names and "pca_x" in table.column_names
    assert table.column("label").null_count == 10 and table.column("class").null_count == 10
    assert np.array_equal(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)), env["embeddings"])


def test_parquet_holds_the_runs_statistics_once_computed(env, tmp_path):
    """The statistics come from what the run stored, for the page and the command line alike;
    a damaged statistics file is a sentence, and nothing is written."""
    import pyarrow.parquet as pq

    from core.explore.service import load_run_statistics, statistics_path
    from core.runs.worker import compute_statistics

    engine, run_id = env["engine"], env["ids"]["trained"]
    assert compute_statistics(engine, run_id).status == "done"
    stats = load_run_statistics(statistics_path(engine, run_id))
    table = pq.read_table(export.export_run(engine, run_id, "parquet", tmp_path / "s.parquet"))
    for name, values in zip(export.STATISTICS_COLUMNS, (stats.ap, stats.nn_correct, stats.suspect_label,
                                                        stats.suspect_share)):
        np.testing.assert_array_equal(table.column(name).to_numpy(), values)
    assert np.isnan(table.column("average_precision").to_numpy()).sum() == (~stats.evaluated).sum()

    from storage import artifacts

    stored = artifacts.absolute(statistics_path(engine, run_id))
    kept = stored.read_bytes()
    stored.write_bytes(b"not an npz")
    try:
        with pytest.raises(ValueError, match=f"run {run_id}'s statistics cannot be read .* compute them again"):
            export.export_run(engine, run_id, "parquet", tmp_path / "t.parquet")
    finally:
        stored.write_bytes(kept)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.parquet"]


# ---------------------------------------------------------------- TensorBoard projector


def projector_config_class():
    """TensorBoard's ProjectorConfig message (projector_config.proto), built here: tensorboard
    itself is not installed, and its text-proto parser is protobuf's."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="projector_config.proto", package="tensorboard.projector",
                                               syntax="proto3")
    sprite = proto.message_type.add(name="SpriteMetadata")
    sprite.field.add(name="image_path", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    sprite.field.add(name="single_image_dim", number=2, type=F.TYPE_UINT32, label=F.LABEL_REPEATED)
    info = proto.message_type.add(name="EmbeddingInfo")
    for name, number in (("tensor_name", 1), ("metadata_path", 2), ("bookmarks_path", 3), ("tensor_path", 6)):
        info.field.add(name=name, number=number, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    info.field.add(name="tensor_shape", number=4, type=F.TYPE_UINT32, label=F.LABEL_REPEATED)
    info.field.add(name="sprite", number=5, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                   type_name=".tensorboard.projector.SpriteMetadata")
    config = proto.message_type.add(name="ProjectorConfig")
    config.field.add(name="model_checkpoint_path", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    config.field.add(name="embeddings", number=2, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED,
                     type_name=".tensorboard.projector.EmbeddingInfo")
    config.field.add(name="model_checkpoint_dir", number=3, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorboard.projector.ProjectorConfig"))


def test_projector_folder_opens_in_tensorboards_format(env, tmp_path):
    from google.protobuf import text_format

    from core.explore.service import dataset_pixels

    run_id = env["ids"]["trained"]
    embeddings, labels, splits, classes = digits(env["engine"], run_id)
    folder = export.export_run(env["engine"], run_id, "projector", tmp_path / "proj")
    tensors = np.loadtxt(folder / "tensors.tsv", delimiter="\t", dtype=np.float64)
    assert tensors.shape == embeddings.shape == (1797, RunConfig(dataset="digits").embedding_dim)
    assert np.array_equal(tensors.astype(np.float32), embeddings)  # 9 significant digits: float32 exactly
    lines = (folder / "metadata.tsv").read_text().splitlines()
    assert len(lines) == 1797 + 1 and lines[0] == "label\tsplit\tposition\tname"
    rows = [line.split("\t") for line in lines[1:]]
    assert all(len(row) == 4 for row in rows)
    assert [r[0] for r in rows] == [classes[i] for i in labels] and [r[1] for r in rows] == splits.tolist()
    assert [int(r[2]) for r in rows] == list(range(1797))

    config = text_format.Parse((folder / "projector_config.pbtxt").read_text(), projector_config_class()())
    (info,) = config.embeddings
    for named in (info.tensor_path, info.metadata_path, info.sprite.image_path):
        assert (folder / named).is_file(), named
    assert list(info.tensor_shape) == list(embeddings.shape)
    cell = 8  # digits are 8×8: 43 cells of 8 px fit easily
    assert list(info.sprite.single_image_dim) == [cell, cell]
    grid = math.ceil(math.sqrt(1797))
    picture = np.asarray(Image.open(folder / info.sprite.image_path))
    assert picture.shape == (grid * cell, grid * cell, 3) and grid * cell <= 8192
    pixels = dataset_pixels(env["engine"], 1)
    for position in (0, 1, grid, 1796):  # row-major, greyscale spread to RGB
        r, c = divmod(position, grid)
        tile = picture[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell]
        assert np.array_equal(tile, np.repeat(pixels[position], 3, axis=2)), position

    archive = export.export_run(env["engine"], run_id, "projector", tmp_path / "proj.zip")
    with zipfile.ZipFile(archive) as zf:
        assert sorted(zf.namelist()) == sorted(export.PROJECTOR_FILES)
        for name in export.PROJECTOR_FILES:
            assert zf.read(name) == (folder / name).read_bytes(), name
    no_leftovers(tmp_path)


def test_projector_metadata_of_unlabeled_images_keeps_one_row_per_image(env, tmp_path):
    folder = export.export_run(env["engine"], env["ids"]["stored"], "projector", tmp_path / "p")
    lines = (folder / "metadata.tsv").read_text().splitlines()
    assert len(lines) == 11 and all(len(line.split("\t")) == 4 for line in lines)  # "img\t3.png": the tab is gone
    assert lines[4].split("\t") == ["unlabeled", lines[4].split("\t")[1], "3", "img 3.png"]
    picture = np.asarray(Image.open(folder / "sprite.png"))
    assert picture.shape == (4 * 8, 4 * 8, 3)  # ceil(sqrt(10)) = 4 cells a side
    assert np.array_equal(picture[8:16, 0:8], env["pixels"][4])  # RGB images as they are


def test_sprite_cells_shrink_as_images_grow_in_number():
    cell = export.sprite_cell_size(1_000_000, 64)
    assert export.sprite_grid(1_000_000) == 1000 and cell * 1000 <= 8192 and (cell + 1) * 1000 > 8192
    assert export.sprite_cell_size(1_000_000, 4) == 4  # never enlarged
    for n in (1, 2, 1797, 70_000, 123_457, 4_000_000):
        grid, cell = export.sprite_grid(n), export.sprite_cell_size(n, 28)
        assert (grid - 1) ** 2 < n <= grid ** 2 and grid * cell <= 8192
        assert cell == 28 or grid * (cell + 1) > 8192
    with pytest.raises(ValueError, match="do not fit"):
        export.sprite_cell_size(8193 ** 2, 28)


def test_a_shrunk_sprite_cell_is_the_area_average_of_its_image():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (7, 8, 8, 1), dtype=np.uint8)
    picture = export.sprite(pixels, 4)
    assert picture.shape == (12, 12, 3)  # 3 cells of 4 px a side
    for position in range(7):
        r, c = divmod(position, 3)
        expected = pixels[position, :, :, 0].reshape(4, 2, 4, 2).mean(axis=(1, 3))
        tile = picture[r * 4:(r + 1) * 4, c * 4:(c + 1) * 4].astype(float)
        assert np.abs(tile - expected[..., None]).max() <= 1.0, position
    assert not picture[8:, 4:].any()  # cells 7 and 8 are empty


# ---------------------------------------------------------------- safetensors


def test_safetensors_is_the_stored_checkpoint_and_loads_back(env, tmp_path):
    from models.checkpoint import load_checkpoint
    from storage import artifacts
    from storage.db import transaction
    from storage.schema import Run

    run_id = env["ids"]["trained"]
    path = export.export_run(env["engine"], run_id, "safetensors", tmp_path / "enc.safetensors")
    with transaction(env["engine"]) as session:
        run = session.get(Run, run_id)
        stored, config = artifacts.absolute(run.checkpoint), dict(run.config)
    assert path.read_bytes() == stored.read_bytes()
    model, meta = load_checkpoint(path)
    assert meta["config"] == config and meta["in_channels"] == 1
    with pytest.raises(ValueError, match=r"run \d+'s encoder checkpoint: not a safetensors file.*not exported"):
        export.export_run(env["engine"], env["ids"]["damaged"], "safetensors", tmp_path / "bad.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc.safetensors"]


# ---------------------------------------------------------------- where it goes, and failures


def test_a_failure_mid_write_leaves_the_old_file_and_no_temporary(env, tmp_path, monkeypatch):
    run_id = env["ids"]["stored"]
    target = tmp_path / "e.parquet"
    target.write_bytes(b"an earlier export")

    def half_then_fail(table, path):
        Path(path).write_bytes(b"PAR1 half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "_write_parquet", half_then_fail)
    with pytest.raises(RuntimeError):
        export.export_run(env["engine"], run_id, "parquet", target, overwrite=True)
    assert target.read_bytes() == b"an earlier export"
    monkeypatch.setattr(export, "sprite", lambda pixels, cell: 1 / 0)
    for out in (tmp_path / "proj", tmp_path / "proj.zip"):
        with pytest.raises(ZeroDivisionError):
            export.export_run(env["engine"], run_id, "projector", out)
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.parquet"]


def test_what_may_be_replaced(env, tmp_path):
    engine, run_id = env["engine"], env["ids"]["stored"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (export.export_run(engine, run_id, "projector", empty) / "sprite.png").is_file()  # an empty folder is fine
    with pytest.raises(ValueError, match="not empty"):
        export.export_run(engine, run_id, "projector", empty)
    (empty / "sprite.png").write_bytes(b"old")
    export.export_run(engine, run_id, "projector", empty, overwrite=True)  # an old export is replaced whole
    assert (empty / "sprite.png").read_bytes().startswith(b"\x89PNG")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep")
    with pytest.raises(ValueError, match="holds files other than a projector export's"):
        export.export_run(engine, run_id, "projector", mine, overwrite=True)
    with pytest.raises(ValueError, match="is a folder"):
        export.export_run(engine, run_id, "parquet", mine, overwrite=True)
    assert (mine / "thesis.tex").read_text() == "keep"
    with pytest.raises(ValueError, match="unknown export format 'csv'"):
        export.export_run(engine, run_id, "csv", tmp_path / "x.csv")
    no_leftovers(tmp_path)


def test_export_filename():
    assert export.export_filename(12, "parquet") == "run-12-embeddings.parquet"
    assert export.export_filename(12, "projector") == "run-12-projector.zip"
    assert export.export_filename(12, "safetensors") == "run-12-encoder.safetensors"
    with pytest.raises(ValueError, match="unknown export format"):
        export.export_filename(12, "csv")


# ---------------------------------------------------------------- command line


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main(["export", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(code: int, err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_cli_exports_each_format_with_one_json_line(env, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_id = str(env["ids"]["trained"])
    for fmt, out in (("parquet", "e.parquet"), ("projector", "p.zip"), ("safetensors", "enc.safetensors")):
        code, stdout, _ = run_cli(capsys, "--run", run_id, "--format", fmt, "--out", out)
        assert code == 0
        (line,) = stdout.splitlines()
        result = json.loads(line)
        assert result == {"run": int(run_id), "format": fmt, "path": str(tmp_path / out),
                          "rows": None if fmt == "safetensors" else 1797}
        assert (tmp_path / out).is_file()
    code, _, err = run_cli(capsys, "--run", run_id, "--format", "parquet", "--out", "e.parquet")
    one_error_line(code, err, "e.parquet already exists")
    code, stdout, _ = run_cli(capsys, "--run", run_id, "--format", "parquet", "--out", "e.parquet", "--overwrite")
    assert code == 0 and json.loads(stdout)["rows"] == 1797

    # the whole way, as a user runs it
    env_vars = dict(os.environ, EMBEDDING_LAB_HOME=str(env["home"]))
    env_vars.pop("EMBEDDING_LAB_DB", None)
    done = subprocess.run([sys.executable, "-m", "core", "export", "--run", run_id, "--format", "projector",
                           "--out", str(tmp_path / "tb")], cwd=ROOT, env=env_vars, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["path"] == str(tmp_path / "tb") and (tmp_path / "tb" / "tensors.tsv").is_file()


def test_cli_mistakes_are_one_line_and_leave_nothing(env, tmp_path, capsys):
    ids = env["ids"]
    out = tmp_path / "x"
    cases = [
        (("--run", "999", "--format", "parquet", "--out", str(out)), "run 999 does not exist"),
        ((("--run", str(ids["trained"]), "--format", "csv", "--out", str(out))), "unknown export format 'csv'"),
        (("--run", str(ids["queued"]), "--format", "parquet", "--out", str(out)), "has no embeddings to export"),
        (("--run", str(ids["queued"]), "--format", "projector", "--out", str(out)), "it is queued"),
        (("--run", str(ids["stored"]), "--format", "safetensors", "--out", str(out)), "has no encoder checkpoint"),
        (("--run", str(ids["damaged"]), "--format", "safetensors", "--out", str(out)), "not a safetensors file"),
        (("--run", str(ids["stored"]), "--format", "parquet", "--out", str(tmp_path / "nope" / "x")),
         "does not exist"),
    ]
    for args, fragment in cases:
        code, stdout, err = run_cli(capsys, *args)
        one_error_line(code, err, fragment)
        assert stdout == ""
    assert list(tmp_path.iterdir()) == []
