"""Alembic's environment for the app's schema: storage.db.migrate runs it with a connection of its
own (config.attributes["connection"]); there is no alembic.ini. SQLite alters tables in batch
mode (it has no ALTER COLUMN), so one migration file serves both databases."""
from alembic import context

from storage.schema import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
