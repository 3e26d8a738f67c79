"""Database fixtures for the tenant metadata tests: SQLite files and a real PostgreSQL (pgserver).

The session's PostgreSQL server is the ``pg_server`` fixture of ``support.service_fixtures``
(see ``support.postgres``); each test that needs an empty database gets its own
``CREATE DATABASE``.
"""

from __future__ import annotations

import pytest

from support.postgres import new_pg_database

BACKENDS = ("sqlite", "postgresql")


def _new_database(request, backend: str, directory) -> tuple[str, callable]:
    if backend == "sqlite":
        return f"sqlite:///{directory / 'tailor.db'}", lambda: None
    return new_pg_database(request.getfixturevalue("pg_server"))


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
