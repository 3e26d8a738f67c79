"""Alembic environment for Tailor's metadata database.

URL: the config's ``sqlalchemy.url`` when set (``tenants.migrate`` sets it), else the
``TAILOR_DATABASE_URL`` environment variable. A caller may also hand over an open connection as
``config.attributes["connection"]``. SQLite uses batch mode (table copies for ALTERs), with foreign
key enforcement left off during migrations as SQLite's table-rebuild procedure requires.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import pool

from tenants.db import DATABASE_URL_ENV, make_engine, normalize_url
from tenants.models import Base

config = context.config
target_metadata = Base.metadata


def _database_url() -> str:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get(DATABASE_URL_ENV)
    if not url:
        raise RuntimeError(f"no database URL: set sqlalchemy.url in the Alembic config or ${DATABASE_URL_ENV}")
    return normalize_url(url).render_as_string(hide_password=False)


def _configure(**kwargs) -> None:
    context.configure(target_metadata=target_metadata, compare_type=True, **kwargs)


def run_migrations_offline() -> None:
    url = _database_url()
    _configure(url=url, literal_binds=True, render_as_batch=url.startswith("sqlite"),
               dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def _run_with(connection) -> None:
    _configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_with(connection)
        return
    engine = make_engine(_database_url(), sqlite_foreign_keys=False, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            _run_with(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
