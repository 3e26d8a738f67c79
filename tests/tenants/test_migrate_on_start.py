"""The api migrates the schema at start (``TAILOR_MIGRATE_ON_START``, on by default), and several
api processes starting at once on one PostgreSQL database are safe: ``migrate.upgrade`` takes a
PostgreSQL advisory lock, so one migrates and the others wait, then find the schema current."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from support.live_server import CliService, start_cli_service, stop_cli_service
from support.postgres import new_pg_database

from tenants import migrate

LOCK_HELD_S = 1.5


@pytest.fixture
def fresh_pg_url(pg_server) -> Iterator[str]:
    """A new, empty database (never migrated) on the session's PostgreSQL."""
    url, drop = new_pg_database(pg_server)
    yield url
    drop()


def _head() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(migrate.alembic_config("sqlite://")).get_current_head()


def test_upgrade_waits_for_the_migration_lock(fresh_pg_url):
    """While another session holds the lock, ``upgrade`` waits and migrates nothing; then it runs."""
    with psycopg.connect(fresh_pg_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (migrate.MIGRATION_LOCK_ID,))
        errors: list[BaseException] = []

        def run() -> None:
            try:
                migrate.upgrade(fresh_pg_url)
            except BaseException as exc:  # reported by the assertion below
                errors.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        time.sleep(LOCK_HELD_S)
        assert thread.is_alive() and migrate.current(fresh_pg_url) is None, "upgrade did not wait for the lock"
        holder.execute("SELECT pg_advisory_unlock(%s)", (migrate.MIGRATION_LOCK_ID,))
        thread.join(60)
    assert not thread.is_alive() and not errors, errors
    assert migrate.current(fresh_pg_url) == _head()


def _start_api(url: str, tmp_path: Path, name: str, **extra: str) -> CliService:
    """``tailor serve api`` on ``url`` (remote inference that is not running: /healthz only)."""
    env = {"TAILOR_DATABASE_URL": url, "TAILOR_INFERENCE_MODE": "remote", "TAILOR_MODE": "development",
           "TAILOR_INFERENCE_URL": "http://127.0.0.1:9", "TAILOR_DATA_DIR": str(tmp_path / name),
           "TAILOR_OPERATOR_TOKEN": "op-migrate-test-token-0123456789", **extra}
    return start_cli_service(["serve", "api"], env, tmp_path / f"{name}.log", wait_ready=False)


def _wait_alive(service: CliService, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert service.process.poll() is None, f"the api exited with {service.process.returncode}:\n{service.log()}"
        try:
            if httpx.get(f"{service.url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"the api did not start:\n{service.log()[-5000:]}"
        time.sleep(0.1)


@pytest.mark.timeout(180)
def test_two_api_processes_starting_at_once_migrate_once(fresh_pg_url, tmp_path):
    services = [_start_api(fresh_pg_url, tmp_path, f"api-{i}") for i in range(2)]
    try:
        for service in services:
            _wait_alive(service)
        assert migrate.current(fresh_pg_url) == _head()
        assert [stop_cli_service(s) for s in services] == [0, 0], [s.log()[-3000:] for s in services]
    finally:
        for service in services:
            stop_cli_service(service)


@pytest.mark.timeout(120)
def test_migrate_on_start_can_be_turned_off(fresh_pg_url, tmp_path):
    service = _start_api(fresh_pg_url, tmp_path, "api-off", TAILOR_MIGRATE_ON_START="false")
    try:
        _wait_alive(service)
        assert migrate.current(fresh_pg_url) is None
    finally:
        assert stop_cli_service(service) == 0, service.log()[-3000:]
