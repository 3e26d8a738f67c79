"""Run the metadata migrations programmatically (for ``tailor db upgrade`` and tests).

The Alembic scripts live in ``migrations/`` at the repository root, found relative to this file;
the database URL is handed to ``migrations/env.py`` through the config (it wins over the
``TAILOR_DATABASE_URL`` environment variable that a bare ``alembic`` command line uses).

Several processes may migrate at once (every api process migrates at start): on PostgreSQL
``upgrade`` and ``downgrade`` hold a session advisory lock (``MIGRATION_LOCK_ID``) on a connection
of their own while Alembic runs, so one process migrates and the others wait, then find the schema
current and do nothing. SQLite serves one host, where the embedded default runs one process.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import pool, text
from sqlalchemy.engine import URL

from tenants.db import normalize_url

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS_DIR = REPO_ROOT / "migrations"
MIGRATION_LOCK_ID = 0x7461696C6F72  # pg_advisory_lock key: "tailor" in ASCII, the same in every process


def alembic_config(database_url: str | URL) -> Config:
    """An Alembic config for the repo's migrations and ``database_url`` (no alembic.ini needed)."""
    ini = REPO_ROOT / "alembic.ini"
    config = Config(str(ini)) if ini.exists() else Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    url = normalize_url(database_url).render_as_string(hide_password=False)
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))  # ConfigParser interpolation
    return config


def upgrade(database_url: str | URL, revision: str = "head") -> None:
    """Migrate the database up to ``revision`` (default: the newest), under the migration lock."""
    with migration_lock(database_url):
        command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str | URL, revision: str = "base") -> None:
    """Migrate the database down to ``revision`` (default: empty), under the migration lock."""
    with migration_lock(database_url):
        command.downgrade(alembic_config(database_url), revision)


@contextmanager
def migration_lock(database_url: str | URL) -> Iterator[None]:
    """Hold PostgreSQL's session advisory lock ``MIGRATION_LOCK_ID`` for the block (waiting for
    another holder to finish); a no-op on other databases. The lock lives on its own connection,
    so it is released even if the block fails, and at the latest when the process dies."""
    url = normalize_url(database_url)
    if url.get_backend_name() != "postgresql":
        yield
        return
    from tenants.db import make_engine

    engine = make_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            log.info("waiting for the migration lock")
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_ID})
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_ID})
    finally:
        engine.dispose()


def current(database_url: str | URL) -> str | None:
    """The revision the database is at (None when it has never been migrated)."""
    from alembic.runtime.migration import MigrationContext

    from tenants.db import make_engine

    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
