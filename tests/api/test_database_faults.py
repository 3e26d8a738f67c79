"""PostgreSQL stopped under a running api: every route that needs it answers 503 JSON with
Retry-After (never a text/plain 500), readiness says which part is down, and the api recovers by
itself once the database is back. A PostgreSQL of its own (pgserver), stopped and restarted on
the same data directory."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from support.platform_flows import OPERATOR_TOKEN, bearer, create_key, create_tenant, create_user
from support.postgres import start_pg_server
from tenants import migrate

from .conftest import embedded_settings


@pytest.fixture
def own_postgres():
    """``(url, stop, start)`` of a PostgreSQL that only this test uses."""
    directory = Path(tempfile.mkdtemp(prefix="tailor-pgfault-"))
    servers = [start_pg_server(directory)]
    url = servers[0].get_uri()

    def stop() -> None:
        servers[-1].cleanup()

    def start() -> None:
        servers.append(start_pg_server(directory))
        assert servers[-1].get_uri() == url

    try:
        yield url, stop, start
    finally:
        servers[-1].cleanup()
        shutil.rmtree(directory, ignore_errors=True)


def _probes(user_id: str, chat_key: str, admin_key: str) -> list[tuple[str, str, dict]]:
    chat = {"message": "Hello?", "max_tokens": 4, "temperature": 0}
    completion = {"model": "base", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    return [
        ("POST", f"/v1/users/{user_id}/chat", {"json": chat, "headers": bearer(chat_key)}),
        ("POST", f"/v1/users/{user_id}/chat", {"json": {**chat, "stream": True}, "headers": bearer(chat_key)}),
        ("GET", f"/v1/users/{user_id}/messages", {"headers": bearer(chat_key)}),
        ("POST", "/v1/chat/completions", {"json": completion, "headers": bearer(chat_key)}),
        ("POST", "/v1/chat/completions", {"json": {**completion, "stream": True}, "headers": bearer(chat_key)}),
        ("GET", "/v1/users", {"headers": bearer(admin_key)}),
        ("POST", "/v1/tenants", {"json": {"name": "late"}, "headers": bearer(OPERATOR_TOKEN)}),
    ]


def test_database_outage_answers_503_and_recovers(own_postgres, tmp_path, tiny_checkpoint):
    url, stop, start = own_postgres
    migrate.upgrade(url)
    settings = embedded_settings(tmp_path / "data", tiny_checkpoint, database_url=url, db_pool_timeout_s=2.0)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        _tenant, admin = create_tenant(client, OPERATOR_TOKEN, "acme")
        chat_key = create_key(client, admin, "chat")
        user_id = create_user(client, admin, "alice")["id"]
        probes = _probes(user_id, chat_key, admin)

        stop()
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["database"] == "unavailable"
        for method, path, options in probes:
            r = client.request(method, path, **options)
            assert r.status_code == 503, (method, path, r.status_code, r.text[:300])
            assert r.headers["content-type"].startswith("application/json"), (path, r.headers["content-type"])
            assert int(r.headers["retry-after"]) >= 1
            assert "database" in r.json()["detail"]

        start()
        assert client.get("/readyz").json()["database"] == "ok"
        for method, path, options in probes:
            r = client.request(method, path, **options)
            assert r.status_code in (200, 201), (method, path, r.status_code, r.text[:300])
        history = client.get(f"/v1/users/{user_id}/messages", headers=bearer(chat_key)).json()["data"]
        assert [m["role"] for m in history] == ["user", "assistant"] * 2  # the two chats after recovery only
