"""The cross-batch memory's negatives (core.metric.memory): per epoch, how many of the counted
triplets had their negative from the memory (epochs.memory_counts, {"easy", "semi-hard", "hard"}),
and whether an inspected row's negative came from it (triplets.from_memory).

Both columns are nullable and added in place (ALTER TABLE ADD COLUMN: on SQLite neither table is
rebuilt); every row already stored reads None, "no memory", which is what it was.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: Union[str, Sequence[str], None] = "0005"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # a database made before migrations by a version that had these already gets only what it lacks
    inspector = sa.inspect(op.get_bind())
    if "memory_counts" not in {c["name"] for c in inspector.get_columns("epochs")}:
        op.add_column("epochs", sa.Column("memory_counts", sa.JSON(), nullable=True))
    if "from_memory" not in {c["name"] for c in inspector.get_columns("triplets")}:
        op.add_column("triplets", sa.Column("from_memory", sa.Boolean(), nullable=True))


def downgrade() -> None:  # SQLite 3.35+ drops a column in place: no table rebuild
    op.drop_column("triplets", "from_memory")
    op.drop_column("epochs", "memory_counts")
