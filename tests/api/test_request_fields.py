"""Every honoured field of both chat routes reaches the engine request as sent (a recording
backend over the real core): each field set to a value other than its default, and compared with
the ``GenerateRequest`` the route made. A field added to a route without being mapped fails here."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.openai_schemas import HONOURED
from api.schemas import ChatRequest
from inference import LLM
from inference.service.core import InferenceCore
from support.platform_flows import OPERATOR_TOKEN, bearer, create_key, create_tenant, create_user
from support.recording_inference import RecordingInference
from tenants import migrate
from tenants.platform import Platform

from .conftest import embedded_settings


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, tiny_checkpoint):
    settings = embedded_settings(tmp_path_factory.mktemp("fields"), tiny_checkpoint)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate.upgrade(settings.resolved_database_url)
    platform = Platform.from_settings(settings)
    core = InferenceCore(LLM(settings.model, adapter_store=platform.store, **settings.engine_options()))
    recorder = RecordingInference(core)
    try:
        with TestClient(create_app(settings, inference=recorder, platform=platform)) as client:
            _tenant, admin = create_tenant(client, OPERATOR_TOKEN, "fields")
            yield client, recorder, create_key(client, admin, "chat"), create_user(client, admin, "u")["id"]
    finally:
        core.close()
        platform.close()


def test_every_per_user_chat_field_reaches_the_engine(recorded):
    client, recorder, key, user = recorded
    body = {"message": "hi", "stream": True, "max_tokens": 3, "temperature": 0.25, "top_p": 0.5, "seed": 77,
            "ttft_slo_s": 120.0, "response_format": {"type": "json_object"}}
    assert set(body) == set(ChatRequest.model_fields), "a new chat field must be mapped and listed here"
    r = client.post(f"/v1/users/{user}/chat", headers=bearer(key), json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    sent = recorder.requests[-1]
    assert sent.messages[-1].content == "hi"
    assert (sent.max_tokens, sent.temperature, sent.top_p, sent.seed, sent.ttft_slo_s) == (3, 0.25, 0.5, 77, 120.0)
    assert sent.response_format.type == "json_object"


def test_every_honoured_openai_field_reaches_the_engine(recorded):
    client, recorder, key, _user = recorded
    body = {"model": "base", "messages": [{"role": "developer", "content": "sys"}, {"role": "user", "content": "hi"}],
            "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 4, "max_completion_tokens": 4,
            "temperature": 0.5, "top_p": 0.75, "top_k": 9, "seed": 11, "stop": ["zz", "yy"], "presence_penalty": 0.5,
            "frequency_penalty": -0.25, "repetition_penalty": 1.5, "logit_bias": {"17": -3.0, "4": 2}, "logprobs": True,
            "top_logprobs": 2, "n": 1, "user": "someone", "safety_identifier": "someone-else", "service_tier": "auto",
            "modalities": ["text"], "store": False,
            "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer"},
                                                                       "strict": True}},
            "tools": [{"type": "function", "function": {"name": "f", "description": "d", "strict": True,
                                                        "parameters": {"type": "object", "properties": {}}}}],
            "tool_choice": "none", "parallel_tool_calls": False}
    assert set(body) == set(HONOURED), "a new honoured field must be mapped and listed here"
    r = client.post("/v1/chat/completions", headers=bearer(key), json=body)
    assert r.status_code == 200, r.text
    sent = recorder.requests[-1]
    assert [(m.role, m.content) for m in sent.messages] == [("system", "sys"), ("user", "hi")]
    assert (sent.max_tokens, sent.temperature, sent.top_p, sent.top_k, sent.seed) == (4, 0.5, 0.75, 9, 11)
    assert (sent.response_format.type, sent.response_format.json_schema, sent.response_format.strict) == \
        ("json_schema", {"type": "integer"}, True)
    assert sent.stop == ["zz", "yy"] and sent.logprobs == 2 and sent.logit_bias == {17: -3.0, 4: 2.0}
    assert [(t.name, t.description, t.parameters, t.strict) for t in sent.tools] == \
        [("f", "d", {"type": "object", "properties": {}}, True)]
    assert (sent.tool_choice, sent.parallel_tool_calls) == ("none", False)
    assert (sent.presence_penalty, sent.frequency_penalty, sent.repetition_penalty) == (0.5, -0.25, 1.5)
    assert sent.request_id.startswith("chatcmpl-") and sent.request_id in r.text
    assert r.text.rstrip().endswith("data: [DONE]") and '"choices": [], "usage": {' in r.text


def test_openai_defaults_are_neutral(recorded):
    client, recorder, key, _user = recorded
    r = client.post("/v1/chat/completions", headers=bearer(key),
                    json={"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200, r.text
    sent = recorder.requests[-1]
    assert (sent.temperature, sent.top_p, sent.top_k, sent.seed, sent.stop, sent.logprobs) == (1.0, 1.0, 0, None, [], None)
    assert (sent.presence_penalty, sent.frequency_penalty, sent.repetition_penalty, sent.logit_bias) == (0, 0, 1, {})
    assert sent.response_format is None
    assert (sent.tools, sent.tool_choice, sent.parallel_tool_calls) == (None, "auto", True)
    assert r.json()["choices"][0]["logprobs"] is None
