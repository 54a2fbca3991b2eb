"""Who made each dataset and run (the signed-in email; None for the machine's owner: the command
line, or an app without sign-in), a record of every deletion with who and when, and of each
signed-in person's uploads (their daily limit counts them).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: Union[str, Sequence[str], None] = "0004"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # a database made before migrations by a version that had these already gets only what it lacks
    inspector = sa.inspect(op.get_bind())
    tables = set(inspector.get_table_names())
    for table in ("datasets", "runs"):
        if "created_by" not in {c["name"] for c in inspector.get_columns(table)}:
            op.add_column(table, sa.Column("created_by", sa.String(length=320), nullable=True))
    if "deletions" not in tables:
        op.create_table(
            "deletions",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("kind", sa.String(length=20), nullable=False),
            sa.Column("object_id", sa.Integer(), nullable=False),
            sa.Column("what", sa.String(length=500), nullable=False),
            sa.Column("deleted_by", sa.String(length=320), nullable=True),
            sa.Column("deleted_at", sa.DateTime(), nullable=False),
            sa.PrimaryKeyConstraint("id"),
        )
    if "uploads" not in tables:
        op.create_table(
            "uploads",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("email", sa.String(length=320), nullable=False),
            sa.Column("nbytes", sa.BigInteger(), nullable=False),
            sa.Column("at", sa.DateTime(), nullable=False),
            sa.PrimaryKeyConstraint("id"),
        )
        op.create_index(op.f("ix_uploads_email"), "uploads", ["email"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_uploads_email"), table_name="uploads")
    op.drop_table("uploads")
    op.drop_table("deletions")
    for table in ("datasets", "runs"):
        op.drop_column(table, "created_by")
