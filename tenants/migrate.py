"""Run the metadata migrations programmatically (for ``tailor db upgrade`` and tests).

The Alembic scripts live in ``migrations/`` at the repository root, found relative to this file;
the database URL is handed to ``migrations/env.py`` through the config (it wins over the
``TAILOR_DATABASE_URL`` environment variable that a bare ``alembic`` command line uses).
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import URL

from tenants.db import normalize_url

REPO_ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS_DIR = REPO_ROOT / "migrations"


def alembic_config(database_url: str | URL) -> Config:
    """An Alembic config for the repo's migrations and ``database_url`` (no alembic.ini needed)."""
    ini = REPO_ROOT / "alembic.ini"
    config = Config(str(ini)) if ini.exists() else Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    url = normalize_url(database_url).render_as_string(hide_password=False)
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))  # ConfigParser interpolation
    return config


def upgrade(database_url: str | URL, revision: str = "head") -> None:
    """Migrate the database up to ``revision`` (default: the newest)."""
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str | URL, revision: str = "base") -> None:
    """Migrate the database down to ``revision`` (default: empty)."""
    command.downgrade(alembic_config(database_url), revision)


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
