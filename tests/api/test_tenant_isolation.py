"""Tenant isolation on every route, and the tenant's system prompt reaching the model.

Two tenants, A and B, each with an admin key, a chat key, a user, a ready adapter named
``shared-style`` (different weights) and stored messages; A also has a ready adapter
``alpha-only``. ``PROBES`` maps every served route to a probe that uses tenant B's credentials
against tenant A's objects (404 by id, absent from lists, unchanged afterwards) and checks that B
still gets its own objects. ``test_every_route_has_a_cross_tenant_probe`` compares the table with
``app.routes``: a new route fails it until a probe for it is written here (or it joins the short
``NO_TENANT_DATA`` list of routes that hold no tenant's objects).

The app runs on the tiny test model with a ``RecordingInference`` around the real engine, so the
tests see exactly which prompt tokens and which adapter id reached the engine; greedy outputs
computed directly on the same engine back that up behaviourally.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load, save

from api.app import create_app
from inference import LLM, SamplingParams
from inference.service.core import InferenceCore
from support.platform_flows import (
    OPERATOR_TOKEN,
    adapter_files,
    bearer,
    chat,
    messages,
    upload_adapter,
    wait_for_status,
    write_adapter,
)
from support.recording_inference import RecordingInference
from support.routes import served_routes
from tenants.platform import Platform

SYSTEM_PROMPT_A = "You are Zorblax, the terse concierge of tenant A. Never mention tenant B."
MAX_TOKENS = 8
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)

# Routes that hold no tenant's objects: health, metrics, the schema and docs, and tenant creation
# (operator token only; tested in test_platform_api). Everything else needs a probe in PROBES.
NO_TENANT_DATA = {
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    ("GET", "/docs/assets/{name}"),
    ("POST", "/v1/tenants"),
}


# --- the app on a recording backend ----------------------------------------------------------------


@pytest.fixture(scope="module")
def recorded_app(api_settings):
    platform = Platform.from_settings(api_settings)
    llm = LLM(api_settings.model, adapter_store=platform.store, **api_settings.engine_options())
    core = InferenceCore(llm)
    recorder = RecordingInference(core)
    try:
        with TestClient(create_app(api_settings, inference=recorder, platform=platform)) as test_client:
            yield test_client, recorder
    finally:
        core.close()
        platform.close()


@pytest.fixture(scope="module")
def client(recorded_app):
    return recorded_app[0]


@pytest.fixture(scope="module")
def recorder(recorded_app) -> RecordingInference:
    return recorded_app[1]


# --- the two tenants -------------------------------------------------------------------------------


@dataclass
class Tenant:
    tenant: dict
    admin: str
    chat: str
    admin_key_id: str
    chat_key_id: str
    user: dict
    adapters: dict[str, dict] = field(default_factory=dict)  # name -> the ready adapter
    message_ids: list[str] = field(default_factory=list)
    example_ids: list[str] = field(default_factory=list)  # training examples of the user (one from feedback)
    job_id: str | None = None  # a training job of the user, queued and never run

    @property
    def keys(self) -> tuple[str, str]:
        return self.admin, self.chat


@dataclass
class World:
    client: TestClient
    recorder: RecordingInference
    a: Tenant
    b: Tenant
    nan_adapter_files: list


def _make_tenant(client, name: str, external_id: str, **extra) -> Tenant:
    r = client.post("/v1/tenants", json={"name": name, **extra}, headers=bearer(OPERATOR_TOKEN))
    assert r.status_code == 201, r.text
    tenant = r.json()
    admin = tenant["api_key"]
    r = client.post("/v1/api-keys", json={"scope": "chat"}, headers=bearer(admin))
    assert r.status_code == 201, r.text
    r_user = client.post("/v1/users", json={"external_id": external_id}, headers=bearer(admin))
    assert r_user.status_code == 201, r_user.text
    return Tenant(tenant, admin, r.json()["api_key"], tenant["api_key_id"], r.json()["id"], r_user.json())


def _nan_files(adapter_dir) -> list:
    """The adapter's files with one NaN weight: accepted at upload (202), failed by validation."""
    tensors = load((adapter_dir / "adapter_model.safetensors").read_bytes())
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")
    return [("files", ("adapter_config.json", (adapter_dir / "adapter_config.json").read_bytes(), "application/json")),
            ("files", ("adapter_model.safetensors", save(tensors), "application/octet-stream"))]


@pytest.fixture(scope="module")
def world(client, recorder, tmp_path_factory, tiny_model_config) -> World:
    root = tmp_path_factory.mktemp("isolation-adapters")
    a = _make_tenant(client, "isolation-a", "shared-person", system_prompt=SYSTEM_PROMPT_A)
    b = _make_tenant(client, "isolation-b", "b-person")
    uploads = [  # (tenant, name, seed, assign to the tenant's user)
        (a, "shared-style", 11, True),
        (a, "alpha-only", 12, False),
        (b, "shared-style", 21, True),
    ]
    pending = []
    for tenant, name, seed, assign in uploads:
        files = adapter_files(write_adapter(root / f"{tenant.tenant['name']}-{name}", tiny_model_config, seed=seed))
        r = upload_adapter(client, tenant.admin, name, files, user_id=tenant.user["id"] if assign else None)
        assert r.status_code == 202, r.text
        pending.append((tenant, name, r.json()["id"]))
    for tenant, name, adapter_id in pending:
        adapter = wait_for_status(client, tenant.admin, adapter_id)
        assert adapter["status"] == "ready", adapter
        tenant.adapters[name] = adapter
    for tenant in (a, b):
        r = chat(client, tenant.chat, tenant.user["id"], f"hello from {tenant.tenant['name']}")
        assert r.status_code == 200, r.text
        assert r.json()["adapter_id"] == tenant.adapters["shared-style"]["id"]
        tenant.message_ids = [m["id"] for m in messages(client, tenant.chat, tenant.user["id"])["data"]]
        assert len(tenant.message_ids) == 2
    assert a.adapters["shared-style"]["id"] != b.adapters["shared-style"]["id"]
    for tenant in (a, b):
        _add_training_data(client, tenant)
    nan_files = _nan_files(write_adapter(root / "nan", tiny_model_config, seed=31))
    return World(client, recorder, a, b, nan_files)


def _example(tenant: Tenant, i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i} of {tenant.tenant['name']}"},
                         {"role": "assistant", "content": f"answer {i} of {tenant.tenant['name']}"}]}


def _add_training_data(client, tenant: Tenant) -> None:
    """Four examples, an approval of the user's answer (a fifth) and a queued training job that no
    worker runs (inserted directly: a real one would change the user's adapter)."""
    from tenants.db import session_scope
    from tenants.training.repository import create_job

    user_id = tenant.user["id"]
    for i in range(4):
        r = client.post(f"/v1/users/{user_id}/examples", json=_example(tenant, i), headers=bearer(tenant.admin))
        assert r.status_code == 201, r.text
        tenant.example_ids.append(r.json()["id"])
    r = client.post(f"/v1/users/{user_id}/messages/{tenant.message_ids[1]}/feedback", json={"rating": 1},
                    headers=bearer(tenant.chat))
    assert r.status_code == 201 and r.json()["example"] is not None, r.text
    tenant.example_ids.append(r.json()["example"]["id"])
    with session_scope(client.app.state.tailor.platform.session_factory) as session:
        tenant.job_id = create_job(session, tenant.tenant["id"], user_id, {"start_from": "fresh"}, 5).id


# --- helpers ---------------------------------------------------------------------------------------


def ids(items) -> set[str]:
    return {item["id"] for item in items}


def a_objects(w: World) -> set[str]:
    """Every id of tenant A's objects: tenant, keys, user, adapters, messages."""
    a = w.a
    return {a.tenant["id"], a.admin_key_id, a.chat_key_id, a.user["id"], *ids(a.adapters.values()), *a.message_ids,
            *a.example_ids, a.job_id}


def assert_no_a_ids(w: World, body) -> None:
    """No id of tenant A's objects anywhere in a response body."""
    text = json.dumps(body)
    leaked = sorted(i for i in a_objects(w) if i in text)
    assert not leaked, f"tenant B sees tenant A's objects {leaked}: {text[:500]}"


def a_is_intact(w: World) -> None:
    """Tenant A's user, adapters, keys and messages are as they were set up."""
    c, a = w.client, w.a
    user = c.get(f"/v1/users/{a.user['id']}", headers=bearer(a.admin))
    assert user.status_code == 200 and user.json()["current_adapter_id"] == a.adapters["shared-style"]["id"], user.text
    for adapter in a.adapters.values():
        r = c.get(f"/v1/adapters/{adapter['id']}", headers=bearer(a.admin))
        assert r.status_code == 200 and r.json()["status"] == "ready", r.text
    history = messages(c, a.chat, a.user["id"])  # also: A's chat key still works
    assert [m["id"] for m in history["data"]] == a.message_ids
    assert c.get("/v1/tenant", headers=bearer(a.admin)).json()["system_prompt"] == SYSTEM_PROMPT_A
    examples = c.get(f"/v1/users/{a.user['id']}/examples", headers=bearer(a.admin)).json()
    assert [e["id"] for e in examples["data"]] == a.example_ids
    job = c.get(f"/v1/adapter-trainings/{a.job_id}", headers=bearer(a.admin)).json()
    assert (job["status"], job["cancel_requested"]) == ("queued", False), job


def completion(c: TestClient, key: str, model: str, content: str = "Say something.") -> dict:
    r = c.post("/v1/chat/completions", headers=bearer(key), json={
        "model": model, "messages": [{"role": "user", "content": content}], "max_tokens": MAX_TOKENS,
        "temperature": 0})
    return {"status": r.status_code, "body": r.json()}


# --- one probe per route ---------------------------------------------------------------------------

PROBES: dict[tuple[str, str], Callable[[World], None]] = {}


def probe(method: str, path: str):
    def register(fn):
        PROBES[(method, path)] = fn
        return fn
    return register


@probe("GET", "/v1/tenant")
def _get_tenant(w: World):
    r = w.client.get("/v1/tenant", headers=bearer(w.b.admin))
    assert r.status_code == 200 and r.json()["id"] == w.b.tenant["id"], r.text
    assert r.json()["system_prompt"] != SYSTEM_PROMPT_A
    assert_no_a_ids(w, r.json())


@probe("PATCH", "/v1/tenant")
def _patch_tenant(w: World):
    r = w.client.patch("/v1/tenant", json={"system_prompt": "tenant B's own prompt"}, headers=bearer(w.b.admin))
    assert r.status_code == 200 and r.json()["id"] == w.b.tenant["id"], r.text
    a_is_intact(w)  # A's system prompt did not change
    r = w.client.patch("/v1/tenant", json={"system_prompt": None}, headers=bearer(w.b.admin))
    assert r.status_code == 200 and r.json()["system_prompt"] is None


@probe("PATCH", "/v1/tenants/{tenant_id}")
def _patch_tenant_as_operator(w: World):
    """The operator's route: no tenant key may use it, not even on its own tenant (a tenant must
    never raise its own fair share)."""
    before = {t.tenant["id"]: w.client.get("/v1/tenant", headers=bearer(t.admin)).json() for t in (w.a, w.b)}
    for key in w.b.keys:
        for target in (w.a, w.b):
            r = w.client.patch(f"/v1/tenants/{target.tenant['id']}", json={"fair_share_weight": 50.0},
                               headers=bearer(key))
            assert r.status_code == 401, r.text
    for t in (w.a, w.b):
        assert w.client.get("/v1/tenant", headers=bearer(t.admin)).json() == before[t.tenant["id"]]
    a_is_intact(w)


@probe("POST", "/v1/api-keys")
def _create_key(w: World):
    r = w.client.post("/v1/api-keys", json={"scope": "chat"}, headers=bearer(w.b.admin))
    assert r.status_code == 201, r.text
    new = r.json()
    assert w.client.get(f"/v1/users/{w.a.user['id']}/messages", headers=bearer(new["api_key"])).status_code == 404
    assert w.client.get(f"/v1/users/{w.b.user['id']}/messages", headers=bearer(new["api_key"])).status_code == 200
    a_keys = w.client.get("/v1/api-keys", headers=bearer(w.a.admin)).json()
    assert new["id"] not in ids(a_keys)
    assert new["id"] in ids(w.client.get("/v1/api-keys", headers=bearer(w.b.admin)).json())


@probe("GET", "/v1/api-keys")
def _list_keys(w: World):
    r = w.client.get("/v1/api-keys", headers=bearer(w.b.admin))
    assert r.status_code == 200, r.text
    assert {w.b.admin_key_id, w.b.chat_key_id} <= ids(r.json())
    assert_no_a_ids(w, r.json())
    assert {w.a.admin_key_id, w.a.chat_key_id} <= ids(w.client.get("/v1/api-keys", headers=bearer(w.a.admin)).json())


@probe("DELETE", "/v1/api-keys/{key_id}")
def _revoke_key(w: World):
    for key_id in (w.a.admin_key_id, w.a.chat_key_id):
        r = w.client.delete(f"/v1/api-keys/{key_id}", headers=bearer(w.b.admin))
        assert r.status_code == 404, r.text
    assert w.client.get("/v1/tenant", headers=bearer(w.a.admin)).status_code == 200
    a_is_intact(w)


@probe("POST", "/v1/users")
def _create_user(w: World):
    # external ids are unique per tenant: B may use A's, and gets a user of its own
    r = w.client.post("/v1/users", json={"external_id": w.a.user["external_id"]}, headers=bearer(w.b.admin))
    assert r.status_code == 201, r.text
    assert r.json()["id"] != w.a.user["id"]
    assert r.json()["id"] not in ids(w.client.get("/v1/users", headers=bearer(w.a.admin)).json())
    assert w.client.post("/v1/users", json={"external_id": w.b.user["external_id"]},
                         headers=bearer(w.b.admin)).status_code == 409


@probe("GET", "/v1/users")
def _list_users(w: World):
    for params in ({}, {"limit": 1000}, {"external_id": w.a.user["external_id"]}):
        r = w.client.get("/v1/users", params=params, headers=bearer(w.b.admin))
        assert r.status_code == 200, r.text
        assert_no_a_ids(w, r.json())
    assert w.b.user["id"] in ids(w.client.get("/v1/users", headers=bearer(w.b.admin)).json())
    assert w.a.user["id"] in ids(w.client.get("/v1/users", headers=bearer(w.a.admin)).json())


@probe("GET", "/v1/users/{user_id}")
def _get_user(w: World):
    assert w.client.get(f"/v1/users/{w.a.user['id']}", headers=bearer(w.b.admin)).status_code == 404
    assert w.client.get(f"/v1/users/{w.b.user['id']}", headers=bearer(w.b.admin)).status_code == 200


@probe("PUT", "/v1/users/{user_id}/adapter")
def _assign_adapter(w: World):
    c, a, b = w.client, w.a, w.b
    a_adapter, b_adapter = a.adapters["shared-style"]["id"], b.adapters["shared-style"]["id"]
    for adapter_id in (None, b_adapter, a_adapter):  # on A's user
        r = c.put(f"/v1/users/{a.user['id']}/adapter", json={"adapter_id": adapter_id}, headers=bearer(b.admin))
        assert r.status_code == 404, r.text
    for adapter_id in (a_adapter, a.adapters["alpha-only"]["id"]):  # A's adapter on B's own user
        r = c.put(f"/v1/users/{b.user['id']}/adapter", json={"adapter_id": adapter_id}, headers=bearer(b.admin))
        assert r.status_code == 404, r.text
    assert c.get(f"/v1/users/{b.user['id']}", headers=bearer(b.admin)).json()["current_adapter_id"] == b_adapter
    r = c.put(f"/v1/users/{b.user['id']}/adapter", json={"adapter_id": b_adapter}, headers=bearer(b.admin))
    assert r.status_code == 200, r.text
    a_is_intact(w)


@probe("POST", "/v1/adapters")
def _upload_adapter(w: World):
    c, a, b = w.client, w.a, w.b
    r = upload_adapter(c, b.admin, "b-upload", w.nan_adapter_files, user_id=a.user["id"])
    assert r.status_code == 404, r.text
    # versions count per tenant: A has "alpha-only" v1, so B's first "alpha-only" is v1 too. (The
    # upload fails validation, so B never gets a servable "alpha-only".)
    r = upload_adapter(c, b.admin, "alpha-only", w.nan_adapter_files)
    assert r.status_code == 202, r.text
    assert r.json()["version"] == 1
    assert wait_for_status(c, b.admin, r.json()["id"])["status"] == "failed"
    a_is_intact(w)


@probe("GET", "/v1/adapters")
def _list_adapters(w: World):
    queries = [{}, {"limit": 1000}, {"user_id": w.a.user["id"]}, {"name": "alpha-only"}, {"name": "shared-style"},
               *({"status": s} for s in ("ready", "pending", "failed", "deleted"))]
    for params in queries:
        r = w.client.get("/v1/adapters", params=params, headers=bearer(w.b.admin))
        assert r.status_code == 200, r.text
        assert_no_a_ids(w, r.json())
    own = w.client.get("/v1/adapters", params={"name": "shared-style"}, headers=bearer(w.b.admin)).json()["data"]
    assert ids(own) == {w.b.adapters["shared-style"]["id"]}


@probe("GET", "/v1/adapters/{adapter_id}")
def _get_adapter(w: World):
    for adapter in w.a.adapters.values():
        assert w.client.get(f"/v1/adapters/{adapter['id']}", headers=bearer(w.b.admin)).status_code == 404
    assert w.client.get(f"/v1/adapters/{w.b.adapters['shared-style']['id']}", headers=bearer(w.b.admin)).status_code == 200


@probe("DELETE", "/v1/adapters/{adapter_id}")
def _delete_adapter(w: World):
    for adapter in w.a.adapters.values():
        r = w.client.delete(f"/v1/adapters/{adapter['id']}", headers=bearer(w.b.admin))
        assert r.status_code == 404, r.text
    a_is_intact(w)


@probe("POST", "/v1/users/{user_id}/chat")
def _chat(w: World):
    c, a, b = w.client, w.a, w.b
    mark = w.recorder.mark()
    for key in b.keys:
        assert chat(c, key, a.user["id"], "hi").status_code == 404
        assert chat(c, key, a.user["id"], "hi", stream=True).status_code == 404
    assert w.recorder.since(mark) == ([], []), "a refused chat reached the engine"
    a_is_intact(w)
    # B's own chat: B's adapter, no system prompt (B has none), nothing of A's in the prompt
    r = chat(c, b.chat, b.user["id"], "hello again")
    assert r.status_code == 200, r.text
    assert r.json()["adapter_id"] == b.adapters["shared-style"]["id"]
    requests, prompts = w.recorder.since(mark)
    assert [q.system_prompt for q in requests] == [None]
    assert [p.adapter_id for p in prompts] == [b.adapters["shared-style"]["id"]]
    rendered = w.recorder.core.tokenizer.decode(list(prompts[0].token_ids), skip_special_tokens=False)
    assert "Zorblax" not in rendered and "hello from isolation-a" not in rendered


@probe("GET", "/v1/users/{user_id}/messages")
def _list_messages(w: World):
    c, a, b = w.client, w.a, w.b
    for key in b.keys:
        assert c.get(f"/v1/users/{a.user['id']}/messages", headers=bearer(key)).status_code == 404
        # A's message id as B's own cursor is as unknown as any other id
        r = c.get(f"/v1/users/{b.user['id']}/messages", params={"before": a.message_ids[-1]}, headers=bearer(key))
        assert r.status_code == 404, r.text
    own = c.get(f"/v1/users/{b.user['id']}/messages", params={"limit": 500}, headers=bearer(b.chat))
    assert own.status_code == 200 and own.json()["data"], own.text
    assert_no_a_ids(w, own.json())
    assert "isolation-a" not in own.text


@probe("DELETE", "/v1/users/{user_id}/messages")
def _delete_messages(w: World):
    for key in w.b.keys:
        assert w.client.delete(f"/v1/users/{w.a.user['id']}/messages", headers=bearer(key)).status_code == 404
    a_is_intact(w)


@probe("POST", "/v1/chat/completions")
def _completions(w: World):
    c, a, b, recorder = w.client, w.a, w.b, w.recorder
    mark = recorder.mark()
    for key in b.keys:  # A's adapter name (and id) are unknown models to B
        for model in ("alpha-only", a.adapters["alpha-only"]["id"]):
            answer = completion(c, key, model)
            assert answer["status"] == 404, answer
    assert recorder.since(mark) == ([], []), "a refused completion reached the engine"
    # the same name in both tenants: each gets its own adapter
    b_answer, a_answer = completion(c, b.chat, "shared-style"), completion(c, a.chat, "shared-style")
    assert b_answer["status"] == a_answer["status"] == 200, (b_answer, a_answer)
    b_id, a_id = b.adapters["shared-style"]["id"], a.adapters["shared-style"]["id"]
    requests, prompts = recorder.since(mark)
    assert [q.adapter.id for q in requests] == [b_id, a_id]
    assert [p.adapter_id for p in prompts] == [b_id, a_id]
    # behaviour: each answer is the greedy output of its own tenant's adapter on the same prompt
    prompt = [{"role": "user", "content": "Say something."}]
    assert prompts[0].token_ids == tuple(recorder.core.tokenizer.apply_chat_template(prompt))
    with_b, with_a = recorder.core.llm.chat([prompt, prompt], GREEDY, adapters=[b_id, a_id])
    assert with_b.text != with_a.text, "the two adapters must answer differently for this check to mean anything"
    assert b_answer["body"]["choices"][0]["message"]["content"] == with_b.text
    assert a_answer["body"]["choices"][0]["message"]["content"] == with_a.text


@probe("GET", "/v1/models")
def _models(w: World):
    for key in w.b.keys:
        r = w.client.get("/v1/models", headers=bearer(key))
        assert r.status_code == 200, r.text
        names = {m["id"] for m in r.json()["data"]}
        assert "shared-style" in names and "alpha-only" not in names, names
        assert_no_a_ids(w, r.json())
    a_names = {m["id"] for m in w.client.get("/v1/models", headers=bearer(w.a.chat)).json()["data"]}
    assert {"shared-style", "alpha-only"} <= a_names


@probe("POST", "/v1/users/{user_id}/examples")
def _create_example(w: World):
    r = w.client.post(f"/v1/users/{w.a.user['id']}/examples", json=_example(w.b, 9), headers=bearer(w.b.admin))
    assert r.status_code == 404, r.text
    r = w.client.post(f"/v1/users/{w.b.user['id']}/examples", json=_example(w.b, 9), headers=bearer(w.b.admin))
    assert r.status_code == 201, r.text
    assert w.client.delete(f"/v1/users/{w.b.user['id']}/examples/{r.json()['id']}",
                           headers=bearer(w.b.admin)).status_code == 204
    a_is_intact(w)


@probe("GET", "/v1/users/{user_id}/examples")
def _list_examples(w: World):
    assert w.client.get(f"/v1/users/{w.a.user['id']}/examples", headers=bearer(w.b.admin)).status_code == 404
    own = w.client.get(f"/v1/users/{w.b.user['id']}/examples", params={"limit": 1000}, headers=bearer(w.b.admin))
    assert own.status_code == 200 and [e["id"] for e in own.json()["data"]] == w.b.example_ids, own.text
    assert own.json()["total"] == len(w.b.example_ids)
    assert_no_a_ids(w, own.json())


@probe("DELETE", "/v1/users/{user_id}/examples/{example_id}")
def _delete_example(w: World):
    for user_id in (w.a.user["id"], w.b.user["id"]):  # A's example by A's user, and by B's own user
        for example_id in w.a.example_ids:
            r = w.client.delete(f"/v1/users/{user_id}/examples/{example_id}", headers=bearer(w.b.admin))
            assert r.status_code == 404, r.text
    a_is_intact(w)


@probe("POST", "/v1/users/{user_id}/messages/{message_id}/feedback")
def _feedback(w: World):
    for key in w.b.keys:
        for user_id in (w.a.user["id"], w.b.user["id"]):  # A's answer by A's user, and by B's own user
            r = w.client.post(f"/v1/users/{user_id}/messages/{w.a.message_ids[1]}/feedback",
                              json={"rating": -1, "correction": "tenant B's words"}, headers=bearer(key))
            assert r.status_code == 404, r.text
    a_is_intact(w)  # A's feedback example is still the approval it was


@probe("POST", "/v1/users/{user_id}/adapter-trainings")
def _start_training(w: World):
    for body in ({}, {"start_from": "current"}):
        r = w.client.post(f"/v1/users/{w.a.user['id']}/adapter-trainings", json=body, headers=bearer(w.b.admin))
        assert r.status_code == 404, r.text
    own = w.client.get(f"/v1/users/{w.a.user['id']}/adapter-trainings", headers=bearer(w.a.admin)).json()
    assert [j["id"] for j in own["data"]] == [w.a.job_id]
    a_is_intact(w)


@probe("GET", "/v1/adapter-trainings/{job_id}")
def _get_training(w: World):
    assert w.client.get(f"/v1/adapter-trainings/{w.a.job_id}", headers=bearer(w.b.admin)).status_code == 404
    r = w.client.get(f"/v1/adapter-trainings/{w.b.job_id}", headers=bearer(w.b.admin))
    assert r.status_code == 200 and r.json()["user_id"] == w.b.user["id"], r.text


@probe("GET", "/v1/users/{user_id}/adapter-trainings")
def _list_trainings(w: World):
    assert w.client.get(f"/v1/users/{w.a.user['id']}/adapter-trainings", headers=bearer(w.b.admin)).status_code == 404
    own = w.client.get(f"/v1/users/{w.b.user['id']}/adapter-trainings", headers=bearer(w.b.admin))
    assert own.status_code == 200 and [j["id"] for j in own.json()["data"]] == [w.b.job_id], own.text
    assert_no_a_ids(w, own.json())


@probe("DELETE", "/v1/adapter-trainings/{job_id}")
def _cancel_training(w: World):
    assert w.client.delete(f"/v1/adapter-trainings/{w.a.job_id}", headers=bearer(w.b.admin)).status_code == 404
    a_is_intact(w)  # still queued, no cancellation asked


# --- the tests -------------------------------------------------------------------------------------


def test_every_route_has_a_cross_tenant_probe(client):
    served = served_routes(client.app)
    unprobed = served - set(PROBES) - NO_TENANT_DATA
    assert not unprobed, f"routes without a cross-tenant probe in {__name__}.PROBES: {sorted(unprobed)}"
    stale = set(PROBES) - served
    assert not stale, f"probes for routes the app no longer serves: {sorted(stale)}"
    assert len(PROBES) >= 17


@pytest.mark.parametrize("route", sorted(PROBES), ids=lambda route: f"{route[0]} {route[1]}")
def test_tenant_b_cannot_reach_tenant_a(world, route):
    PROBES[route](world)


def test_tenant_system_prompt_reaches_the_model(world, client, recorder):
    """The tenant's system prompt opens the prompt the engine receives, and changes the answer."""
    r = client.post("/v1/users", json={"external_id": "prompt-user"}, headers=bearer(world.a.admin))
    assert r.status_code == 201, r.text
    user_id = r.json()["id"]
    question = "Hello, who are you?"
    mark = recorder.mark()
    for stream in (False, True):
        r = chat(client, world.a.chat, user_id, question, stream=stream)
        assert r.status_code == 200, r.text
        assert client.delete(f"/v1/users/{user_id}/messages", headers=bearer(world.a.chat)).status_code == 204
    requests, prompts = recorder.since(mark)
    assert [q.system_prompt for q in requests] == [SYSTEM_PROMPT_A] * 2
    conversation = [{"role": "system", "content": SYSTEM_PROMPT_A}, {"role": "user", "content": question}]
    expected_ids = tuple(recorder.core.tokenizer.apply_chat_template(conversation))
    assert [p.token_ids for p in prompts] == [expected_ids] * 2
    system_ids = recorder.core.tokenizer.encode(SYSTEM_PROMPT_A)
    assert any(expected_ids[i:i + len(system_ids)] == tuple(system_ids) for i in range(len(expected_ids))), \
        "the system prompt's tokens are not in the prompt"

    # behaviour: the answer is the greedy reply to system prompt + question, not to the question alone
    r = chat(client, world.a.chat, user_id, question)
    assert r.status_code == 200, r.text
    with_prompt, without = recorder.core.llm.chat([conversation, conversation[1:]], GREEDY)
    assert with_prompt.text != without.text, "the system prompt must change this answer for the check to mean anything"
    assert r.json()["message"]["content"] == with_prompt.text


def test_system_prompt_update_applies_to_the_next_chat(world, client, recorder):
    """PATCH /v1/tenant changes what the very next chat sends; null removes the system prompt."""
    r = client.post("/v1/users", json={"external_id": "prompt-user-2"}, headers=bearer(world.b.admin))
    user_id = r.json()["id"]
    try:
        for prompt in ("Speak like a pirate, tenant B.", None):
            assert client.patch("/v1/tenant", json={"system_prompt": prompt}, headers=bearer(world.b.admin)).status_code == 200
            mark = recorder.mark()
            assert chat(client, world.b.chat, user_id, "hi").status_code == 200
            requests, prompts = recorder.since(mark)
            assert [q.system_prompt for q in requests] == [prompt]
            rendered = recorder.core.tokenizer.decode(list(prompts[0].token_ids), skip_special_tokens=False)
            if prompt is not None:
                assert prompt in rendered, rendered
            else:
                assert "pirate" not in rendered, rendered
            assert SYSTEM_PROMPT_A not in rendered
    finally:
        client.patch("/v1/tenant", json={"system_prompt": None}, headers=bearer(world.b.admin))


def _scheduled(client, recorder, tenants) -> tuple[list, list]:
    """One platform chat and one OpenAI-compatible completion per tenant, in order: what the api
    sent (tenant, weight, SLO) and what the engine's requests got."""
    mark = recorder.mark()
    for tenant in tenants:
        r = chat(client, tenant.chat, tenant.user["id"], "fair?")
        assert r.status_code == 200, r.text
        assert completion(client, tenant.chat, "shared-style")["status"] == 200
    requests, prompts = recorder.since(mark)
    return ([(q.tenant, q.tenant_weight, q.ttft_slo_s) for q in requests],
            [(p.tenant, p.tenant_weight, p.ttft_slo_s) for p in prompts])


def test_generations_are_scheduled_as_the_callers_tenant(world, client, recorder):
    """The platform chat route and the OpenAI-compatible route tell the engine whose request it is
    (its fair share, docs/design.md "Scheduling") with that tenant's own weight and default SLO:
    the default weight and no SLO first; then the operator gives A and B different weights and A
    an SLO, B's admin gives B another SLO, and each request carries its own tenant's values
    (never the other's, nor the first caller's), from the very next request on, in any order."""
    a, b = world.a, world.b
    a_id, b_id = a.tenant["id"], b.tenant["id"]
    sent, engine = _scheduled(client, recorder, (a, b))
    assert sent == engine == [(a_id, 1.0, None)] * 2 + [(b_id, 1.0, None)] * 2
    try:
        for tenant_id, body in ((a_id, {"fair_share_weight": 3.0, "ttft_slo_s": 120.0}),
                                (b_id, {"fair_share_weight": 0.5})):
            r = client.patch(f"/v1/tenants/{tenant_id}", json=body, headers=bearer(OPERATOR_TOKEN))
            assert r.status_code == 200 and r.json()["id"] == tenant_id, r.text
        r = client.patch("/v1/tenant", json={"ttft_slo_s": 240.0}, headers=bearer(b.admin))
        assert r.status_code == 200 and (r.json()["fair_share_weight"], r.json()["ttft_slo_s"]) == (0.5, 240.0), r.text
        expected_a, expected_b = [(a_id, 3.0, 120.0)] * 2, [(b_id, 0.5, 240.0)] * 2
        for order, expected in (((a, b), expected_a + expected_b), ((b, a), expected_b + expected_a)):
            sent, engine = _scheduled(client, recorder, order)
            assert sent == engine == expected
    finally:
        for tenant_id in (a_id, b_id):
            r = client.patch(f"/v1/tenants/{tenant_id}", json={"fair_share_weight": 1.0, "ttft_slo_s": None},
                             headers=bearer(OPERATOR_TOKEN))
            assert r.status_code == 200, r.text
