"""SQLAlchemy 2 schema: datasets, their images and versions (edits over the images), runs, their
epochs, mined triplets, projections.

A change here needs a migration in storage/migrations/versions (tests/test_database.py compares
the migrated schema with these models); databases are created and upgraded only by those."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Optional

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Dataset(Base):
    __tablename__ = "datasets"
    # AUTOINCREMENT: SQLite would otherwise give a new row the id of a deleted newest one, and
    # every cache keyed by that id would serve the deleted dataset
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    source: Mapped[str] = mapped_column(String(50))  # builtin:digits, upload, zip, folder
    n_images: Mapped[int]
    image_size: Mapped[int]
    channels: Mapped[int]
    classes: Mapped[list] = mapped_column(JSON, default=list)  # class names; [] when unlabeled
    folder: Mapped[str] = mapped_column(String(500))  # relative to the data home
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[Optional[str]] = mapped_column(String(320))  # the signed-in email; None: the machine's owner

    images: Mapped[list["ImageRow"]] = relationship(
        back_populates="dataset", cascade="all, delete-orphan", passive_deletes=True
    )

    @property
    def labeled(self) -> bool:
        return len(self.classes) > 0

    @property
    def cache_key(self) -> str:
        """Names this dataset and no other, even in a database made before ids were never reused."""
        return f"{self.id}@{self.created_at.isoformat()}"


class ImageRow(Base):
    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("dataset_id", "position"),
        UniqueConstraint("dataset_id", "sha256"),  # identical images are stored once
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    position: Mapped[int]  # row in the dataset's pixel array
    name: Mapped[str] = mapped_column(String(500))
    label: Mapped[Optional[int]]  # index into Dataset.classes; None when unlabeled
    split: Mapped[str] = mapped_column(String(10))  # train | test
    sha256: Mapped[str] = mapped_column(String(64))

    dataset: Mapped[Dataset] = relationship(back_populates="images")


class DatasetVersion(Base):
    """A version of a dataset: version 1 is the imported images; every later one is its parent
    version plus its own edits (ImageEdit rows), never a copy of the pixels (core.data.versions)."""

    __tablename__ = "dataset_versions"
    # AUTOINCREMENT: a version deleted and made again gets a new id, so its old edits never meet it
    __table_args__ = (UniqueConstraint("dataset_id", "version"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    version: Mapped[int]  # 1, 2, ... within its dataset
    parent: Mapped[Optional[int]]  # the version (number) it edits; None for version 1
    note: Mapped[Optional[str]] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ImageEdit(Base):
    """One edit of a version: relabel (position → label), exclude (position) or tag (position → tag)."""

    __tablename__ = "image_edits"
    __table_args__ = (Index("ix_image_edits_version", "version_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("dataset_versions.id", ondelete="CASCADE"))
    position: Mapped[int]  # the image's row in the dataset's pixel array: the id pages and exports show
    kind: Mapped[str] = mapped_column(String(10))  # relabel | exclude | tag
    label: Mapped[Optional[int]]  # relabel: index into Dataset.classes
    tag: Mapped[Optional[str]] = mapped_column(String(100))  # tag: its text


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = {"sqlite_autoincrement": True}  # ids of deleted runs are never reused

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    # the version of the dataset it trained on (DatasetVersion.version): its labels and excluded
    # images are read through it, so later edits never change the run's map, metrics or exports
    dataset_version: Mapped[int] = mapped_column(default=1)
    kind: Mapped[str] = mapped_column(String(20))  # train | embed
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    # queued, running, completed, failed, cancelled, interrupted
    status: Mapped[str] = mapped_column(String(20), default="queued")
    reason: Mapped[Optional[str]] = mapped_column(Text)
    device: Mapped[Optional[str]] = mapped_column(String(40))
    pid: Mapped[Optional[int]]
    host: Mapped[Optional[str]] = mapped_column(String(200))
    # the Ray job that runs it (core.runs.launch), when runs are submitted to a cluster; None: a local process
    job_id: Mapped[Optional[str]] = mapped_column(String(120))
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    # the token of the process that holds the run; every status write checks it (core.runs.lifecycle)
    owner: Mapped[Optional[str]] = mapped_column(String(40))
    created_by: Mapped[Optional[str]] = mapped_column(String(320))  # the signed-in email; None: the machine's owner
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[Optional[datetime]]
    finished_at: Mapped[Optional[datetime]]
    heartbeat_at: Mapped[Optional[datetime]]
    phase: Mapped[Optional[str]] = mapped_column(String(40))  # training, embedding, projecting
    epoch: Mapped[int] = mapped_column(default=0)
    step: Mapped[int] = mapped_column(default=0)
    total_steps: Mapped[int] = mapped_column(default=0)
    last_loss: Mapped[Optional[float]]
    recent_counts: Mapped[Optional[dict]] = mapped_column(JSON)  # per category (easy, semi-hard, hard), last batches; semi_hard in runs of earlier versions
    metrics: Mapped[Optional[dict]] = mapped_column(JSON)
    checkpoint: Mapped[Optional[str]] = mapped_column(String(500))  # relative to the data home
    embeddings: Mapped[Optional[str]] = mapped_column(String(500))

    dataset: Mapped[Dataset] = relationship()
    epochs: Mapped[list["EpochRow"]] = relationship(
        cascade="all, delete-orphan", passive_deletes=True, order_by="EpochRow.epoch"
    )

    @property
    def seconds(self) -> Optional[float]:
        if self.started_at is None:
            return None
        end = self.finished_at or utcnow()
        return (end - self.started_at).total_seconds()

    @property
    def cache_key(self) -> str:
        """Names this run and no other: its id with its creation time (see Dataset.cache_key)."""
        return f"{self.id}@{self.created_at.isoformat()}"


class EpochRow(Base):
    __tablename__ = "epochs"
    __table_args__ = (UniqueConstraint("run_id", "epoch"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    epoch: Mapped[int]
    loss: Mapped[float]
    easy: Mapped[int]
    semi_hard: Mapped[int]
    hard: Mapped[int]
    seconds: Mapped[float]  # the epoch's wall time in its worker: steps, checkpoint, probe (core.runs.worker)
    # d(A,P) − d(A,N) of uniformly sampled triplets of the epoch's last batch: {"edges", "counts"}
    gap_histogram: Mapped[Optional[dict]] = mapped_column(JSON)
    # Precision@1 of the probe set (core.explore.evolution) after this epoch; None when unlabelled
    probe_precision_at_1: Mapped[Optional[float]]
    # with a cross-batch memory (core.metric.memory): of easy/semi_hard/hard, the triplets whose
    # negative came from the memory, {"easy", "semi-hard", "hard"}; None: a run without a memory
    # (or one stored before these were kept)
    memory_counts: Mapped[Optional[dict]] = mapped_column(JSON)


class TripletRow(Base):
    """A bounded sample of what the run's miner returned and its loss used in an epoch's last
    batch (core.metric.inspector): image positions, distances, category and the loss each contributed.
    A pair has only a positive (similar) or only a negative (dissimilar)."""

    __tablename__ = "triplets"
    __table_args__ = (Index("ix_triplets_run_epoch", "run_id", "epoch"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    epoch: Mapped[int]
    anchor: Mapped[int]
    positive: Mapped[Optional[int]]
    negative: Mapped[Optional[int]]
    d_ap: Mapped[Optional[float]]
    d_an: Mapped[Optional[float]]
    category: Mapped[str] = mapped_column(String(12))  # a core.metric.categories Category or PairKind
    loss: Mapped[Optional[float]]  # the loss this row contributed under the run's loss (None: older runs)
    weight: Mapped[Optional[float]]  # InfoNCE / SupCon: the negative's softmax weight
    # with a cross-batch memory: whether the negative came from the memory (an earlier batch);
    # None: no memory, a row without a negative, or a row stored before this was kept
    from_memory: Mapped[Optional[bool]]


class ProjectionRow(Base):
    """A run's map: a job of its own (a process of its own), so a run never waits on it."""

    __tablename__ = "projections"
    __table_args__ = (UniqueConstraint("run_id", "method", "params_key"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    method: Mapped[str] = mapped_column(String(20))
    params_key: Mapped[str] = mapped_column(String(200))
    params: Mapped[dict] = mapped_column(JSON)
    # queued, running, done, failed, cancelled, interrupted
    status: Mapped[str] = mapped_column(String(20), default="queued")
    reason: Mapped[Optional[str]] = mapped_column(Text)
    path: Mapped[Optional[str]] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    pid: Mapped[Optional[int]]
    host: Mapped[Optional[str]] = mapped_column(String(200))
    job_id: Mapped[Optional[str]] = mapped_column(String(120))  # the Ray job computing it, as on Run
    owner: Mapped[Optional[str]] = mapped_column(String(40))
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    heartbeat_at: Mapped[Optional[datetime]]
    started_at: Mapped[Optional[datetime]]
    finished_at: Mapped[Optional[datetime]]
    phase: Mapped[Optional[str]] = mapped_column(String(20))  # importing, compiling, neighbours, layout
    progress: Mapped[Optional[float]]  # 0..1 within the phase, when the phase can tell
    message: Mapped[Optional[str]] = mapped_column(Text)  # what the page says about the phase


class Upload(Base):
    """What a signed-in person uploaded and when: their daily upload limit counts these."""

    __tablename__ = "uploads"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(320), index=True)
    nbytes: Mapped[int] = mapped_column(BigInteger)
    at: Mapped[datetime] = mapped_column(default=utcnow)


class Deletion(Base):
    """A deleted run, dataset or dataset version: what it was, who deleted it and when (the
    rows themselves are gone)."""

    __tablename__ = "deletions"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))  # run | dataset | version
    object_id: Mapped[int]
    what: Mapped[str] = mapped_column(String(500))  # e.g. "run 3 (triplet on digits)", "digits@2"
    deleted_by: Mapped[Optional[str]] = mapped_column(String(320))  # None: the machine's owner
    deleted_at: Mapped[datetime] = mapped_column(default=utcnow)
