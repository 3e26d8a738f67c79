"""Fuzzing every operation of /openapi.json, and the inputs JSON cannot echo back.

* ``test_operations_conform_to_the_schema``: schemathesis strategies (driven by hypothesis) with
  valid and invalid inputs, an admin key and a chat key (the operator token for the operator's tenant routes);
  user ids in paths point at a real user half of the time, so chat bodies reach the engine. Every
  response is validated against the schema: no 5xx, a documented status code, a documented content
  type and headers, a body that matches the documented schema, and (negative mode) invalid data
  refused.
* ``test_hostile_value_in_every_field`` / ``test_non_utf8_body``: every field of every JSON-body
  operation (``VALID_BODIES`` must cover them all) set to a value Python's JSON parser accepts but
  strict JSON cannot carry back (``NaN``, ``Infinity``, ``1e400``, a lone surrogate), and bodies that
  are not UTF-8: each answers 422 with a JSON body whose ``detail`` names the field (or the body).
* ``test_fuzzed_bodies_with_a_hostile_value``: the same through schemathesis-generated valid
  bodies, with the hostile value put at a random field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from support.platform_flows import OPERATOR_TOKEN, bearer, create_key, create_tenant, create_user

CONFORMANCE_CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
                      response_headers_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzz_tenant(client):
    tenant, admin = create_tenant(client, OPERATOR_TOKEN, "fuzz-tenant")
    user = create_user(client, admin, "fuzz-user")
    return {"admin": admin, "chat": create_key(client, admin, "chat"), "user_id": user["id"], "tenant_id": tenant["id"]}


def _schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def _operations(app):
    return [result.ok() for result in _schema(app).get_all_operations()]


def _key_for(path: str, fuzz_tenant: dict, scope: str) -> str:
    return OPERATOR_TOKEN if path.startswith("/v1/tenants") else fuzz_tenant[scope]


@pytest.mark.parametrize("scope,mode,examples", [
    ("admin", GenerationMode.POSITIVE, 25),
    ("admin", GenerationMode.NEGATIVE, 15),
    ("chat", GenerationMode.POSITIVE, 15),
])
def test_operations_conform_to_the_schema(client, fuzz_tenant, scope, mode, examples):
    operations = _operations(client.app)
    assert len(operations) >= 15
    checks = CONFORMANCE_CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])
    # Every example runs (a failure is recorded, not raised: no shrinking, which costs minutes on
    # the chat routes); one report per distinct (operation, status, failed checks).
    failures: dict[tuple, str] = {}
    for operation in operations:
        # a fuzzed PATCH /v1/tenant may leave a first-token SLO no chat can meet: start each operation
        # without one, so that fuzzed chats get as far as an answer
        r = client.patch("/v1/tenant", json={"ttft_slo_s": None}, headers=bearer(fuzz_tenant["admin"]))
        assert r.status_code == 200, r.text

        # the key is a fixed header of the strategy: negative cases then never claim to have left it out
        headers = bearer(_key_for(operation.path, fuzz_tenant, scope))

        @given(case=operation.as_strategy(mode, headers=headers), real_user=st.booleans())
        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case, real_user):
            if real_user and "user_id" in (case.path_parameters or {}):
                case.path_parameters["user_id"] = fuzz_tenant["user_id"]
            response = case.call()
            # 413 refuses invalid data too (a generated string past its maxLength can make the body
            # larger than TAILOR_MAX_BODY_BYTES); schemathesis does not count it among refusals
            refused_as_too_large = mode is GenerationMode.NEGATIVE and response.status_code == 413
            # a valid chat whose first-token deadline (fuzzed: down to 5e-324 s) cannot be met is refused
            # with 503 and Retry-After by design: a documented answer, not a server error
            missed_deadline = (response.status_code == 503 and "retry-after" in response.headers
                               and "deadline" in str(response.json().get("detail")))
            try:
                case.validate_response(response, checks=CONFORMANCE_CHECKS if refused_as_too_large
                                       else [c for c in checks if c is not not_a_server_error] if missed_deadline
                                       else checks, headers=headers)
            except FailureGroup as group:
                titles = tuple(sorted({f.title for f in group.exceptions}))
                failures.setdefault((operation.label, response.status_code, titles),
                                    f"{case.method} {case.formatted_path} -> {response.status_code}: {'; '.join(titles)}"
                                    f"\n{str(group)[:1500]}")

        try:
            fuzz()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE  # nothing to get wrong in an operation without inputs
    assert not failures, f"{len(failures)} distinct failures:\n" + "\n".join(failures[k].split("\n")[0] for k in sorted(failures)) \
        + "\n\n" + "\n\n".join(failures.values())


# --- values strict JSON cannot carry, in every field ---------------------------------------------------

# Raw JSON values that Python's json module parses (to nan, inf, a str with a lone surrogate) but
# that strict JSON / UTF-8 cannot carry back; the last two are raw bytes inside a JSON string: a
# surrogate encoded as UTF-8 bytes (json.loads lets it through as a lone surrogate) and a latin-1
# byte (the body is then not UTF-8 at all, so naming the body is right too).
HOSTILE_TOKENS = {
    "NaN": b"NaN",
    "Infinity": b"Infinity",
    "-Infinity": b"-Infinity",
    "1e400": b"1e400",
    "-1e400": b"-1e400",
    "lone-high-surrogate": b'"\\ud800"',
    "lone-low-surrogate-in-text": b'"a\\udfffb"',
    "surrogate-as-utf8-bytes": b'"\xed\xa0\x80"',
    "latin-1-byte": b'"caf\xe9"',
}
BODY_LEVEL_TOKENS = {"latin-1-byte", "surrogate-as-utf8-bytes"}  # may name ["body"] instead of the field
NON_UTF8_BODIES = {
    "ff-fe": b"\xff\xfe",
    "latin-1-in-a-string": b'{"message": "caf\xe9", "external_id": "caf\xe9", "scope": "chat"}',
}
PLACEHOLDER = "@@hostile@@"

# A valid body for every operation that takes JSON; every leaf of it (and every top-level property
# of the operation's schema) gets each hostile value in turn. {user_id} is the fuzz tenant's user.
VALID_BODIES = {
    ("POST", "/v1/tenants"): {"name": "hostile-tenant", "system_prompt": "Be brief.", "fair_share_weight": 1.0,
                              "ttft_slo_s": 30.0},
    ("PATCH", "/v1/tenants/{tenant_id}"): {"fair_share_weight": 1.0, "ttft_slo_s": 30.0},
    ("PATCH", "/v1/tenant"): {"system_prompt": "Be brief.", "ttft_slo_s": 30.0},
    ("POST", "/v1/api-keys"): {"scope": "chat"},
    ("POST", "/v1/users"): {"external_id": "hostile-user"},
    ("PUT", "/v1/users/{user_id}/adapter"): {"adapter_id": None},
    ("POST", "/v1/users/{user_id}/chat"): {"message": "hi", "stream": False, "max_tokens": 2, "temperature": 0.5,
                                          "top_p": 1.0, "seed": 1, "ttft_slo_s": 30.0},
    ("POST", "/v1/chat/completions"): {
        "model": "base",
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "stream": False, "max_tokens": 2, "max_completion_tokens": 2, "temperature": 0.5, "top_p": 1.0,
        "seed": 1, "stop": ["\n\n"], "n": 1, "user": "someone",
    },
    ("POST", "/v1/users/{user_id}/examples"): {"messages": [{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "hello"}]},
    ("POST", "/v1/users/{user_id}/messages/{message_id}/feedback"): {"rating": -1, "correction": "better"},
    ("POST", "/v1/users/{user_id}/adapter-trainings"): {"rank": 4, "target_modules": ["q_proj"], "epochs": 1,
                                                        "learning_rate": 0.001, "start_from": "fresh"},
}


def json_body_operations(openapi: dict) -> dict[tuple[str, str], dict]:
    """``(METHOD, path) -> the JSON schema of its body`` for every operation that takes JSON."""
    found = {}
    for path, methods in openapi["paths"].items():
        for method, operation in methods.items():
            content = (operation.get("requestBody") or {}).get("content", {})
            if "application/json" in content:
                found[(method.upper(), path)] = _resolve(openapi, content["application/json"]["schema"])
    return found


def _resolve(openapi: dict, schema: dict) -> dict:
    while "$ref" in schema:
        node = openapi
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def declared(openapi: dict, schema: dict, path: tuple) -> bool:
    """Whether every step of ``path`` is a property (or array item) that ``schema`` declares."""
    if not path:
        return True
    options = [_resolve(openapi, schema)]
    for option in list(options):
        options += [_resolve(openapi, s) for key in ("anyOf", "oneOf", "allOf") for s in option.get(key, [])]
    step = path[0]
    for option in options:
        if isinstance(step, str) and step in option.get("properties", {}):
            if declared(openapi, option["properties"][step], path[1:]):
                return True
        if isinstance(step, int) and "items" in option:
            if declared(openapi, option["items"], path[1:]):
                return True
    return False


def leaf_paths(value, prefix: tuple = ()) -> Iterator[tuple]:
    """The paths (keys and list indexes) of every scalar in a JSON value."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaf_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from leaf_paths(item, (*prefix, index))
    else:
        yield prefix


def hostile_body(body: dict, path: tuple, token: bytes) -> bytes:
    """``body`` as JSON text with the value at ``path`` replaced by the raw ``token``."""
    body = json.loads(json.dumps(body))
    node = body
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = PLACEHOLDER
    text = json.dumps(body, ensure_ascii=True)
    assert text.count(json.dumps(PLACEHOLDER)) == 1
    return text.encode("ascii").replace(json.dumps(PLACEHOLDER).encode("ascii"), token)


def _send(client, method: str, path: str, raw: bytes, fuzz_tenant: dict):
    headers = {**bearer(_key_for(path, fuzz_tenant, "admin")), "Content-Type": "application/json"}
    path = path.replace("{user_id}", fuzz_tenant["user_id"]).replace("{tenant_id}", fuzz_tenant["tenant_id"])
    return client.request(method, path, content=raw, headers=headers)


def names(loc: tuple, path: tuple) -> bool:
    """Whether a pydantic ``loc`` points at ``path`` (or inside it): ``path`` in order, allowing the
    union tags pydantic inserts (``("body", "stop", "list[str]", 0)`` names ``("body", "stop", 0)``)."""
    if not path:
        return True
    if not loc or loc[0] != path[0]:
        return False
    rest = iter(loc[1:])
    return all(any(part == step for part in rest) for step in path[1:])


def assert_422_naming(response, path: tuple, sent: bytes, or_body: bool = False) -> None:
    """422, a JSON body, and a problem in ``detail`` whose ``loc`` names ``path`` (or, with
    ``or_body``, the body as a whole)."""
    assert response.status_code == 422, f"sent {sent!r}: {response.status_code} {response.text[:500]}"
    assert response.headers["content-type"].startswith("application/json"), response.headers
    detail = response.json()["detail"]
    locs = [tuple(p["loc"]) for p in detail if isinstance(p, dict) and "loc" in p]
    assert any(names(loc, path) or (or_body and names_the_body(loc)) for loc in locs), \
        f"sent {sent!r}: no problem located at {list(path)}: {detail}"


def names_the_body(loc: tuple) -> bool:
    """``["body"]`` or ``["body", <offset>]``: the body as a whole, not one of its fields."""
    return loc[:1] == ("body",) and (len(loc) == 1 or (len(loc) == 2 and isinstance(loc[1], int)))


def test_valid_bodies_cover_every_json_operation(client):
    operations = json_body_operations(client.get("/openapi.json").json())
    assert set(VALID_BODIES) == set(operations), "add a valid body for every JSON operation to VALID_BODIES"


def _field_cases() -> list:
    cases = []
    for (method, path), body in VALID_BODIES.items():
        for field in leaf_paths(body):
            for name in HOSTILE_TOKENS:
                cases.append(pytest.param(method, path, field, name, id=f"{method} {path} {'.'.join(map(str, field))} {name}"))
    return cases


@pytest.mark.parametrize("method,path,field,token", _field_cases())
def test_hostile_value_in_every_field(client, fuzz_tenant, method, path, field, token):
    raw = hostile_body(VALID_BODIES[(method, path)], field, HOSTILE_TOKENS[token])
    response = _send(client, method, path, raw, fuzz_tenant)
    assert_422_naming(response, ("body", *field), raw, or_body=token in BODY_LEVEL_TOKENS)


def test_hostile_value_in_every_schema_property(client, fuzz_tenant):
    """Top-level properties of each body schema that VALID_BODIES leaves out get the same treatment."""
    operations = json_body_operations(client.get("/openapi.json").json())
    failures = []
    for (method, path), schema in operations.items():
        body = VALID_BODIES[(method, path)]
        for field in sorted(set(schema.get("properties", {})) - set(body)):
            for name, token in HOSTILE_TOKENS.items():
                raw = hostile_body({**body, field: None}, (field,), token)
                try:
                    assert_422_naming(_send(client, method, path, raw, fuzz_tenant), ("body", field), raw,
                                      or_body=name in BODY_LEVEL_TOKENS)
                except AssertionError as exc:
                    failures.append(f"{method} {path}: {exc}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("method,path", sorted(VALID_BODIES), ids=lambda value: str(value))
@pytest.mark.parametrize("body", sorted(NON_UTF8_BODIES))
def test_non_utf8_body(client, fuzz_tenant, method, path, body):
    """422 naming the body itself (``loc`` ``["body"]``, or ``["body", <offset>]``), not a field."""
    raw = NON_UTF8_BODIES[body]
    response = _send(client, method, path, raw, fuzz_tenant)
    assert_422_naming(response, ("body",), raw)
    locs = [tuple(p["loc"]) for p in response.json()["detail"]]
    assert any(names_the_body(loc) for loc in locs), locs


def test_fuzzed_bodies_with_a_hostile_value(client, fuzz_tenant):
    """Schemathesis makes valid bodies; one random declared field (nested ones included) gets a
    hostile value. (Unknown properties that an operation ignores are left alone.)"""
    openapi = client.get("/openapi.json").json()
    schemas = json_body_operations(openapi)
    failures: list[str] = []
    for operation in _operations(client.app):
        schema = schemas.get((operation.method.upper(), operation.path))
        if schema is None:
            continue

        @given(case=operation.as_strategy(GenerationMode.POSITIVE), data=st.data())
        @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case, data):
            if not isinstance(case.body, dict):
                return
            fields = sorted((p for p in leaf_paths(case.body) if p and declared(openapi, schema, p)), key=repr)
            if not fields:
                return
            field = data.draw(st.sampled_from(fields), label="field")
            token = data.draw(st.sampled_from(sorted(HOSTILE_TOKENS)), label="token")
            raw = hostile_body(case.body, field, HOSTILE_TOKENS[token])
            try:
                assert_422_naming(_send(client, case.method, operation.path, raw, fuzz_tenant), ("body", *field), raw,
                                  or_body=token in BODY_LEVEL_TOKENS)
            except AssertionError as exc:
                failures.append(f"{case.method} {operation.path}: {exc}")
                raise

        try:
            fuzz()
        except AssertionError:
            pass  # recorded; go on with the other operations
    assert not failures, "\n".join(failures[-20:])
