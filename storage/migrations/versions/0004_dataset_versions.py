"""Dataset versions: a dataset has versions 1, 2, ...; version 1 is the imported images, each later
one its parent version plus its own edits (relabel, exclude, tag an image), and a run records the
version it trained on (core.data.versions).

Every dataset already stored becomes its version 1 (its images as they are; nothing else about it
changes) and every run already stored ran on version 1: runs.dataset_version is added NOT NULL
with 1 as the server default that fills the existing rows. On SQLite the column is added in place
(ALTER TABLE ADD COLUMN): runs is not rebuilt, so no epoch, triplet or map goes with it.

A database made before migrations by a version that had these tables already (its migrations
then run from the first) keeps them: each table, the column and each version-1 row is added only
where it is missing.

The tables are written out here rather than taken from storage.schema, so this revision stays what
it is when the models change.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-10
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: Union[str, Sequence[str], None] = "0003"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    bind = op.get_bind()
    present = set(sa.inspect(bind).get_table_names())
    if "dataset_versions" not in present:
        op.create_table(
            "dataset_versions",
            sa.Column("id", sa.Integer(), primary_key=True),
            sa.Column("dataset_id", sa.Integer(), sa.ForeignKey("datasets.id", ondelete="CASCADE"), nullable=False),
            sa.Column("version", sa.Integer(), nullable=False),
            sa.Column("parent", sa.Integer(), nullable=True),
            sa.Column("note", sa.Text(), nullable=True),
            sa.Column("created_at", sa.DateTime(), nullable=False),
            sa.UniqueConstraint("dataset_id", "version"),
            sqlite_autoincrement=True,
        )
    if "image_edits" not in present:
        op.create_table(
            "image_edits",
            sa.Column("id", sa.Integer(), primary_key=True),
            sa.Column("version_id", sa.Integer(), sa.ForeignKey("dataset_versions.id", ondelete="CASCADE"),
                      nullable=False),
            sa.Column("position", sa.Integer(), nullable=False),
            sa.Column("kind", sa.String(10), nullable=False),
            sa.Column("label", sa.Integer(), nullable=True),
            sa.Column("tag", sa.String(100), nullable=True),
        )
        op.create_index("ix_image_edits_version", "image_edits", ["version_id"])
    if "dataset_version" not in {c["name"] for c in sa.inspect(bind).get_columns("runs")}:
        op.add_column("runs", sa.Column("dataset_version", sa.Integer(), nullable=False, server_default=sa.text("1")))
    # every stored dataset is its version 1, made when it was imported
    op.execute("INSERT INTO dataset_versions (dataset_id, version, parent, note, created_at) "
               "SELECT id, 1, NULL, 'imported', created_at FROM datasets WHERE NOT EXISTS "
               "(SELECT 1 FROM dataset_versions WHERE dataset_versions.dataset_id = datasets.id "
               "AND dataset_versions.version = 1)")


def downgrade() -> None:
    op.drop_column("runs", "dataset_version")  # SQLite 3.35+ drops a column in place: no table rebuild
    op.drop_index("ix_image_edits_version", table_name="image_edits")
    op.drop_table("image_edits")
    op.drop_table("dataset_versions")
