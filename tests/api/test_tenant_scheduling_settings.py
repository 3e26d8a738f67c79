"""A tenant's fair-share weight (the operator's alone) and its default first-token SLO, through the
public API: who may set which, validation naming every problem, and what the answers show."""

from __future__ import annotations

import json

import pytest

from support.platform_flows import OPERATOR_TOKEN, bearer, create_key, create_tenant


@pytest.fixture(scope="module")
def tenant(client):
    """A tenant created with the defaults: ``(tenant, admin key, chat key)``."""
    created, admin = create_tenant(client, OPERATOR_TOKEN, "scheduling-settings")
    return created, admin, create_key(client, admin, "chat")


def _own(client, admin: str) -> dict:
    r = client.get("/v1/tenant", headers=bearer(admin))
    assert r.status_code == 200, r.text
    return r.json()


def _locs(response) -> set[tuple]:
    assert response.status_code == 422, response.text
    return {tuple(problem["loc"]) for problem in response.json()["detail"]}


def test_a_new_tenant_has_weight_1_and_no_slo_unless_the_operator_says_otherwise(client, tenant):
    created, admin, _chat = tenant
    assert (created["fair_share_weight"], created["ttft_slo_s"]) == (1.0, None)
    own = _own(client, admin)
    assert (own["fair_share_weight"], own["ttft_slo_s"]) == (1.0, None)
    heavy, heavy_admin = create_tenant(client, OPERATOR_TOKEN, "scheduling-heavy", fair_share_weight=4,
                                       ttft_slo_s=2.5)
    assert (heavy["fair_share_weight"], heavy["ttft_slo_s"]) == (4.0, 2.5)
    own = _own(client, heavy_admin)
    assert (own["fair_share_weight"], own["ttft_slo_s"]) == (4.0, 2.5)


def test_the_operator_sets_weight_and_slo_and_omitted_fields_stay(client, tenant):
    created, admin, _chat = tenant
    path = f"/v1/tenants/{created['id']}"
    try:
        r = client.patch(path, json={"fair_share_weight": 2.5}, headers=bearer(OPERATOR_TOKEN))
        assert r.status_code == 200, r.text
        assert (r.json()["id"], r.json()["fair_share_weight"], r.json()["ttft_slo_s"]) == (created["id"], 2.5, None)
        r = client.patch(path, json={"ttft_slo_s": 6}, headers=bearer(OPERATOR_TOKEN))
        assert (r.json()["fair_share_weight"], r.json()["ttft_slo_s"]) == (2.5, 6.0), r.text
        own = _own(client, admin)  # what the tenant's admin sees
        assert (own["fair_share_weight"], own["ttft_slo_s"]) == (2.5, 6.0)
        assert own["name"] == created["name"] and own["system_prompt"] is None
        r = client.patch(path, json={"ttft_slo_s": None}, headers=bearer(OPERATOR_TOKEN))
        assert (r.json()["fair_share_weight"], r.json()["ttft_slo_s"]) == (2.5, None), r.text
        r = client.patch(path, json={}, headers=bearer(OPERATOR_TOKEN))
        assert (r.json()["fair_share_weight"], r.json()["ttft_slo_s"]) == (2.5, None), r.text
    finally:
        client.patch(path, json={"fair_share_weight": 1.0, "ttft_slo_s": None}, headers=bearer(OPERATOR_TOKEN))


def test_only_the_operator_token_opens_the_operator_route(client, tenant):
    created, admin, chat_key = tenant
    path = f"/v1/tenants/{created['id']}"
    assert client.patch(path, json={"fair_share_weight": 9.0}).status_code == 401
    for token in ("wrong", admin, chat_key):
        r = client.patch(path, json={"fair_share_weight": 9.0}, headers=bearer(token))
        assert r.status_code == 401, r.text
    assert _own(client, admin)["fair_share_weight"] == 1.0


def test_an_unknown_tenant_is_404(client):
    for tenant_id in ("0" * 32, "not-an-id"):
        r = client.patch(f"/v1/tenants/{tenant_id}", json={"fair_share_weight": 2.0}, headers=bearer(OPERATOR_TOKEN))
        assert r.status_code == 404, r.text


def test_a_tenant_admin_sets_its_own_slo_but_never_its_weight(client, tenant):
    _created, admin, chat_key = tenant
    try:
        r = client.patch("/v1/tenant", json={"ttft_slo_s": 3.0}, headers=bearer(admin))
        assert r.status_code == 200 and (r.json()["fair_share_weight"], r.json()["ttft_slo_s"]) == (1.0, 3.0), r.text
        for body in ({"fair_share_weight": 100.0}, {"fair_share_weight": 100.0, "ttft_slo_s": 1.0},
                     {"system_prompt": "hi", "fair_share_weight": 2.0}):
            r = client.patch("/v1/tenant", json=body, headers=bearer(admin))
            assert ("body", "fair_share_weight") in _locs(r), r.text
            assert r.json()["detail"][0]["type"] == "extra_forbidden"
        assert client.patch("/v1/tenant", json={"ttft_slo_s": 1.0}, headers=bearer(chat_key)).status_code == 403
        own = _own(client, admin)  # nothing of the refused bodies was applied
        assert (own["fair_share_weight"], own["ttft_slo_s"], own["system_prompt"]) == (1.0, 3.0, None)
        r = client.patch("/v1/tenant", json={"ttft_slo_s": None}, headers=bearer(admin))
        assert r.status_code == 200 and r.json()["ttft_slo_s"] is None, r.text
    finally:
        client.patch("/v1/tenant", json={"ttft_slo_s": None}, headers=bearer(admin))


BAD_WEIGHTS = [0, -1.0, 1000.5, "2", True, None]
BAD_SLOS = [0, -0.5, 3600.5, "5", False]


@pytest.mark.parametrize("weight", BAD_WEIGHTS, ids=repr)
@pytest.mark.parametrize("slo", BAD_SLOS, ids=repr)
def test_operator_bodies_name_every_problem(client, tenant, weight, slo):
    created, admin, _chat = tenant
    r = client.patch(f"/v1/tenants/{created['id']}", json={"fair_share_weight": weight, "ttft_slo_s": slo},
                     headers=bearer(OPERATOR_TOKEN))
    assert {("body", "fair_share_weight"), ("body", "ttft_slo_s")} <= _locs(r), r.text
    assert _own(client, admin)["fair_share_weight"] == 1.0


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_values_are_refused_everywhere(client, tenant, raw):
    created, admin, _chat = tenant
    cases = [
        ("PATCH", f"/v1/tenants/{created['id']}", OPERATOR_TOKEN, f'{{"fair_share_weight": {raw}, "ttft_slo_s": {raw}}}',
         {("body", "fair_share_weight"), ("body", "ttft_slo_s")}),
        ("PATCH", "/v1/tenant", admin, f'{{"ttft_slo_s": {raw}}}', {("body", "ttft_slo_s")}),
        ("POST", "/v1/tenants", OPERATOR_TOKEN, f'{{"name": "nan-{raw}", "fair_share_weight": {raw}}}',
         {("body", "fair_share_weight")}),
    ]
    for method, path, token, body, expected in cases:
        r = client.request(method, path, content=body, headers={**bearer(token), "Content-Type": "application/json"})
        assert expected <= _locs(r), (path, r.text)
        json.dumps(r.json(), allow_nan=False)  # the answer itself is strict JSON
    own = _own(client, admin)
    assert (own["fair_share_weight"], own["ttft_slo_s"]) == (1.0, None)


def test_a_chat_request_slo_is_validated_with_the_other_fields(client, tenant):
    created, admin, chat_key = tenant
    user = client.post("/v1/users", json={"external_id": "slo-validation"}, headers=bearer(admin)).json()
    for slo in (0, -1, 3601, "2", True):
        r = client.post(f"/v1/users/{user['id']}/chat", json={"message": "hi", "ttft_slo_s": slo, "temperature": 9},
                        headers=bearer(chat_key))
        assert {("body", "ttft_slo_s"), ("body", "temperature")} <= _locs(r), r.text
    r = client.post(f"/v1/users/{user['id']}/chat", content='{"message": "hi", "ttft_slo_s": NaN}',
                    headers={**bearer(chat_key), "Content-Type": "application/json"})
    assert ("body", "ttft_slo_s") in _locs(r), r.text
