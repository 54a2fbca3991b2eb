"""Ids of deleted runs, datasets and maps are never handed out again, in databases made before
that was so too.

SQLite gives a new row max(id) + 1 unless its table was created with AUTOINCREMENT, so the newest
run deleted had its id taken by the next one, whose files then landed beside whatever the old
run's folder still held (probe and mining epochs are found by listing it). Revision 0001 creates
missing tables with AUTOINCREMENT but keeps a table it finds. Here SQLite's runs, datasets and
projections tables that lack it are rebuilt with it (every row, unique constraint and foreign key
kept; storage.db.migrate runs this with foreign keys off, so dropping the old table deletes no
row that refers to it), and each table's counter starts past every id still in evidence: its
rows, rows of other tables that name one, and the numbered folders under the data home (an id
deleted before the upgrade with nothing left of it cannot be known, and nothing can meet it).
PostgreSQL's sequences never go back: nothing to do there.

The tables are 0001's (frozen, loaded from its file) with 0002's job_id.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""
import importlib.util
from pathlib import Path
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: Union[str, Sequence[str], None] = "0002"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# table: (the tables whose column names one of its ids, the data home's folder named by its ids)
REFERENCES = {
    "datasets": ((("images", "dataset_id"), ("runs", "dataset_id")), "datasets"),
    "runs": ((("epochs", "run_id"), ("triplets", "run_id"), ("projections", "run_id")), "runs"),
    "projections": ((), None),
}
JOB_ID_TABLES = ("runs", "projections")  # revision 0002


def _tables_as_of_0002() -> dict[str, sa.Table]:
    spec = importlib.util.spec_from_file_location("_schema_0001", Path(__file__).with_name("0001_first_schema.py"))
    first = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(first)
    tables = {table.name: table for table in first.tables(sa.MetaData())}
    for name in JOB_ID_TABLES:
        tables[name].append_column(sa.Column("job_id", sa.String(length=120), nullable=True))
    return tables


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        return
    defined = _tables_as_of_0002()
    for name in REFERENCES:
        create = bind.execute(sa.text("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = :name"),
                              {"name": name}).scalar()
        if create is None or "AUTOINCREMENT" in create.upper():
            continue
        with op.batch_alter_table(name, copy_from=defined[name], recreate="always"):
            pass
        bind.execute(sa.text("DELETE FROM sqlite_sequence WHERE name = :name"), {"name": name})
        bind.execute(sa.text("INSERT INTO sqlite_sequence (name, seq) VALUES (:name, :seq)"),
                     {"name": name, "seq": _highest_id(bind, name)})


def _highest_id(bind, name: str) -> int:
    """The highest id of table `name` in evidence: its rows, the rows that refer to one, and the
    numbered folders under the data home that its ids name."""
    from storage.settings import data_home

    referrers, folder = REFERENCES[name]
    highest = [bind.execute(sa.text(f"SELECT max(id) FROM {name}")).scalar() or 0]
    for table, column in referrers:
        highest.append(bind.execute(sa.text(f"SELECT max({column}) FROM {table}")).scalar() or 0)
    if folder is not None:
        path = data_home() / folder
        if path.is_dir():
            highest.extend(int(entry.name) for entry in path.iterdir() if entry.name.isdigit())
    return max(highest)


def downgrade() -> None:
    pass  # AUTOINCREMENT is what every later version wants; rebuilding runs again gains nothing
