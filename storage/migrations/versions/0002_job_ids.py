"""Runs and maps remember the Ray job that computes them (core.launch), so cancel can stop it and
the liveness check can ask for its status.

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


def upgrade() -> None:
    for table in ("runs", "projections"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("job_id", sa.String(length=120), nullable=True))


def downgrade() -> None:
    for table in ("runs", "projections"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("job_id")
