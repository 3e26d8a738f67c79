"""A route's writes are committed before its answer is sent, so a client that acts on a 2xx at
once finds them (create a tenant, use its key at once; set a weight, read it back at once).

FastAPI ends a dependency with ``yield`` after the response has been sent unless it is scoped to
the route function; the session dependency (``api.deps.get_session``) commits on its way out, so it
must be ``scope="function"``. Here every commit is slowed down by a SQLAlchemy engine event, which
makes a commit that ran after the answer lose the race every time (it did: the next request
answered 401 for the key just shown)."""

from __future__ import annotations

import time

import httpx
from sqlalchemy import event

from api.app import create_app
from support.live_server import serve_app
from support.platform_flows import OPERATOR_TOKEN, bearer
from tenants.platform import Platform

COMMIT_DELAY_S = 0.3


def test_writes_are_visible_to_the_next_request_at_once(api_settings):
    platform = Platform.from_settings(api_settings)
    engine = platform.session_factory.kw["bind"]

    def slow_commit(_connection) -> None:
        time.sleep(COMMIT_DELAY_S)

    event.listen(engine, "commit", slow_commit)
    try:
        with serve_app(create_app(api_settings, platform=platform)) as url, httpx.Client(base_url=url, timeout=60) as c:
            for i in range(3):
                r = c.post("/v1/tenants", json={"name": f"commit-order-{i}-{time.time_ns()}"}, headers=bearer(OPERATOR_TOKEN))
                assert r.status_code == 201, r.text
                tenant_id, admin = r.json()["id"], r.json()["api_key"]
                r = c.post("/v1/api-keys", json={"scope": "chat"}, headers=bearer(admin))
                assert r.status_code == 201, r.text
                r = c.patch(f"/v1/tenants/{tenant_id}", json={"fair_share_weight": 3.0}, headers=bearer(OPERATOR_TOKEN))
                assert r.status_code == 200, r.text
                assert c.get("/v1/tenant", headers=bearer(admin)).json()["fair_share_weight"] == 3.0
    finally:
        event.remove(engine, "commit", slow_commit)
        platform.close()
