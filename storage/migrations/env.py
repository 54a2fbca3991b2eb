"""Alembic's environment for the app's schema. storage.db.migrate runs it with its own connection,
in its own transaction and lock (config.attributes["connection"]). Without one (the `alembic`
command, `alembic -c storage/alembic.ini revision --autogenerate -m ...` to write the next
migration) it connects to the app's database (EMBEDDING_LAB_DB, or the data folder's SQLite).
SQLite alters tables in batch mode (it has no ALTER COLUMN), so one migration file serves both."""
from alembic import context

from storage.schema import Base


def run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    from storage.settings import database_url

    with create_engine(database_url(), poolclass=NullPool).connect() as own:
        run(own)
        own.commit()
