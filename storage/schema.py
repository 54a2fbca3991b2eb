"""SQLAlchemy 2 schema: datasets and their images, runs, their epochs, mined triplets, projections."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Optional

from sqlalchemy import JSON, ForeignKey, Index, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    source: Mapped[str] = mapped_column(String(50))  # builtin:digits, upload, zip, folder
    n_images: Mapped[int]
    image_size: Mapped[int]
    channels: Mapped[int]
    classes: Mapped[list] = mapped_column(JSON, default=list)  # class names; [] when unlabeled
    folder: Mapped[str] = mapped_column(String(500))  # relative to the data home
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    images: Mapped[list["ImageRow"]] = relationship(
        back_populates="dataset", cascade="all, delete-orphan", passive_deletes=True
    )

    @property
    def labeled(self) -> bool:
        return len(self.classes) > 0


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


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(20))  # train | embed
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    # queued, running, completed, failed, cancelled, interrupted
    status: Mapped[str] = mapped_column(String(20), default="queued")
    reason: Mapped[Optional[str]] = mapped_column(Text)
    device: Mapped[Optional[str]] = mapped_column(String(40))
    pid: Mapped[Optional[int]]
    host: Mapped[Optional[str]] = mapped_column(String(200))
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[Optional[datetime]]
    finished_at: Mapped[Optional[datetime]]
    heartbeat_at: Mapped[Optional[datetime]]
    phase: Mapped[Optional[str]] = mapped_column(String(40))  # training, embedding, projecting
    epoch: Mapped[int] = mapped_column(default=0)
    step: Mapped[int] = mapped_column(default=0)
    total_steps: Mapped[int] = mapped_column(default=0)
    last_loss: Mapped[Optional[float]]
    recent_counts: Mapped[Optional[dict]] = mapped_column(JSON)  # easy/semi_hard/hard, last batches
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
    seconds: Mapped[float]
    # d(A,P) − d(A,N) of uniformly sampled triplets of the epoch's last batch: {"edges", "counts"}
    gap_histogram: Mapped[Optional[dict]] = mapped_column(JSON)


class TripletRow(Base):
    """A sample of the triplets the miner saw in an epoch's last batch (image positions)."""

    __tablename__ = "triplets"
    __table_args__ = (Index("ix_triplets_run_epoch", "run_id", "epoch"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    epoch: Mapped[int]
    anchor: Mapped[int]
    positive: Mapped[int]
    negative: Mapped[int]
    d_ap: Mapped[float]
    d_an: Mapped[float]
    category: Mapped[str] = mapped_column(String(12))


class ProjectionRow(Base):
    __tablename__ = "projections"
    __table_args__ = (UniqueConstraint("run_id", "method", "params_key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    method: Mapped[str] = mapped_column(String(20))
    params_key: Mapped[str] = mapped_column(String(200))
    params: Mapped[dict] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(20), default="running")  # running, done, failed
    reason: Mapped[Optional[str]] = mapped_column(Text)
    path: Mapped[Optional[str]] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
