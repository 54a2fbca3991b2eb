"""Export a completed run: its embeddings as Parquet, a folder (or zip) TensorBoard's projector
opens, or its encoder as safetensors. The Explore page's download buttons and
`python -m core export` both call `export_run` with nothing but the run, the format and the
target, so the two files cannot differ: everything an export holds (the per-image statistics
too) is read here from what the run stored.

Every export is written under a temporary name beside its target (NAME.<pid>.tmp, the name
storage.artifacts.clean_leftovers recognises) and renamed into place, so a failure never leaves
half a file; an existing target is replaced only when asked to.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
from sqlalchemy import Engine, select

from core.metric.categories import MINING_COLUMNS as TALLY_COLUMNS
from core.training.tally_files import load_mining_counts
from storage import artifacts, queries
from storage.db import transaction
from storage.schema import ProjectionRow, Run
from storage.status import ACTIVE

FORMATS = ("parquet", "projector", "safetensors")
SPRITE_MAX_SIDE = 8192  # TensorBoard's projector refuses a sprite wider or taller than this
PROJECTOR_FILES = ("tensors.tsv", "metadata.tsv", "sprite.png", "projector_config.pbtxt")
BASE_COLUMNS = ("position", "name", "label", "class", "split", "embedding", "umap_x", "umap_y", "pca_x", "pca_y")
# a training run's per-image mining counts summed over its epochs (core.training.tally_files); absent for other runs
MINING_COLUMNS = tuple(f"{name}_uses" for name in TALLY_COLUMNS)  # core.metric.categories.MINING_COLUMNS
# the run's per-image failure statistics (core.explore.failures.RunStatistics), once its statistics job is done
STATISTICS_COLUMNS = ("average_precision", "nn_correct", "suspect_label", "suspect_share")
# the run's version of the dataset (core.data.versions): which images it excluded, each image's tags;
# only when that version excludes or tags some
VERSION_COLUMNS = ("excluded", "tags")
_SUFFIXES = {"parquet": "embeddings.parquet", "projector": "projector.zip", "safetensors": "encoder.safetensors"}


def export_filename(run_id: int, fmt: str) -> str:
    """The file name a download of this export gets, e.g. run-12-embeddings.parquet."""
    _check_format(fmt)
    return f"run-{run_id}-{_SUFFIXES[fmt]}"


def export_run(engine: Engine, run_id: int, fmt: str, out: Path, overwrite: bool = False) -> Path:
    """Write run `run_id` in format `fmt` to `out`; returns its absolute path.

    parquet: one row per image (see BASE_COLUMNS; umap_x/umap_y only when the run has a map; the
    MINING_COLUMNS only for a training run that stored its mining counts; the STATISTICS_COLUMNS
    once the run's statistics are computed; the VERSION_COLUMNS only when the run's version of the
    dataset excludes or tags images). Labels are those of the version the run ran on. projector: a
    folder, or a zip when `out` ends in .zip. safetensors: a validated copy of the run's encoder checkpoint.
    ValueError / LookupError with a sentence for an unknown run or format, a run without what the
    format needs, an `out` whose folder does not exist, or one that exists (unless overwrite=True).
    """
    _check_format(fmt)
    out = Path(out).expanduser().absolute()
    _check_outside_the_lab(out)
    folder_target = fmt == "projector" and out.suffix.lower() != ".zip"
    if fmt == "safetensors":
        source = _checkpoint_of(engine, run_id)
        _check_target(out, folder_target, overwrite)
        _write_file(out, lambda tmp: shutil.copyfile(source, tmp))
        return out
    data = load_export_data(engine, run_id)
    _check_target(out, folder_target, overwrite)
    if fmt == "parquet":
        table = parquet_table(data)
        _write_file(out, lambda tmp: _write_parquet(table, tmp))
    elif folder_target:
        _write_folder(out, lambda tmp: _write_projector(data, tmp), overwrite)
    else:
        staging = artifacts.temp_file_for(out.with_name(f"{out.name}.files"))  # NAME.files.<pid>.tmp
        _write_file(out, lambda tmp: _write_projector_zip(data, tmp, staging))
    return out


def exported_rows(engine: Engine, run_id: int, fmt: str) -> Optional[int]:
    """How many rows (images) an export of the run holds; None for safetensors (weights, no rows)."""
    _check_format(fmt)
    if fmt == "safetensors":
        return None
    with transaction(engine) as session:
        run = session.get(Run, run_id)
        return None if run is None else run.dataset.n_images


# ---------------------------------------------------------------- what an export holds


@dataclass
class ExportData:
    """A completed run's embeddings with its dataset's per-image table, read once."""

    run_id: int
    dataset_id: int
    dataset_name: str
    config: dict
    embeddings: np.ndarray  # (N, d) float32
    positions: np.ndarray  # (N,) int64
    names: list[str]
    labels: list[Optional[int]]
    splits: list[str]
    classes: list[str]
    image_size: int
    pixels_file: Path  # the dataset's pixels.npy
    umap: Optional[np.ndarray]  # (N, 2) float32, the run's map when one is done
    umap_params: Optional[dict]
    mining: Optional[np.ndarray] = None  # (N, 3) int64 mining counts over the epochs, core.metric.categories.MINING_COLUMNS
    dataset_version: int = 1  # the version of the dataset the run ran on, whose labels `labels` are
    excluded: Optional[list[bool]] = None  # per image: left out by that version (None: it excludes none)
    tags: Optional[list[list[str]]] = None  # per image: that version's tags (None: it tags none)
    statistics: Optional[dict[str, np.ndarray]] = None  # STATISTICS_COLUMNS, each (N,), once computed

    @property
    def class_names(self) -> list[Optional[str]]:
        return [None if label is None else self.classes[label] for label in self.labels]


def load_export_data(engine: Engine, run_id: int) -> ExportData:
    """The run's embeddings, image table and map; LookupError / ValueError when it has none."""
    from core.data.datasets import pixels_path

    with transaction(engine) as session:
        run = queries.get_run(session, run_id)
        if run.status != "completed" or not run.embeddings:
            raise ValueError(f"run {run_id} has no embeddings to export (it is {run.status}); "
                             "only a completed run has them")
        dataset = run.dataset
        table = queries.run_image_table(session, run)  # the labels of the version it ran on
        umap_row = _stored_map(session, run_id)
        statistics_file = _stored_statistics(session, run_id)
        umap_path, umap_params = (umap_row.path, dict(umap_row.params)) if umap_row else (None, None)
        data = dict(run_id=run_id, dataset_id=dataset.id, dataset_name=dataset.name,
                    dataset_version=run.dataset_version, config=dict(run.config),
                    classes=list(dataset.classes), image_size=dataset.image_size, umap_params=umap_params,
                    pixels_file=pixels_path(dataset))
        embeddings_path = run.embeddings
    embeddings = np.asarray(_load_array(embeddings_path, f"run {run_id}'s embeddings"), dtype=np.float32)
    if embeddings.ndim != 2 or len(embeddings) != len(table):
        raise ValueError(f"run {run_id}'s embeddings hold {embeddings.shape[0]} rows for the dataset's "
                         f"{len(table)} images; the stored file does not belong to this dataset")
    umap = None
    if umap_path is not None:
        umap = np.asarray(_load_array(umap_path, f"run {run_id}'s UMAP map"), dtype=np.float32)
        if umap.shape != (len(table), 2):
            raise ValueError(f"run {run_id}'s UMAP map has shape {umap.shape}, expected ({len(table)}, 2); "
                             "compute the map again")
    mining = load_mining_counts(run_id)
    if mining is not None and len(mining) != len(table):
        raise ValueError(f"run {run_id}'s mining counts hold {len(mining)} images for the dataset's {len(table)}; "
                         "the stored files do not belong to this dataset")
    excluded = [image.excluded for image in table]
    tags = [list(image.tags) for image in table]
    statistics = None
    if statistics_file is not None:
        statistics = _statistics_columns(run_id, statistics_file, len(table))
    return ExportData(embeddings=embeddings, positions=np.array([image.position for image in table], dtype=np.int64),
                      names=[image.name for image in table], labels=[image.label for image in table],
                      splits=[image.split for image in table], umap=umap, mining=mining, statistics=statistics,
                      excluded=excluded if any(excluded) else None, tags=tags if any(tags) else None, **data)


def _stored_statistics(session, run_id: int) -> Optional[str]:
    """The run's done statistics file (relative to the data home), as the Explore page reads it."""
    from core.explore.failures import STATISTICS_PARAMS
    from core.explore.projection import params_key

    row = queries.projection(session, run_id, "statistics", params_key(STATISTICS_PARAMS))
    return row.path if row is not None and row.status == "done" and row.path else None


def _statistics_columns(run_id: int, relative: str, n: int) -> dict[str, np.ndarray]:
    """The STATISTICS_COLUMNS of the run's stored statistics; ValueError when the file is gone,
    damaged or holds another number of images (the page then asks to compute them again)."""
    from core.explore.failures import load_statistics

    try:
        stats = load_statistics(artifacts.absolute(relative))
    except (LookupError, ValueError) as exc:
        raise ValueError(f"run {run_id}'s statistics cannot be read ({exc}); compute them again: "
                         f"python -m core project --run {run_id}") from None
    if len(stats.ap) != n:
        raise ValueError(f"run {run_id}'s statistics hold {len(stats.ap)} images for the dataset's {n}; "
                         f"compute them again: python -m core project --run {run_id}")
    return {"average_precision": stats.ap, "nn_correct": stats.nn_correct,
            "suspect_label": stats.suspect_label, "suspect_share": stats.suspect_share}


def _stored_map(session, run_id: int) -> Optional[ProjectionRow]:
    """The run's done UMAP map: the one with default parameters when there is one, else the
    newest done one (a run mapped only with other parameters still exports its map)."""
    from core.explore.projection import UMAP_DEFAULTS, params_key

    rows = session.scalars(
        select(ProjectionRow)
        .where(ProjectionRow.run_id == run_id, ProjectionRow.method == "umap", ProjectionRow.status == "done",
               ProjectionRow.path.is_not(None))
        .order_by(ProjectionRow.finished_at.desc(), ProjectionRow.id.desc())
    ).all()
    default = params_key(UMAP_DEFAULTS)
    return next((row for row in rows if row.params_key == default), rows[0] if rows else None)


def _load_array(relative: str, what: str) -> np.ndarray:
    try:
        return np.load(artifacts.absolute(relative))
    except FileNotFoundError:
        raise ValueError(f"{what} file is missing ({artifacts.absolute(relative)})") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{what} file cannot be read ({exc})") from None


def _checkpoint_of(engine: Engine, run_id: int) -> Path:
    """The run's stored encoder, once models.checkpoint has validated it whole."""
    from models.checkpoint import CheckpointError, validate_checkpoint

    with transaction(engine) as session:
        run = queries.get_run(session, run_id)
        if run.status in ACTIVE:  # its checkpoint is the last epoch's, replaced at the next
            raise ValueError(f"run {run_id} is still {run.status}: its encoder checkpoint is an intermediate one; "
                             "export it once the run has completed (or cancel the run first)")
        if not run.checkpoint:
            raise ValueError(f"run {run_id} has no encoder checkpoint to export (it is {run.status} "
                             "and has saved none)")
        path = artifacts.absolute(run.checkpoint)
    if not path.is_file():
        raise ValueError(f"run {run_id}'s encoder checkpoint file is missing ({path})")
    try:
        validate_checkpoint(path, f"run {run_id}'s encoder checkpoint")
    except CheckpointError as exc:
        raise ValueError(f"{exc}; it is not exported") from None
    return path


# ---------------------------------------------------------------- parquet


def parquet_table(data: ExportData):
    """A pyarrow Table: one row per image, the embedding a fixed-size list<float32> column;
    average_precision is NaN for an image that is no query, suspect_label -1 where there is none."""
    import pyarrow as pa

    from core.explore.projection import project_pca

    n, dim = data.embeddings.shape
    columns = {
        "position": pa.array(data.positions, pa.int64()),
        "name": pa.array(data.names, pa.string()),
        "label": pa.array(data.labels, pa.int64()),
        "class": pa.array(data.class_names, pa.string()),
        "split": pa.array(data.splits, pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(data.embeddings.reshape(-1), pa.float32()), dim),
    }
    if data.umap is not None:
        columns["umap_x"] = pa.array(data.umap[:, 0], pa.float32())
        columns["umap_y"] = pa.array(data.umap[:, 1], pa.float32())
    pca = project_pca(data.embeddings) if n else np.zeros((0, 2), np.float32)
    columns["pca_x"] = pa.array(pca[:, 0], pa.float32())
    columns["pca_y"] = pa.array(pca[:, 1], pa.float32())
    if data.mining is not None:
        for i, name in enumerate(MINING_COLUMNS):
            columns[name] = pa.array(data.mining[:, i], pa.int64())
    for name, values in (data.statistics or {}).items():
        columns[name] = pa.array(values)
    if data.excluded is not None:
        columns["excluded"] = pa.array(data.excluded, pa.bool_())
    if data.tags is not None:
        columns["tags"] = pa.array(data.tags, pa.list_(pa.string()))
    metadata = {"run": data.run_id, "dataset": data.dataset_name, "dataset_id": data.dataset_id,
                "dataset_version": data.dataset_version,
                "classes": data.classes, "embedding_dim": dim, "config": data.config, "umap_params": data.umap_params}
    return pa.table(columns).replace_schema_metadata({"embedding_lab": json.dumps(metadata)})


def _write_parquet(table, path: Path) -> None:
    import pyarrow.parquet as pq

    pq.write_table(table, str(path))


# ---------------------------------------------------------------- TensorBoard projector


def sprite_cell_size(n_images: int, image_size: int, max_side: int = SPRITE_MAX_SIDE) -> int:
    """Side in pixels of one image in the projector's sprite: the image's own size, shrunk so
    ceil(sqrt(n)) cells fit in max_side. ValueError when even one pixel per image does not fit."""
    grid = sprite_grid(n_images)
    cell = min(int(image_size), max_side // grid)
    if cell < 1:
        raise ValueError(f"{n_images} images do not fit in a {max_side}×{max_side} sprite even at one pixel each; "
                         "TensorBoard's projector cannot show them")
    return cell


def sprite_grid(n_images: int) -> int:
    """Cells per side of the square sprite: ceil(sqrt(n)), at least 1."""
    return max(1, math.isqrt(max(n_images, 1) - 1) + 1)


def sprite(pixels: np.ndarray, cell: int) -> np.ndarray:
    """(grid·cell, grid·cell, 3) uint8: images tiled row-major, each area-resampled to cell × cell
    (one image row of the grid at a time, so a memory-mapped dataset is read in strips), greyscale
    spread to RGB, unused cells black."""
    from PIL import Image

    n, size = len(pixels), pixels.shape[1]
    grid = sprite_grid(n)
    canvas = np.zeros((grid * cell, grid * cell, 3), np.uint8)
    for row, start in enumerate(range(0, n, grid)):
        strip = np.asarray(pixels[start:start + grid])
        strip = np.repeat(strip, 3, axis=3) if strip.shape[3] == 1 else strip[..., :3]
        k = len(strip)
        tiled = strip.transpose(1, 0, 2, 3).reshape(size, k * size, 3)  # k images side by side
        if cell != size:  # a box filter over the whole strip is exact per image: S/cell source pixels each
            tiled = np.asarray(Image.fromarray(tiled).resize((k * cell, cell), Image.Resampling.BOX))
        canvas[row * cell:(row + 1) * cell, :k * cell] = tiled
    return canvas


def projector_config(data: ExportData, cell: int) -> str:
    """projector_config.pbtxt: TensorBoard's ProjectorConfig text proto naming the three files."""
    return (
        "embeddings {\n"
        f"  tensor_name: {json.dumps(f'run-{data.run_id}')}\n"
        f"  tensor_shape: [{data.embeddings.shape[0]}, {data.embeddings.shape[1]}]\n"
        '  tensor_path: "tensors.tsv"\n'
        '  metadata_path: "metadata.tsv"\n'
        "  sprite {\n"
        '    image_path: "sprite.png"\n'
        f"    single_image_dim: [{cell}, {cell}]\n"
        "  }\n"
        "}\n"
    )


def _tsv_field(value) -> str:
    """A metadata cell: tabs and line breaks would split the row, so they become spaces."""
    return " ".join(str(value).replace("\t", " ").splitlines()) if value is not None else ""


def _write_projector(data: ExportData, folder: Path) -> None:
    """The projector's four files into `folder`."""
    from PIL import Image

    cell = sprite_cell_size(len(data.embeddings), data.image_size)
    pixels = np.load(data.pixels_file, mmap_mode="r")  # (N, S, S, C) uint8, as core.explore.service.dataset_pixels
    if len(pixels) != len(data.embeddings):
        raise ValueError(f"dataset {data.dataset_name!r} has {len(pixels)} stored images for "
                         f"{len(data.embeddings)} embeddings; its pixel file does not match")
    with open(folder / "tensors.tsv", "wb") as handle:
        np.savetxt(handle, data.embeddings, fmt="%.9g", delimiter="\t")  # 9 digits: float32 exactly
    lines = ["label\tsplit\tposition\tname"]
    lines += [f"{_tsv_field(c or 'unlabeled')}\t{_tsv_field(s)}\t{p}\t{_tsv_field(name)}"
              for c, s, p, name in zip(data.class_names, data.splits, data.positions, data.names)]
    (folder / "metadata.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    # zlib level 1: a 70k-image sprite of noisy pictures takes 3.5 s against 16 s at the default 6
    Image.fromarray(sprite(pixels, cell)).save(folder / "sprite.png", "PNG", compress_level=1)
    (folder / "projector_config.pbtxt").write_text(projector_config(data, cell), encoding="utf-8")


def _write_projector_zip(data: ExportData, path: Path, staging: Path) -> None:
    """The projector's files, written into the folder `staging`, then at the root of the zip
    `path`: text deflated quickly, the PNG stored as it is (it is compressed already)."""
    staging.mkdir()
    try:
        _write_projector(data, staging)
        with zipfile.ZipFile(path, "w") as archive:
            for name in PROJECTOR_FILES:
                packed = zipfile.ZIP_STORED if name.endswith(".png") else zipfile.ZIP_DEFLATED
                archive.write(staging / name, name, compress_type=packed, compresslevel=1)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------- where it goes


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")


def _check_outside_the_lab(out: Path) -> None:
    """Refuse a target inside the data folder or at the database file: `--out <home>/lab.db
    --overwrite` once replaced the database with a Parquet file, and `--out
    <home>/runs/3/embeddings.npy --overwrite` broke a completed run. Paths are compared resolved
    (symbolic links followed), so a link elsewhere that points in is refused too."""
    from sqlalchemy.engine import make_url

    from storage.settings import data_home, database_url

    target = out.resolve()
    home = data_home().resolve()
    if target == home or target.is_relative_to(home):
        raise ValueError(f"cannot write {out}: it is inside the data folder {home}, whose files the runs and "
                         "datasets own; export to a path outside it")
    url = make_url(database_url())
    if url.get_backend_name() == "sqlite" and url.database:
        database = Path(url.database).expanduser().resolve()
        if target in (database, database.with_name(database.name + "-wal"), database.with_name(database.name + "-shm"),
                      database.with_name(database.name + "-journal")):
            raise ValueError(f"cannot write {out}: it is the database {database}; export to another path")


def _check_target(out: Path, folder: bool, overwrite: bool) -> None:
    """Refuse a target whose folder does not exist, or one that exists (a file, or a folder that
    is not empty) unless overwrite; a folder is only ever replaced by a projector export, and
    only when it holds nothing but a projector export's files."""
    if not out.parent.is_dir():
        raise ValueError(f"cannot write {out}: the folder {out.parent} does not exist")
    if not (out.exists() or out.is_symlink()):
        return
    if out.is_dir() and not out.is_symlink():
        if not folder:
            raise ValueError(f"{out} is a folder; give a file path such as {out / 'export'}")
        entries = sorted(entry.name for entry in out.iterdir())
        if not entries:
            return
        if not overwrite:
            raise ValueError(f"{out} is a folder that is not empty; choose another path or overwrite it")
        if not set(entries) <= set(PROJECTOR_FILES):
            raise ValueError(f"{out} holds files other than a projector export's ({', '.join(entries[:3])}); "
                             "it is not replaced")
        return
    if folder:
        raise ValueError(f"{out} is a file; a projector export is a folder (or give a path ending in .zip)")
    if not overwrite:
        raise ValueError(f"{out} already exists; choose another path or overwrite it")


def _write_file(out: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) fills a temporary file beside `out`, flushed to disk, then renamed over it."""
    with _temporary(out) as tmp:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, out)


def _write_folder(out: Path, write: Callable[[Path], None], overwrite: bool) -> None:
    """write(tmp) fills a temporary folder beside `out`, then it takes out's place; an old export
    there is moved aside first and removed once the new one is in."""
    with _temporary(out) as tmp:
        tmp.mkdir()
        write(tmp)
        if out.is_dir() and any(out.iterdir()):  # _check_target allowed it: overwrite of an old export
            old = out.with_name(f"{out.name}.old.{os.getpid()}.tmp")
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)  # onto nothing, or onto an empty folder


@contextmanager
def _temporary(out: Path) -> Iterator[Path]:
    tmp = artifacts.temp_file_for(out)
    try:
        yield tmp
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
