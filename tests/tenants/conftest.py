"""Database fixtures for the tenant metadata tests: SQLite files and a real PostgreSQL (pgserver).

PostgreSQL comes from the ``pgserver`` wheel (a bundled PostgreSQL 16), started once per test
session in a temporary directory. As root, pgserver runs the server as a system user
``pgserver`` that it creates with ``useradd`` (and it opens o+rx on the data directory's parents).
Each test that needs an empty database gets its own ``CREATE DATABASE``.
"""

from __future__ import annotations

import uuid

import pytest

BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory):
    import pgserver
    server = pgserver.get_server(tmp_path_factory.mktemp("pg"), cleanup_mode="stop")
    yield server
    server.cleanup()


def _new_pg_database(server) -> tuple[str, callable]:
    import psycopg

    admin_uri = server.get_uri()
    name = f"tailor_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_uri, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(admin_uri, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return server.get_uri(name), drop


def _new_database(request, backend: str, directory) -> tuple[str, callable]:
    if backend == "sqlite":
        return f"sqlite:///{directory / 'tailor.db'}", lambda: None
    return _new_pg_database(request.getfixturevalue("pg_server"))


@pytest.fixture(params=BACKENDS)
def empty_database_url(request, tmp_path):
    """The URL of a new, empty database (function-scoped), on each backend."""
    url, drop = _new_database(request, request.param, tmp_path)
    yield url
    drop()


@pytest.fixture(scope="session", params=BACKENDS)
def migrated_database_url(request, tmp_path_factory):
    """One database per backend, migrated to head, shared by a session's tests (use fresh tenants)."""
    from tenants import migrate

    url, drop = _new_database(request, request.param, tmp_path_factory.mktemp(f"db-{request.param}"))
    migrate.upgrade(url)
    yield url
    drop()


@pytest.fixture(scope="session")
def session_factory(migrated_database_url):
    from tenants.db import make_engine, make_session_factory

    engine = make_engine(migrated_database_url)
    yield make_session_factory(engine)
    engine.dispose()
