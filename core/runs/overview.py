"""What the pages show of the run store, as plain data: the engine (opened once per server
process), snapshots of runs, the Runs page's table and loss curves, what resuming a run offers.

Each function reads in one transaction of its own and returns dataclasses, dicts and lists, so a
page renders from data and never holds a session or a row.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Optional

from sqlalchemy import Engine, func, select

from storage import artifacts, queries
from storage.db import make_engine, transaction
from storage.hosting import lost_files
from storage.schema import EpochRow, Run

METRICS = ("precision_at_1", "r_precision", "map_at_r", "recall_at_1", "recall_at_5", "recall_at_10")


def open_store(url: str) -> Engine:
    """The engine of the database at `url` (its schema brought up to date); StorageError with the
    reason when it cannot be opened."""
    return make_engine(url)


@dataclass(frozen=True, eq=False)
class RunSnapshot:
    """A run row as it stood when it was read, with its dataset's name and its stored epochs."""

    id: int
    kind: str  # train | embed
    status: str
    dataset_id: int
    dataset_name: str
    config: dict
    metrics: Optional[dict]
    reason: Optional[str]
    device: Optional[str]
    job_id: Optional[str]
    phase: Optional[str]
    epoch: int
    step: int
    total_steps: int
    last_loss: Optional[float]
    recent_counts: Optional[dict]
    seconds: Optional[float]  # since it started; None before
    started_at: Optional[datetime]
    checkpoint: Optional[str]  # relative to the data home
    embeddings: Optional[str]
    cache_key: str  # names this run and no other (Run.cache_key)
    stored_epochs: int  # epoch rows stored
    stored_seconds: float = 0.0  # the stored epochs' own wall seconds (steps, probe, checkpoint), summed
    dataset_version: int = 1  # the version of the dataset it ran on (core.data.versions)
    waiting: Optional[str] = None  # a queued run's place in the machine's queue, in a sentence (core.runs.queue)
    created_by: Optional[str] = None  # the signed-in email that started it; None: the machine's owner

    @property
    def dataset_ref(self) -> str:
        """The dataset as the run used it: its name, with @VERSION past the imported images."""
        return self.dataset_name if self.dataset_version == 1 else f"{self.dataset_name}@{self.dataset_version}"

    @property
    def active(self) -> bool:
        return self.status in queries.ACTIVE

    def seconds_left(self) -> Optional[float]:
        """Seconds of training left at the pace so far, for a run in its training phase: its steps
        left times the seconds per step of its stored epochs (each epoch's whole wall time in the
        worker: its steps, probe and checkpoint; neither the worker's start nor a resumed run's
        pause counts), or, before its first epoch is stored,
        of the time since it started. None before its first step, or when it is not training."""
        epochs = self.config.get("epochs")
        if not self.active or self.phase != "training" or self.step <= 0 or not self.total_steps:
            return None
        if self.stored_epochs and isinstance(epochs, int) and epochs > 0:
            per_step = self.stored_seconds / (self.stored_epochs * self.total_steps / epochs)
        elif self.seconds:
            per_step = self.seconds / self.step
        else:
            return None
        return max(0.0, (self.total_steps - self.step) * per_step)


def _snapshot(run: Run, stored: tuple[int, float], waiting: Optional[str] = None) -> RunSnapshot:
    return RunSnapshot(
        id=run.id, kind=run.kind, status=run.status, dataset_id=run.dataset_id, dataset_name=run.dataset.name,
        config=dict(run.config or {}), metrics=None if run.metrics is None else dict(run.metrics),
        reason=run.reason, device=run.device, job_id=run.job_id, phase=run.phase, epoch=run.epoch, step=run.step,
        total_steps=run.total_steps, last_loss=run.last_loss,
        recent_counts=None if run.recent_counts is None else dict(run.recent_counts), seconds=run.seconds,
        started_at=run.started_at, checkpoint=run.checkpoint, embeddings=run.embeddings, cache_key=run.cache_key,
        stored_epochs=stored[0], stored_seconds=stored[1], dataset_version=run.dataset_version, waiting=waiting,
        created_by=run.created_by)


def _epoch_counts(session, run_ids: list[int]) -> dict[int, tuple[int, float]]:
    """run id → (epochs stored, their seconds summed), for the runs that stored any."""
    if not run_ids:
        return {}
    rows = session.execute(select(EpochRow.run_id, func.count(), func.sum(EpochRow.seconds))
                           .where(EpochRow.run_id.in_(run_ids)).group_by(EpochRow.run_id))
    return {run_id: (count, float(seconds or 0.0)) for run_id, count, seconds in rows}


def run_snapshots(engine: Engine, completed_only: bool = False, kind: Optional[str] = None) -> list[RunSnapshot]:
    """Every run (only completed ones when asked; only of `kind`, train or embed, when given), newest first."""
    with transaction(engine) as session:
        runs = queries.completed_runs(session) if completed_only else queries.list_runs(session)
        runs = [run for run in runs if kind is None or run.kind == kind]
        counts = _epoch_counts(session, [run.id for run in runs])
        waiting = _waiting(session, runs)
        return [_snapshot(run, counts.get(run.id, (0, 0.0)), waiting.get(run.id)) for run in runs]


def run_snapshot(engine: Engine, run_id: int) -> RunSnapshot:
    """One run; LookupError (storage.queries.get_run's sentence) when there is none."""
    with transaction(engine) as session:
        run = queries.get_run(session, run_id)
        return _snapshot(run, _epoch_counts(session, [run_id]).get(run_id, (0, 0.0)), _waiting(session, [run]).get(run_id))


def _waiting(session, runs) -> dict[int, str]:
    """run id → its place in the machine's queue, for the queued runs (read only: one query)."""
    from core.runs.queue import places, queue_applies

    if not any(run.status == "queued" for run in runs) or not queue_applies():
        return {}
    try:
        found = places(session)
    except ValueError as exc:  # EMBEDDING_LAB_MAX_JOBS is malformed: the sentence says so
        return {run.id: str(exc) for run in runs if run.status == "queued"}
    return {run_id: place.sentence() for (table, run_id), place in found.items() if table == "runs"}


def runs_to_follow(engine: Engine, watching: Optional[int] = None) -> list[RunSnapshot]:
    """What the Train page follows, newest first: every active run, the newest finished one, the
    newest completed one (a newer cancelled run must not hide a result) and `watching` (the run
    this session started), each once."""
    runs = run_snapshots(engine)
    finished = [run for run in runs if not run.active]
    newest_completed = next((run for run in finished if run.status == "completed"), None)
    shown = {run.id for run in runs if run.active}
    shown |= {run.id for run in (*finished[:1], newest_completed) if run is not None}
    if watching is not None:
        shown.add(watching)
    return [run for run in runs if run.id in shown]


def _encoder_name(run: RunSnapshot) -> Optional[str]:
    """The encoder a run trained, or the one an embedding run's checkpoint holds (its config keeps
    the checkpoint's training config, or a plain name when it has none)."""
    encoder = run.config.get("encoder")
    if run.kind != "train" and isinstance(encoder, dict):
        return encoder.get("encoder")
    return None if encoder is None else str(encoder)


def runs_table(engine: Engine) -> list[dict]:
    """The Runs page's table: one row per run, newest first. A "Ray job" column follows "device"
    only when some run went to a Ray cluster."""
    runs = run_snapshots(engine)
    with_jobs = any(run.job_id for run in runs)
    rows = []
    for r in runs:
        row = {
            "run": r.id, "status": r.status + (f" ({r.waiting})" if r.waiting else ""), "kind": r.kind,
            "dataset": r.dataset_ref, "by": r.created_by or "",
            "encoder": _encoder_name(r),
            "objective": r.config.get("loss", "—"), "miner": r.config.get("miner", "—"),
            # the epochs stored (each with its checkpoint), not the one in progress: a run cancelled in
            # epoch 4 of 4 has finished 3
            "epochs": f"{r.stored_epochs}/{r.config.get('epochs', '—')}", "device": r.device,
        }
        if with_jobs:
            row["Ray job"] = r.job_id or ""
        rows.append({
            **row,
            "seconds": round(r.seconds, 1) if r.seconds is not None else None,
            **{m: (r.metrics or {}).get(m) for m in METRICS},
            "files": ("lost" if lost_files([r.checkpoint, r.embeddings]) else "kept") if r.status == "completed" else "",
            "reason": (r.reason or "").splitlines()[0] if r.reason else "",
            "started": r.started_at,
        })
    return rows


def settings_side_by_side(engine: Engine, run_ids: list[int]) -> list[dict]:
    """The Runs page's settings of the compared runs: one row per setting any of them
    has, titled as the Train form titles it (core.training.config.setting_title), a column "#N" per
    run in the order given with its value as text ("—" where it has none); the rows that differ
    first (stable in the config's order otherwise), marked "≠" in a "differs" column."""
    from core.training.config import flat_settings, setting_text, setting_title

    with transaction(engine) as session:
        found = {run.id: _snapshot(run, (0, 0.0)) for run in session.scalars(select(Run).where(Run.id.in_(run_ids)))}
    runs = [found[run_id] for run_id in run_ids if run_id in found]
    values = {run.id: {"dataset": run.dataset_ref, **flat_settings(
        {key: value for key, value in run.config.items() if key not in ("dataset", "checkpoint")})} for run in runs}
    names = list(dict.fromkeys(name for run in runs for name in values[run.id]))  # first seen first

    rows = []
    for name in names:
        if all(values[run.id].get(name) is None for run in runs):
            continue  # a setting none of them has (a triplet run's temperature)
        cells = [setting_text(values[run.id].get(name)) for run in runs]
        rows.append({"differs": "≠" if len(set(cells)) > 1 else "", "setting": setting_title(name),
                     **{f"#{run.id}": cell for run, cell in zip(runs, cells)}})
    return sorted(rows, key=lambda row: not row["differs"])


def epoch_curves(engine: Engine, run_ids: list[int]) -> list[dict]:
    """{run: "#N", objective, epoch, loss, precision_at_1} for every stored epoch of these runs, by
    run then epoch. objective: the run's loss (its scale differs: InfoNCE near 6, contrastive
    under 0.1); precision_at_1: the probe's Precision@1 after that epoch, None when unlabelled."""
    with transaction(engine) as session:
        objectives = {run.id: (run.config or {}).get("loss", run.kind) for run in
                      session.scalars(select(Run).where(Run.id.in_(run_ids)))}
        return [{"run": f"#{e.run_id}", "objective": objectives.get(e.run_id, "—"), "epoch": e.epoch, "loss": e.loss,
                 "precision_at_1": e.probe_precision_at_1} for e in queries.epoch_rows(session, run_ids)]


@dataclass(frozen=True)
class ResumeOffer:
    """What the Runs page offers for one run: its status and, when it can be resumed, the epoch
    its checkpoint ends (None otherwise) of its configured epochs."""

    status: str
    resume_after: Optional[int]
    total_epochs: Optional[int]

    @property
    def active(self) -> bool:
        return self.status in queries.ACTIVE


def resume_offer(engine: Engine, run_id: int) -> ResumeOffer:
    from core.runs.jobs import resumable_epoch

    with transaction(engine) as session:
        run = queries.get_run(session, run_id)
        return ResumeOffer(run.status, resumable_epoch(run), (run.config or {}).get("epochs"))


def stored_encoder(engine: Engine, run_id: int) -> bytes:
    """The bytes of a run's encoder checkpoint; LookupError when the run has none."""
    with transaction(engine) as session:
        run = queries.get_run(session, run_id)
        if not run.checkpoint:
            raise LookupError(f"run {run_id} has no stored encoder")
        path = artifacts.absolute(run.checkpoint)
    return path.read_bytes()
