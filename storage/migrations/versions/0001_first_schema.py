"""The schema of the versions before migrations: datasets and their images, runs, their epochs,
mined triplets, projections.

A database made by one of those versions has no alembic_version table, so this revision runs on
it too and brings it here in place: tables it lacks are created, columns it lacks are added (all
nullable, or NOT NULL with a default that fills the existing rows) and the triplet members that
pairs leave empty become nullable (SQLite rebuilds that table, rows copied). No row is dropped.
The tables are written out below rather than taken from storage.schema, so this revision stays
what it is when the models change.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# what earlier versions made NOT NULL and pair rows leave empty
PAIR_COLUMNS = ("positive", "negative", "d_ap", "d_an")


def tables(metadata: sa.MetaData) -> list[sa.Table]:
    """The six tables as this revision defines them, in creation order."""
    datasets = sa.Table(
        "datasets", metadata,
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("source", sa.String(50), nullable=False),
        sa.Column("n_images", sa.Integer(), nullable=False),
        sa.Column("image_size", sa.Integer(), nullable=False),
        sa.Column("channels", sa.Integer(), nullable=False),
        sa.Column("classes", sa.JSON(), nullable=False),
        sa.Column("folder", sa.String(500), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sqlite_autoincrement=True,  # ids of deleted rows are never handed out again
    )
    images = sa.Table(
        "images", metadata,
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("dataset_id", sa.Integer(), sa.ForeignKey("datasets.id", ondelete="CASCADE"), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(500), nullable=False),
        sa.Column("label", sa.Integer(), nullable=True),
        sa.Column("split", sa.String(10), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.UniqueConstraint("dataset_id", "position"),
        sa.UniqueConstraint("dataset_id", "sha256"),
    )
    runs = sa.Table(
        "runs", metadata,
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("dataset_id", sa.Integer(), sa.ForeignKey("datasets.id", ondelete="CASCADE"), nullable=False),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("device", sa.String(40), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("host", sa.String(200), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False, info={"fill": sa.false()}),
        sa.Column("owner", sa.String(40), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=True),
        sa.Column("phase", sa.String(40), nullable=True),
        sa.Column("epoch", sa.Integer(), nullable=False, info={"fill": sa.text("0")}),
        sa.Column("step", sa.Integer(), nullable=False, info={"fill": sa.text("0")}),
        sa.Column("total_steps", sa.Integer(), nullable=False, info={"fill": sa.text("0")}),
        sa.Column("last_loss", sa.Double(), nullable=True),
        sa.Column("recent_counts", sa.JSON(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("checkpoint", sa.String(500), nullable=True),
        sa.Column("embeddings", sa.String(500), nullable=True),
        sqlite_autoincrement=True,
    )
    epochs = sa.Table(
        "epochs", metadata,
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("loss", sa.Double(), nullable=False),
        sa.Column("easy", sa.Integer(), nullable=False),
        sa.Column("semi_hard", sa.Integer(), nullable=False),
        sa.Column("hard", sa.Integer(), nullable=False),
        sa.Column("seconds", sa.Double(), nullable=False),
        sa.Column("gap_histogram", sa.JSON(), nullable=True),
        sa.Column("probe_precision_at_1", sa.Double(), nullable=True),
        sa.UniqueConstraint("run_id", "epoch"),
    )
    projections = sa.Table(
        "projections", metadata,
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("method", sa.String(20), nullable=False),
        sa.Column("params_key", sa.String(200), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("path", sa.String(500), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("host", sa.String(200), nullable=True),
        sa.Column("owner", sa.String(40), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False, info={"fill": sa.false()}),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=True),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("phase", sa.String(20), nullable=True),
        sa.Column("progress", sa.Double(), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.UniqueConstraint("run_id", "method", "params_key"),
        sqlite_autoincrement=True,
    )
    triplets = sa.Table(
        "triplets", metadata,
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("anchor", sa.Integer(), nullable=False),
        sa.Column("positive", sa.Integer(), nullable=True),
        sa.Column("negative", sa.Integer(), nullable=True),
        sa.Column("d_ap", sa.Double(), nullable=True),
        sa.Column("d_an", sa.Double(), nullable=True),
        sa.Column("category", sa.String(12), nullable=False),
        sa.Column("loss", sa.Double(), nullable=True),
        sa.Column("weight", sa.Double(), nullable=True),
        sa.Index("ix_triplets_run_epoch", "run_id", "epoch"),
    )
    return [datasets, images, runs, epochs, projections, triplets]


def upgrade() -> None:
    bind = op.get_bind()
    present = set(sa.inspect(bind).get_table_names())
    defined = tables(sa.MetaData())
    for table in defined:
        if table.name not in present:
            table.create(bind)
            continue
        have = {column["name"] for column in sa.inspect(bind).get_columns(table.name)}
        for column in table.columns:
            if column.name not in have:
                op.add_column(table.name, _addable(column))
    strict = [c for c in sa.inspect(bind).get_columns("triplets") if c["name"] in PAIR_COLUMNS and not c["nullable"]]
    if not strict:
        return
    if bind.dialect.name == "sqlite":  # no ALTER COLUMN: the table as defined above, the rows copied over
        # (from the definition, not reflected: SQLite's reflection loses an inline ON DELETE CASCADE)
        with op.batch_alter_table("triplets", copy_from=defined[-1], recreate="always"):
            pass
    else:
        for column in strict:
            op.alter_column("triplets", column["name"], existing_type=column["type"], nullable=True)


def _addable(column: sa.Column) -> sa.Column:
    """A column for ALTER TABLE ADD COLUMN on a table that has rows: a NOT NULL one takes the
    default its model gives new rows (column.info["fill"]) as the server default for those rows."""
    fill = column.info.get("fill")
    return sa.Column(column.name, column.type, nullable=column.nullable or fill is None, server_default=fill)


def downgrade() -> None:
    for name in ("triplets", "projections", "epochs", "runs", "images", "datasets"):
        op.drop_table(name)
