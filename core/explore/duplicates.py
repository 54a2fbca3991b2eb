"""Duplicates and leakage as the command line and the Data page ask for them (core.data.duplicates
finds them): by a dataset's pixels, or by a run's embeddings; findings kept in a file; a job of
its own for the page.

A finding (positions and distances, no labels) is stored beside what it was computed from: under
the dataset's folder for the pixel measure, under the run's folder (storage.run_files) for its
embeddings, one file per threshold. It records its source (the dataset's cache key, or the run's
embeddings file), so a file left by a dataset or run of the same id, or by another descriptor
version, is never read back. Names, labels and splits are read from the image table each time.

On Fashion-MNIST's 70,000 images the pixel search takes seconds of CPU (core.data.duplicates.near_pairs),
too long for a Streamlit script thread; the page starts `python -m core duplicates ...` as a process
of its own (start_job), shows job_state while it runs, and reads the stored finding when it is done.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from sqlalchemy import Engine

from core import access
from core.data import duplicates
from core.data.datasets import pixels_path
from core.data.duplicates import DuplicateReport, Finding
from core.data.duplicates.near_pairs import NearPairs
from storage import artifacts, queries
from storage.db import transaction
from storage.run_files import RunFiles
from storage.settings import DB_ENV, HOME_ENV, data_home, database_url
from storage.status import RunStatus

PROJECT_ROOT = Path(__file__).resolve().parents[2]
FOLDER = "duplicates"  # inside the dataset's folder
_FORMAT = 1


@dataclass(frozen=True)
class Target:
    """What a search looks at: a dataset, and a run of it when the measure is its embeddings."""

    dataset_id: int
    dataset: str
    dataset_key: str
    run_id: Optional[int]
    embeddings: Optional[str]  # the run's embeddings file, relative to the data home
    pixels: Path
    version: int = 1  # whose labels and exclusions the report shows (the finding is the images')

    @property
    def measure(self) -> str:
        return "pixels" if self.run_id is None else "embeddings"

    @property
    def source(self) -> str:
        """What a stored finding must have been computed from to be read back."""
        if self.run_id is None:
            return f"dataset {self.dataset_key} descriptor {duplicates.DESCRIPTOR_VERSION}"
        return f"run {self.run_id} embeddings {self.embeddings}"

    def path(self, threshold: float) -> Path:
        """The stored finding's file for `threshold`; its job's pid and log sit beside it."""
        name = f"{self.measure}-t{threshold:.6g}.npz"
        if self.run_id is None:
            return artifacts.absolute(artifacts.dataset_folder(self.dataset_id)) / FOLDER / name
        return artifacts.absolute(RunFiles(self.run_id).duplicates_folder) / name


def default_threshold(run_id: Optional[int]) -> float:
    return duplicates.PIXEL_THRESHOLD if run_id is None else duplicates.EMBEDDING_THRESHOLD


def parse_run_id(value) -> Optional[int]:
    """None, or the run id as an int; ValueError with a sentence for anything but a whole number."""
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip()
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"a run id is a whole number, got {value!r}; `python -m core runs` lists them")
    return int(text)


def target(engine: Engine, dataset: Optional[str | int], run_id: Optional[str | int] = None) -> Target:
    """The dataset (by name, id or NAME@VERSION, as everywhere: core.data.versions) and the run.

    With a run, the dataset may be left out (the run's is used, at the version it trained on);
    given, it must be the run's. The version's labels and exclusions are what the report shows (a
    bare name: its newest version). LookupError for an unknown dataset, version or run; ValueError
    for a run with no embeddings, or of another dataset."""
    run_id = parse_run_id(run_id)
    embeddings = None
    if run_id is not None:
        with transaction(engine) as session:
            run = queries.get_run(session, run_id)
            if not run.embeddings:
                raise ValueError(f"run {run_id} has no embeddings to look for duplicates in (it is {run.status}); "
                                 "leave out --run to compare the pixels")
            run_dataset, embeddings, run_version = run.dataset_id, run.embeddings, run.dataset_version
        if dataset is None:
            dataset = f"{run_dataset}@{run_version}" if isinstance(run_version, int) else run_dataset
    if dataset is None or (isinstance(dataset, str) and not dataset.strip()):
        raise ValueError("name a dataset (--dataset NAME) or a run (--run ID); `python -m core datasets` lists them")
    from core.data.versions import resolve_dataset_version

    found, version = resolve_dataset_version(engine, str(dataset) if isinstance(dataset, str) else dataset)
    if run_id is not None and found.id != run_dataset:
        raise ValueError(f"run {run_id} embedded dataset {run_dataset}, not {found.name!r}; "
                         "leave out --dataset or name the run's")
    with transaction(engine) as session:
        stored = queries.get_dataset(session, found.id)
        path = pixels_path(stored)
        return Target(stored.id, stored.name, stored.cache_key, run_id, embeddings, path, version)


def runs_with_embeddings(engine: Engine, dataset_id: int) -> list[int]:
    """The ids of the dataset's runs that have embeddings to compare by, newest first."""
    with transaction(engine) as session:
        return [run.id for run in queries.list_runs(session, dataset_id)
                if run.embeddings and run.status == RunStatus.COMPLETED]


def find_duplicates(engine: Engine, dataset: Optional[str | int], run_id: Optional[str | int] = None,
                    threshold=None) -> DuplicateReport:
    """The report of the dataset (or run): the stored finding for this threshold when there is
    one, else computed here and stored. ValueError / LookupError with a sentence for bad input."""
    chosen = target(engine, dataset, run_id)
    threshold = duplicates.check_threshold(default_threshold(chosen.run_id) if threshold is None else threshold)
    finding = load_finding(chosen, threshold)
    if finding is None:
        finding = compute(engine, chosen, threshold)
        save_finding(chosen, finding)
    return report_of(engine, chosen, finding)


def stored_report(engine: Engine, chosen: Target, threshold: float) -> Optional[DuplicateReport]:
    """The report from the stored finding, None when there is none (the page's read: no search here)."""
    finding = load_finding(chosen, duplicates.check_threshold(threshold))
    return None if finding is None else report_of(engine, chosen, finding)


def compute(engine: Engine, chosen: Target, threshold: float) -> Finding:
    access.require("compute")
    pixels = np.load(chosen.pixels, mmap_mode="r")
    if chosen.run_id is None:
        return duplicates.find_in_pixels(pixels, threshold)
    from core.explore.service import run_embeddings

    return duplicates.find_in_embeddings(pixels, run_embeddings(engine, chosen.run_id), threshold)


def report_of(engine: Engine, chosen: Target, finding: Finding) -> DuplicateReport:
    with transaction(engine) as session:
        table = queries.dataset_image_table(session, chosen.dataset_id, chosen.version)
        classes = list(queries.get_dataset(session, chosen.dataset_id).classes)
    return duplicates.report(finding, chosen.dataset_id, chosen.dataset, [image.name for image in table],
                             [image.label for image in table], [image.split for image in table], classes,
                             run_id=chosen.run_id, excluded=[image.excluded for image in table],
                             version=chosen.version)


def exclude_duplicates(engine: Engine, found: DuplicateReport, what: str = "copies") -> tuple[int, int]:
    """"Exclude duplicates": a new version of the dataset over the version `found` shows, without
    the images positions_to_exclude names (`what`: "copies" keeps one image of each group, "leaks"
    removes the test images with a training copy). Returns (its number, images excluded).
    ValueError / LookupError with a sentence when there is nothing to exclude, or from
    make_version's own checks; nothing is stored then."""
    from core.data.versions import edit_selection

    positions = duplicates.positions_to_exclude(found, what)
    if not positions:
        kind = "copies" if what == "copies" else "test images with a training copy"
        raise ValueError(f"version {found.version} of {found.dataset!r} has no {kind} to exclude "
                         f"at threshold {found.threshold:g}")
    by = "pixels" if found.run_id is None else f"run {found.run_id}'s embeddings"
    note = f"excluded {len(positions)} duplicates by {by} within {found.threshold:g}: {duplicates.EXCLUSIONS[what]}"
    number = edit_selection(engine, found.dataset_id, positions, exclude=True, note=note, parent=found.version)
    return number, len(positions)


def report_lines(found: DuplicateReport) -> list[str]:
    """The command line's text: each group (position, label, split, distance to its first member,
    file name), then the summary."""
    lines = []
    measure = "pixel descriptors" if found.measure == "pixels" else f"run {found.run_id}'s embeddings"
    near = f"near copies (within {found.threshold:g} by {measure})"
    for title, groups in (("exact copies", found.exact), (near, found.near)):
        for number, group in enumerate(groups, 1):
            notes = [note for note, flag in (("labels disagree", group.labels_disagree),
                                             ("train and test", group.spans_splits)) if flag]
            lines.append(f"{title} · group {number} of {len(groups)}" + (f" · {', '.join(notes)}" if notes else ""))
            for m in group.members:
                lines.append(f"  {m.position:>7}  {str(m.label or '-'):<14} {m.split:<5}  {m.distance:.4f}  {m.name}")
    s = found.summary()
    left_out = f" ({s['excluded_by_version']:,} excluded, left out)" if s["excluded_by_version"] else ""
    lines.append(f"{found.dataset}@{found.version}: {s['images']:,} images{left_out} · "
                 f"{s['exact_groups']} exact groups ({s['exact_images']} images) · "
                 f"{s['near_groups']} near groups ({s['near_images']} images) within {found.threshold:g} by {measure} · "
                 f"{s['test_images_with_training_copy']} test images with a training copy · "
                 f"{s['label_disagreeing_groups']} groups whose labels disagree · {found.seconds:.1f} s")
    return lines


# ---------------------------------------------------------------- stored findings


def save_finding(chosen: Target, finding: Finding) -> Path:
    """Write the finding (npz, no pickles) to a temporary name, then rename it into place."""
    path = chosen.path(finding.threshold)
    path.parent.mkdir(parents=True, exist_ok=True)

    def flat(arrays, dtype):
        return (np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype),
                np.cumsum([0] + [len(a) for a in arrays]).astype(np.int64))

    exact, exact_ends = flat(finding.exact, np.int64)
    near, near_ends = flat(finding.near, np.int64)
    tmp = artifacts.temp_file_for(path)
    try:
        with open(tmp, "wb") as handle:
            np.savez(handle, format=_FORMAT, source=chosen.source, measure=finding.measure,
                     threshold=finding.threshold, n_images=finding.n_images, seconds=finding.seconds,
                     exact=exact, exact_ends=exact_ends, near=near, near_ends=near_ends,
                     distance=flat(finding.distance, np.float32)[0], link=flat(finding.link, np.float32)[0],
                     pair_a=finding.pairs.a, pair_b=finding.pairs.b, pair_distance=finding.pairs.distance)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_finding(chosen: Target, threshold: float) -> Optional[Finding]:
    """The stored finding for `threshold`, None when there is none, it is unreadable, or it was
    computed from something else (another dataset or run of this id, other embeddings, another descriptor)."""
    try:
        with np.load(chosen.path(threshold), allow_pickle=False) as stored:
            if int(stored["format"]) != _FORMAT or str(stored["source"]) != chosen.source:
                return None

            def split(name: str, ends: np.ndarray) -> list[np.ndarray]:
                values = stored[name]
                return [values[ends[i]:ends[i + 1]] for i in range(len(ends) - 1)]

            near_ends = stored["near_ends"]
            return Finding(str(stored["measure"]), float(stored["threshold"]), int(stored["n_images"]),
                           split("exact", stored["exact_ends"]), split("near", near_ends),
                           split("distance", near_ends), split("link", near_ends),
                           NearPairs(stored["pair_a"], stored["pair_b"], stored["pair_distance"]),
                           float(stored["seconds"]))
    except (OSError, KeyError, ValueError, EOFError):
        return None


# ---------------------------------------------------------------- the page's job


@dataclass(frozen=True)
class JobState:
    """A search started by the page: running, or failed with the reason its process gave."""

    status: str  # "running" or "failed"
    reason: Optional[str] = None


def _job_files(chosen: Target, threshold: float) -> tuple[Path, Path]:
    path = chosen.path(threshold)
    return path.with_suffix(".pid"), path.with_suffix(".log")


def start_job(chosen: Target, threshold: float) -> int:
    """Start `python -m core duplicates` for the target in a process of its own (a new session, this
    process's data home and database); returns its pid. It stores its finding where stored_report
    reads it; its pid and stderr sit beside that file (job_state)."""
    access.require("compute")
    threshold = duplicates.check_threshold(threshold)
    pid_file, log_file = _job_files(chosen, threshold)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    arguments = ["duplicates", "--dataset", str(chosen.dataset_id), "--threshold", f"{threshold:.6g}", "--json"]
    if chosen.run_id is not None:
        arguments += ["--run", str(chosen.run_id)]
    env = dict(os.environ, **{HOME_ENV: str(data_home()), DB_ENV: database_url()})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    with open(log_file, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "core", *arguments], cwd=PROJECT_ROOT, env=env,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                                   start_new_session=True)
    tmp = artifacts.temp_file_for(pid_file)
    tmp.write_text(str(process.pid))
    os.replace(tmp, pid_file)
    return process.pid


def job_state(chosen: Target, threshold: float) -> Optional[JobState]:
    """The page's search for this threshold: None when none was started (or its finding is stored),
    running while its process lives, failed with its error line once it died without a finding."""
    pid_file, log_file = _job_files(chosen, threshold)
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return None
    if artifacts.process_alive(pid):
        return JobState("running")
    if load_finding(chosen, threshold) is not None:
        return None
    try:
        said = [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        said = []
    errors = [line.removeprefix("error: ") for line in said if line.startswith("error: ")]
    reason = errors[-1] if errors else (said[-1] if said else "the process stopped without a result")
    return JobState("failed", reason)
