"""Runs and maps remember the Ray job that computes them (core.runs.launch), so cancel can stop it and
the liveness check can ask for its status.

A database made before migrations by the version that introduced the column already has it:
it is added only where it is missing.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: Union[str, Sequence[str], None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

TABLES = ("runs", "projections")


def upgrade() -> None:
    for table in TABLES:
        if "job_id" not in {c["name"] for c in sa.inspect(op.get_bind()).get_columns(table)}:
            op.add_column(table, sa.Column("job_id", sa.String(length=120), nullable=True))


def downgrade() -> None:
    for table in TABLES:
        op.drop_column(table, "job_id")  # SQLite 3.35+ drops a column in place: no table rebuild
