"""A real PostgreSQL for tests, from the ``pgserver`` wheel (a bundled PostgreSQL 16).

``start_pg_server`` starts one server in a directory (under a second). As root, pgserver runs the
server as a system user ``pgserver`` that it creates with ``useradd`` (and it opens o+rx on the
data directory's parents). ``new_pg_database`` makes a fresh ``CREATE DATABASE`` on it and returns
its URL with a function that drops it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path


def start_pg_server(directory: Path):
    """Start a pgserver PostgreSQL with its data in ``directory``; call ``.cleanup()`` to stop it."""
    import pgserver

    return pgserver.get_server(directory, cleanup_mode="stop")


def new_pg_database(server) -> tuple[str, Callable[[], None]]:
    """Create an empty database on ``server``: returns its URL and a function that drops it."""
    import psycopg

    admin_uri = server.get_uri()
    name = f"tailor_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_uri, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(admin_uri, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return server.get_uri(name), drop
