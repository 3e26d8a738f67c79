"""The public API on the embedded default: auth and scopes, tenant isolation, users, adapter
upload and validation, chat with history and a personal adapter, SSE, bad input."""

from __future__ import annotations

import io
import json

import pytest
import torch
from safetensors.torch import load, save

from support.platform_flows import (
    OPERATOR_TOKEN,
    adapter_files,
    bearer,
    chat,
    create_key,
    create_tenant,
    create_user,
    messages,
    parse_sse,
    tar_gz_bytes,
    upload_adapter,
    wait_for_status,
    write_adapter,
    zip_bytes,
)


@pytest.fixture(scope="module")
def tenant_a(client):
    tenant, admin = create_tenant(client, OPERATOR_TOKEN, "tenant-a", system_prompt="You are terse.")
    return tenant, admin, create_key(client, admin, "chat")


@pytest.fixture(scope="module")
def tenant_b(client):
    tenant, admin = create_tenant(client, OPERATOR_TOKEN, "tenant-b")
    return tenant, admin, create_key(client, admin, "chat")


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_config):
    return write_adapter(tmp_path_factory.mktemp("adapter"), tiny_model_config, seed=7)


def store_keys(client) -> list[str]:
    return client.app.state.tailor.platform.store.list_keys("tenants")


# --- auth -------------------------------------------------------------------------------------------


def test_tenant_creation_needs_the_operator_token(client):
    assert client.post("/v1/tenants", json={"name": "x"}).status_code == 401
    assert client.post("/v1/tenants", json={"name": "x"}, headers=bearer("wrong")).status_code == 401
    tenant, admin = create_tenant(client, OPERATOR_TOKEN, "dup-check")
    assert admin.startswith("tk_") and tenant["id"]
    r = client.post("/v1/tenants", json={"name": "dup-check"}, headers=bearer(OPERATOR_TOKEN))
    assert r.status_code == 409


def test_scopes_and_revocation(client, tenant_a):
    _tenant, admin, chat_key = tenant_a
    assert client.get("/v1/api-keys").status_code == 401
    assert client.get("/v1/api-keys", headers=bearer("tk_nope_nope")).status_code == 401
    assert client.get("/v1/api-keys", headers=bearer(chat_key)).status_code == 403
    assert client.post("/v1/users", json={"external_id": "x"}, headers=bearer(chat_key)).status_code == 403
    listed = client.get("/v1/api-keys", headers=bearer(admin)).json()
    assert all("api_key" not in k for k in listed) and {k["scope"] for k in listed} == {"admin", "chat"}
    extra = client.post("/v1/api-keys", json={"scope": "chat"}, headers=bearer(admin)).json()
    user = create_user(client, admin, "revocation-user")
    assert client.get(f"/v1/users/{user['id']}/messages", headers=bearer(extra["api_key"])).status_code == 200
    assert client.delete(f"/v1/api-keys/{extra['id']}", headers=bearer(admin)).status_code == 204
    assert client.get(f"/v1/users/{user['id']}/messages", headers=bearer(extra["api_key"])).status_code == 401
    assert client.delete(f"/v1/api-keys/{extra['id']}", headers=bearer(admin)).status_code == 404


def test_validation_errors_list_every_problem(client, tenant_a):
    _tenant, admin, chat_key = tenant_a
    r = client.post("/v1/api-keys", json={"scope": "root", "extra": 1}, headers=bearer(admin))
    assert r.status_code == 422
    locations = {tuple(p["loc"]) for p in r.json()["detail"]}
    assert ("body", "scope") in locations and ("body", "extra") in locations
    user = create_user(client, admin, "validation-user")
    r = client.post(f"/v1/users/{user['id']}/chat", json={"message": "", "temperature": -1, "top_p": 2},
                    headers=bearer(chat_key))
    assert r.status_code == 422 and len(r.json()["detail"]) == 3
    r = client.post(f"/v1/users/{user['id']}/chat", content=b"{not json", headers={**bearer(chat_key), "Content-Type": "application/json"})
    assert r.status_code == 422


@pytest.mark.parametrize("field,value", [
    ("seed", "42"), ("stream", "yes"), ("stream", "true"), ("stream", 1), ("max_tokens", "8"),
    ("temperature", "0.5"), ("top_p", "1"), ("message", 42),
])
def test_chat_refuses_loose_types(client, tenant_a, field, value):
    """Tailor's own request schemas are strict JSON types: a string is no number, a number or
    "yes" no boolean (the OpenAI-compatible route follows what OpenAI accepts)."""
    _tenant, admin, chat_key = tenant_a
    user = client.get("/v1/users", params={"external_id": "validation-user"}, headers=bearer(admin)).json()
    user_id = user[0]["id"] if user else create_user(client, admin, "validation-user")["id"]
    before = messages(client, chat_key, user_id)["data"]
    r = client.post(f"/v1/users/{user_id}/chat", json={"message": "hi", "max_tokens": 2, field: value},
                    headers=bearer(chat_key))
    assert r.status_code == 422, r.text
    assert ["body", field] in [p["loc"] for p in r.json()["detail"]], r.json()
    assert messages(client, chat_key, user_id)["data"] == before


@pytest.mark.parametrize("method,path,body,field", [
    ("POST", "/v1/users", {"external_id": 42}, "external_id"),
    ("POST", "/v1/api-keys", {"scope": 1}, "scope"),
    ("PATCH", "/v1/tenant", {"system_prompt": 5}, "system_prompt"),
    ("PUT", "/v1/users/{user_id}/adapter", {"adapter_id": 5}, "adapter_id"),
])
def test_admin_routes_refuse_loose_types(client, tenant_a, method, path, body, field):
    _tenant, admin, _chat = tenant_a
    user = create_user(client, admin, f"loose-{method}-{field}")
    r = client.request(method, path.replace("{user_id}", user["id"]), json=body, headers=bearer(admin))
    assert r.status_code == 422, r.text
    assert ["body", field] in [p["loc"] for p in r.json()["detail"]], r.json()


def test_body_limit_answers_413(client, tenant_a, api_settings):
    _tenant, admin, _chat = tenant_a
    big = {"external_id": "x" * (api_settings.max_body_bytes + 10)}
    assert client.post("/v1/users", json=big, headers=bearer(admin)).status_code == 413


# --- tenant isolation --------------------------------------------------------------------------------


def test_other_tenants_objects_answer_404(client, tenant_a, tenant_b, adapter_dir):
    _ta, admin_a, chat_a = tenant_a
    _tb, admin_b, chat_b = tenant_b
    user = create_user(client, admin_a, "isolated-user")
    r = upload_adapter(client, admin_a, "isolated-adapter", adapter_files(adapter_dir), user_id=user["id"])
    assert r.status_code == 202, r.text
    adapter = r.json()
    assert chat(client, chat_a, user["id"], "hi").status_code == 200
    for method, path, kwargs in [
        ("GET", f"/v1/users/{user['id']}", {}),
        ("GET", f"/v1/adapters/{adapter['id']}", {}),
        ("DELETE", f"/v1/adapters/{adapter['id']}", {}),
        ("PUT", f"/v1/users/{user['id']}/adapter", {"json": {"adapter_id": None}}),
    ]:
        assert client.request(method, path, headers=bearer(admin_b), **kwargs).status_code == 404, path
    assert client.get(f"/v1/users/{user['id']}/messages", headers=bearer(chat_b)).status_code == 404
    assert client.delete(f"/v1/users/{user['id']}/messages", headers=bearer(chat_b)).status_code == 404
    assert chat(client, chat_b, user["id"], "hi").status_code == 404
    assert client.get("/v1/adapters", headers=bearer(admin_b)).json()["data"] == []
    # tenant B uploading under A's user id is as unknown as any other id
    assert upload_adapter(client, admin_b, "x", adapter_files(adapter_dir), user_id=user["id"]).status_code == 404
    # and A still sees everything
    assert len(messages(client, chat_a, user["id"])["data"]) == 2


# --- adapters -------------------------------------------------------------------------------------


def test_upload_turns_ready_and_versions(client, tenant_a, adapter_dir, tmp_path, tiny_model_config):
    _t, admin, _c = tenant_a
    r = upload_adapter(client, admin, "versioned", adapter_files(adapter_dir))
    assert r.status_code == 202 and r.json()["status"] == "pending"
    first = wait_for_status(client, admin, r.json()["id"])
    assert first["status"] == "ready" and first["rank"] == 4
    assert first["target_modules"] == ["q_proj", "v_proj", "down_proj"]
    other = write_adapter(tmp_path / "v2", tiny_model_config, seed=8, r=2, targets=("o_proj",))
    members = {f"v2/{n}": (other / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}
    members["v2/README.md"] = b"# model card"
    r = upload_adapter(client, admin, "versioned", [("files", ("adapter.tar.gz", tar_gz_bytes(members), "application/gzip"))])
    assert r.status_code == 202, r.text
    second = wait_for_status(client, admin, r.json()["id"])
    assert (second["version"], second["status"], second["rank"]) == (2, "ready", 2)
    r = upload_adapter(client, admin, "zipped", [("files", ("a.zip", zip_bytes(
        {n: (adapter_dir / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}), "application/zip"))])
    assert wait_for_status(client, admin, r.json()["id"])["status"] == "ready"
    listed = client.get("/v1/adapters", params={"name": "versioned"}, headers=bearer(admin)).json()["data"]
    assert [a["version"] for a in listed] == [2, 1]


def _bad_uploads(adapter_dir):
    config = (adapter_dir / "adapter_config.json").read_bytes()
    weights = (adapter_dir / "adapter_model.safetensors").read_bytes()
    tensors = load(weights)
    wrong_shape = dict(tensors)
    key = sorted(wrong_shape)[0]
    wrong_shape[key] = torch.zeros(3, 3)
    missing = dict(tensors)
    missing.pop(sorted(missing)[-1])
    dora = json.loads(config)
    dora["use_dora"] = True
    rank0 = json.loads(config)
    rank0["r"] = 0
    two = lambda c, w: [("files", ("adapter_config.json", c, "application/json")),  # noqa: E731
                        ("files", ("adapter_model.safetensors", w, "application/octet-stream"))]
    return {
        "pickle": ([("files", ("adapter_config.json", config, "application/json")),
                    ("files", ("adapter_model.bin", b"\x80\x04fake pickle", "application/octet-stream"))], "pickle"),
        "truncated": (two(config, weights[: len(weights) // 2]), "truncated"),
        "wrong shape": (two(config, save(wrong_shape)), "wrong shape"),
        "missing key": (two(config, save(missing)), "missing key"),
        "dora": (two(json.dumps(dora).encode(), weights), "dora"),
        "rank 0": (two(json.dumps(rank0).encode(), weights), "r"),
        "traversal": ([("files", ("a.zip", zip_bytes({"../adapter_config.json": config,
                                                      "adapter_model.safetensors": weights}), "application/zip"))],
                      "outside the archive"),
        "too many members": ([("files", ("a.zip", zip_bytes({f"f{i}.md": b"x" for i in range(40)}), "application/zip"))],
                             "at most"),
        "missing file": ([("files", ("adapter_config.json", config, "application/json"))], "adapter_model.safetensors is missing"),
        "not json": (two(b"{nope", weights), "json"),
    }


@pytest.mark.parametrize("case", ["pickle", "truncated", "wrong shape", "missing key", "dora", "rank 0",
                                  "traversal", "too many members", "missing file", "not json"])
def test_bad_adapters_are_refused_and_nothing_is_stored(client, tenant_a, adapter_dir, case):
    _t, admin, _c = tenant_a
    files, needle = _bad_uploads(adapter_dir)[case]
    before_keys = store_keys(client)
    before = client.get("/v1/adapters", params={"name": "bad"}, headers=bearer(admin)).json()["data"]
    r = upload_adapter(client, admin, "bad", files)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, list) and needle.lower() in " ".join(detail).lower(), detail
    assert store_keys(client) == before_keys
    assert client.get("/v1/adapters", params={"name": "bad"}, headers=bearer(admin)).json()["data"] == before


def test_oversized_upload_is_413_and_stores_nothing(client, tenant_a, api_settings):
    _t, admin, _c = tenant_a
    before = store_keys(client)
    blob = io.BytesIO(b"\0" * (api_settings.max_upload_bytes + (2 << 20)))
    r = client.post("/v1/adapters", data={"name": "huge"}, files=[("files", ("adapter_model.safetensors", blob))],
                    headers=bearer(admin))
    assert r.status_code == 413
    assert store_keys(client) == before


def test_non_finite_weights_fail_in_validation_and_are_removed(client, tenant_a, adapter_dir):
    _t, admin, _c = tenant_a
    tensors = load((adapter_dir / "adapter_model.safetensors").read_bytes())
    key = sorted(tensors)[1]
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")
    files = [("files", ("adapter_config.json", (adapter_dir / "adapter_config.json").read_bytes(), "application/json")),
             ("files", ("adapter_model.safetensors", save(tensors), "application/octet-stream"))]
    r = upload_adapter(client, admin, "nan-adapter", files)
    assert r.status_code == 202, r.text
    done = wait_for_status(client, admin, r.json()["id"])
    assert done["status"] == "failed" and "nan" in done["failure_reason"].lower() and key in done["failure_reason"]
    assert not [k for k in store_keys(client) if r.json()["id"] in k]


def test_assignment_needs_a_ready_adapter(client, tenant_a, adapter_dir):
    _t, admin, _c = tenant_a
    user = create_user(client, admin, "assign-user")
    # an adapter of its own that fails validation (a NaN weight passes the upload's header checks)
    tensors = load((adapter_dir / "adapter_model.safetensors").read_bytes())
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")
    files = [("files", ("adapter_config.json", (adapter_dir / "adapter_config.json").read_bytes(), "application/json")),
             ("files", ("adapter_model.safetensors", save(tensors), "application/octet-stream"))]
    r = upload_adapter(client, admin, "assign-failed", files)
    assert r.status_code == 202, r.text
    failed = wait_for_status(client, admin, r.json()["id"])
    assert failed["status"] == "failed", failed
    r = client.put(f"/v1/users/{user['id']}/adapter", json={"adapter_id": failed["id"]}, headers=bearer(admin))
    assert r.status_code == 409, r.text
    assert client.get(f"/v1/users/{user['id']}", headers=bearer(admin)).json()["current_adapter_id"] is None
    r = client.put(f"/v1/users/{user['id']}/adapter", json={"adapter_id": "0" * 32}, headers=bearer(admin))
    assert r.status_code == 404


# --- chat -------------------------------------------------------------------------------------------


def test_personal_adapter_history_and_sse(client, tenant_a, adapter_dir):
    _t, admin, chat_key = tenant_a
    alice = create_user(client, admin, "alice")
    bob = create_user(client, admin, "bob")
    r = upload_adapter(client, admin, "alice-style", adapter_files(adapter_dir), user_id=alice["id"])
    adapter = wait_for_status(client, admin, r.json()["id"])
    assert adapter["status"] == "ready"
    assert client.get(f"/v1/users/{alice['id']}", headers=bearer(admin)).json()["current_adapter_id"] == adapter["id"]

    with_adapter = chat(client, chat_key, alice["id"], "Tell me a story")
    base = chat(client, chat_key, bob["id"], "Tell me a story")
    assert with_adapter.status_code == base.status_code == 200, (with_adapter.text, base.text)
    assert with_adapter.json()["adapter_id"] == adapter["id"] and base.json()["adapter_id"] is None
    assert with_adapter.json()["message"]["content"] != base.json()["message"]["content"]

    # the same request again is deterministic (greedy) and the history grows by two each time
    assert len(messages(client, chat_key, alice["id"])["data"]) == 2
    second = chat(client, chat_key, alice["id"], "And then?")
    assert second.status_code == 200 and second.json()["history_messages_used"] == 3
    history = messages(client, chat_key, alice["id"])["data"]
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[1]["content"] == with_adapter.json()["message"]["content"]

    # streamed: deltas add up to the stored reply
    r = chat(client, chat_key, alice["id"], "One more", stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    names = [name for name, _ in events]
    assert names[0] == "start" and names[-1] == "done" and "delta" in names
    text = "".join(data["text"] for name, data in events if name == "delta")
    assert events[-1][1]["message"]["content"] == text
    assert len(messages(client, chat_key, alice["id"])["data"]) == 6


def test_messages_paging_and_erase(client, tenant_a):
    _t, admin, chat_key = tenant_a
    user = create_user(client, admin, "pager")
    for i in range(3):
        assert chat(client, chat_key, user["id"], f"message {i}", max_tokens=2).status_code == 200
    first = messages(client, chat_key, user["id"], limit=4)
    assert len(first["data"]) == 4 and first["next_before"] == first["data"][0]["id"]
    rest = messages(client, chat_key, user["id"], limit=4, before=first["next_before"])
    assert len(rest["data"]) == 2 and rest["next_before"] is None
    assert [m["content"] for m in rest["data"] + first["data"] if m["role"] == "user"] == [f"message {i}" for i in range(3)]
    assert client.get(f"/v1/users/{user['id']}/messages", params={"before": "f" * 32}, headers=bearer(chat_key)).status_code == 404
    assert client.delete(f"/v1/users/{user['id']}/messages", headers=bearer(chat_key)).status_code == 204
    assert messages(client, chat_key, user["id"])["data"] == []


def test_history_is_trimmed_to_the_token_budget(client, tenant_a, api_settings):
    _t, admin, chat_key = tenant_a
    user = create_user(client, admin, "long-history")
    for i in range(6):
        assert chat(client, chat_key, user["id"], f"turn {i} " + "word " * 30, max_tokens=2).status_code == 200
    r = chat(client, chat_key, user["id"], "last", max_tokens=2)
    assert r.status_code == 200
    used = r.json()["history_messages_used"]
    assert 1 <= used < 13 and r.json()["usage"]["prompt_tokens"] <= api_settings.history_token_budget
    too_long = chat(client, chat_key, user["id"], "word " * 400, max_tokens=2)
    assert too_long.status_code == 422 and "tokens" in " ".join(too_long.json()["detail"])


def test_max_tokens_beyond_the_limit_is_422(client, tenant_a, api_settings):
    _t, admin, chat_key = tenant_a
    user = create_user(client, admin, "limits")
    r = chat(client, chat_key, user["id"], "hi", max_tokens=api_settings.max_tokens_limit + 1)
    assert r.status_code == 422


def test_deleted_adapter_is_no_longer_served(client, tenant_a, adapter_dir):
    _t, admin, chat_key = tenant_a
    user = create_user(client, admin, "deleter")
    r = upload_adapter(client, admin, "to-delete", adapter_files(adapter_dir), user_id=user["id"])
    adapter = wait_for_status(client, admin, r.json()["id"])
    assert chat(client, chat_key, user["id"], "hi").json()["adapter_id"] == adapter["id"]
    assert client.delete(f"/v1/adapters/{adapter['id']}", headers=bearer(admin)).status_code == 204
    assert client.get(f"/v1/adapters/{adapter['id']}", headers=bearer(admin)).json()["status"] == "deleted"
    assert chat(client, chat_key, user["id"], "hi").json()["adapter_id"] is None
    assert not [k for k in store_keys(client) if adapter["id"] in k]
    core = client.app.state.tailor.inference
    assert core.engine.adapters.registry.get(adapter["id"]) is None


def test_health(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["inference"] == "ok"
    assert client.get("/openapi.json").json()["info"]["title"] == "Tailor"


def test_archive_expanding_beyond_the_limit_is_413(client, tenant_a, api_settings):
    """A small zip of zeros that would expand past the upload limit is refused before extraction."""
    import zipfile

    _t, admin, _c = tenant_a
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("adapter_config.json", b"{}")
        zf.writestr("adapter_model.safetensors", b"\0" * (api_settings.max_upload_bytes + 1))
    assert len(buffer.getvalue()) < api_settings.max_upload_bytes // 100
    before = store_keys(client)
    r = upload_adapter(client, admin, "bomb", [("files", ("bomb.zip", buffer.getvalue(), "application/zip"))])
    assert r.status_code == 413 and "limit" in " ".join(r.json()["detail"])
    assert store_keys(client) == before


def test_the_public_adapter_statuses_are_the_enum():
    from typing import get_args

    from api.schemas import AdapterStatusName
    from tenants.models import AdapterStatus

    assert get_args(AdapterStatusName) == tuple(s.value for s in AdapterStatus)
