"""``tailor_tenant_info{tenant, tenant_name} 1``: the api maps tenant ids to names for the
dashboards. A tenant this process creates appears at once; tenants that are only in the database
(made by another api process, or before a restart) appear after the scrape that starts the
background reload. The reload never runs on the request path."""

from __future__ import annotations

import time

import httpx
from prometheus_client.parser import text_string_to_metric_families
from support.live_server import serve_app
from support.platform_flows import OPERATOR_TOKEN, create_tenant

from api.app import create_app
from tenants import migrate
from tenants import repositories as repo
from tenants.db import make_session_factory, session_scope
from tenants.settings import Settings


def _tenant_info(client: httpx.Client) -> dict[str, str]:
    """tenant id -> tenant_name from the api's /metrics."""
    text = client.get("/metrics").text
    return {s.labels["tenant"]: s.labels["tenant_name"]
            for family in text_string_to_metric_families(text) if family.name == "tailor_tenant_info"
            for s in family.samples if s.value == 1}


def test_tenant_info_names_tenants_created_here_and_elsewhere(tmp_path):
    settings = Settings(_env_file=None, data_dir=tmp_path / "var", operator_token=OPERATOR_TOKEN,
                        inference_mode="remote", inference_url="http://127.0.0.1:9")
    settings.data_dir.mkdir()
    migrate.upgrade(settings.resolved_database_url)
    with session_scope(make_session_factory(settings.resolved_database_url)) as session:
        elsewhere = repo.create_tenant(session, "made-by-another-api").id  # only in the database
    with serve_app(create_app(settings)) as base_url, httpx.Client(base_url=base_url, timeout=10) as client:
        tenant, _admin = create_tenant(client, OPERATOR_TOKEN, 'Acme "Labs"')
        assert _tenant_info(client)[tenant["id"]] == 'Acme "Labs"'  # at once, without a reload
        deadline = time.monotonic() + 10
        while elsewhere not in (names := _tenant_info(client)):
            assert time.monotonic() < deadline, f"the reload from the database never came: {names}"
            time.sleep(0.1)
        assert names == {tenant["id"]: 'Acme "Labs"', elsewhere: "made-by-another-api"}
