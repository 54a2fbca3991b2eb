"""Where data lives and which database is used: one environment variable each."""
from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "EMBEDDING_LAB_HOME"
DB_ENV = "EMBEDDING_LAB_DB"


def data_home() -> Path:
    """The data folder (datasets, checkpoints, embeddings); created on first use."""
    home = Path(os.environ.get(HOME_ENV) or ".embedding-lab").expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def database_url() -> str:
    """Any SQLAlchemy URL; by default SQLite inside the data folder."""
    return os.environ.get(DB_ENV) or f"sqlite:///{data_home() / 'lab.db'}"
