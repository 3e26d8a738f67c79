"""``/v1/chat/completions`` and ``/v1/models`` through the official ``openai`` client against the
embedded default served by uvicorn: every field the client can send is honoured or refused with a
422 naming it (all of them in one answer); each honoured field is shown to work, streamed and not.
Completions are a few tokens of the tiny random model, greedy unless the test samples."""

from __future__ import annotations

import json
import logging
from datetime import datetime

import httpx
import openai
import pytest
from openai import OpenAI
from openai.types.chat import completion_create_params

from api.app import create_app
from api.openai_schemas import HONOURED, REFUSED, ChatCompletionRequest
from inference.tokenizer import Tokenizer
from support.live_server import serve_app
from support.platform_flows import (
    OPERATOR_TOKEN,
    adapter_files,
    bearer,
    create_key,
    create_tenant,
    upload_adapter,
    wait_for_status,
    write_adapter,
)

PROMPT = [{"role": "user", "content": "Write a list of fruits"}]


@pytest.fixture(scope="module")
def server(api_settings):
    with serve_app(create_app(api_settings)) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def tenant(server):
    with httpx.Client(base_url=server, timeout=60) as http:
        _tenant, admin = create_tenant(http, OPERATOR_TOKEN, "openai-compat")
        return admin, create_key(http, admin, "chat")


@pytest.fixture(scope="module")
def oai(server, tenant) -> OpenAI:
    return OpenAI(base_url=f"{server}/v1", api_key=tenant[1], max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint) -> Tokenizer:
    return Tokenizer(tiny_checkpoint)


def _create(oai: OpenAI, **options):
    options.setdefault("model", "base")
    options.setdefault("messages", PROMPT)
    options.setdefault("max_tokens", 6)
    options.setdefault("temperature", 0)
    return oai.chat.completions.create(**options)


def _streamed(oai: OpenAI, **options) -> tuple[str, list]:
    """The streamed text and all chunks."""
    chunks = list(_create(oai, stream=True, **options))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def _refusal(oai: OpenAI, **options) -> dict[str, str]:
    """The 422's problems as ``{"field.path": message}`` (``body`` dropped from each ``loc``)."""
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        _create(oai, **options)
    detail = refused.value.body["detail"] if "detail" in refused.value.body else refused.value.body
    out = {}
    for problem in detail:
        assert isinstance(problem, dict), detail
        out[".".join(str(p) for p in problem["loc"][1:])] = problem["msg"]
    return out


# --- the policy covers the whole request ------------------------------------------------------------
def test_every_field_of_the_openai_request_is_classified():
    sent_by_client = set(completion_create_params.CompletionCreateParamsBase.__annotations__) | {"stream"}
    declared = set(ChatCompletionRequest.model_fields)
    assert sent_by_client <= declared, f"fields the openai client can send that the api does not know: {sent_by_client - declared}"
    assert set(HONOURED) | set(REFUSED) == declared and not set(HONOURED) & set(REFUSED)
    assert {"functions", "function_call"} <= set(REFUSED)
    assert {"n", "response_format", "tools", "tool_choice", "parallel_tool_calls"} <= set(HONOURED)


def test_refused_fields_are_all_named_in_one_422(oai):
    problems = _refusal(
        oai, n=9, response_format={"type": "json_schema", "json_schema": {"schema": {}}},
        tools=[{"type": "function", "function": {"name": "f g"}}], metadata={"k": "v"}, store=True, service_tier="flex",
        modalities=["text", "audio"], reasoning_effort="low", prompt_cache_key="k", verbosity="low",
        web_search_options={}, prediction={"type": "content", "content": "x"}, audio={"voice": "alloy", "format": "wav"},
        functions=[{"name": "f"}], function_call="auto", top_logprobs=2, max_completion_tokens=5,
        extra_body={"surprise": 1, "guided_json": {}},
    )
    expected = {"n", "response_format.json_schema.json_schema.name", "tools.0.function.name", "metadata", "store",
                "service_tier", "modalities", "reasoning_effort", "prompt_cache_key", "verbosity", "web_search_options",
                "prediction", "audio", "functions", "function_call", "top_logprobs", "max_completion_tokens",
                "surprise", "guided_json"}
    assert set(problems) == expected, problems
    assert "use tools" in problems["functions"] and "use tool_choice" in problems["function_call"]
    assert "less than or equal to 8" in problems["n"], problems["n"]
    assert problems["response_format.json_schema.json_schema.name"] == "Field required"
    assert "logprobs" in problems["top_logprobs"] and "differ" in problems["max_completion_tokens"]


def test_refused_message_features_are_named(oai):
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]},
                {"role": "assistant", "content": "ok", "name": "bot", "tool_calls": [
                    {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "content": "42", "tool_call_id": "1"},
                {"role": "function", "content": "42", "name": "f"}]
    problems = _refusal(oai, messages=messages)
    assert set(problems) == {"messages.1.content.parts.0.type", "messages.1.content.parts.0.image_url",
                             "messages.2.name", "messages.4.role", "messages.4.name"}, problems
    assert "only text" in problems["messages.1.content.parts.0.type"]
    assert "deprecated" in problems["messages.4.role"]


def test_neutral_values_of_refused_fields_are_accepted(oai):
    plain = _create(oai)
    same = _create(oai, n=1, response_format={"type": "text"}, tools=[], tool_choice="none", store=False,
                   service_tier="auto", modalities=["text"], metadata={})
    assert same.choices[0].message.content == plain.choices[0].message.content
    assert len(same.choices) == 1 and same.service_tier == "default"


def test_stream_options_need_stream_and_obfuscation_is_refused(oai):
    assert set(_refusal(oai, stream_options={"include_usage": True})) == {"stream_options"}
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        list(_create(oai, stream=True, stream_options={"include_obfuscation": True}))
    assert refused.value.body["detail"][0]["loc"] == ["body", "stream_options", "include_obfuscation"]


def test_text_parts_and_the_developer_role_are_honoured(oai):
    as_string = _create(oai, messages=[{"role": "system", "content": "Be brief."}, *PROMPT])
    as_parts = _create(oai, messages=[{"role": "developer", "content": [{"type": "text", "text": "Be "},
                                                                       {"type": "text", "text": "brief."}]},
                                      {"role": "user", "content": [{"type": "text", "text": PROMPT[0]["content"]}]}])
    assert as_parts.choices[0].message.content == as_string.choices[0].message.content
    assert as_parts.usage.prompt_tokens == as_string.usage.prompt_tokens


# --- honoured fields, streamed and not --------------------------------------------------------------
def test_logprobs_and_top_logprobs(oai):
    reply = _create(oai, logprobs=True, top_logprobs=3)
    choice = reply.choices[0]
    entries = choice.logprobs.content
    assert len(entries) == reply.usage.completion_tokens
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the most likely
        assert [a.logprob for a in entry.top_logprobs] == sorted((a.logprob for a in entry.top_logprobs), reverse=True)
    text_entries = entries[:-1] if choice.finish_reason == "stop" else entries  # the end-of-turn token has no text
    assert bytes(b for e in text_entries for b in e.bytes).decode("utf-8", "replace") == choice.message.content
    assert _create(oai, logprobs=True).choices[0].logprobs.content[0].top_logprobs == []
    assert _create(oai).choices[0].logprobs is None

    text, chunks = _streamed(oai, logprobs=True, top_logprobs=3)
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert text == choice.message.content
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in entries]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in entries], abs=1e-4)


def test_include_usage_sends_a_last_chunk_with_the_usage(oai):
    reply = _create(oai)
    _text, chunks = _streamed(oai, stream_options={"include_usage": True})
    assert chunks[-1].choices == [] and chunks[-1].usage == reply.usage
    assert all(c.usage is None for c in chunks[:-1]) and all(c.choices for c in chunks[:-1])
    _text, plain = _streamed(oai)
    assert all(c.choices for c in plain) and all(c.usage is None for c in plain)


@pytest.mark.parametrize("penalty", [dict(presence_penalty=2.0), dict(frequency_penalty=2.0),
                                     dict(extra_body={"repetition_penalty": 10.0})])
def test_penalties_change_the_greedy_answer_the_same_way_streamed(oai, penalty):
    long = dict(max_tokens=16)
    plain = _create(oai, **long).choices[0].message.content
    penalised = _create(oai, **long, **penalty).choices[0].message.content
    assert penalised != plain, "a penalty that changes nothing is not shown to work"
    assert _streamed(oai, **long, **penalty)[0] == penalised
    neutral = {k: (1.0 if "repetition" in str(v) else 0.0) for k, v in penalty.items() if k != "extra_body"}
    assert _create(oai, **long, **(neutral or {"extra_body": {"repetition_penalty": 1.0}})).choices[0].message.content == plain


def test_stop_as_string_and_list(oai):
    full = _create(oai, max_tokens=12).choices[0].message.content
    assert len(full) >= 4, full
    cut = full[2:4]
    expected = full[: full.index(cut)]
    for stop in (cut, ["\u2603never", cut]):
        reply = _create(oai, max_tokens=12, stop=stop)
        assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "stop"
        assert _streamed(oai, max_tokens=12, stop=stop)[0] == expected
    assert all(field.startswith("stop") for field in _refusal(oai, stop=[""]))
    assert all(field.startswith("stop") for field in _refusal(oai, stop=["x"] * 17))


def test_seed_makes_sampling_reproducible(oai):
    sampled = dict(temperature=1.0, max_tokens=8)
    first = _create(oai, seed=1234, **sampled).choices[0].message.content
    assert _create(oai, seed=1234, **sampled).choices[0].message.content == first
    assert _streamed(oai, seed=1234, **sampled)[0] == first
    others = {_create(oai, seed=s, **sampled).choices[0].message.content for s in (1, 2, 3)}
    assert others - {first}, "different seeds should draw different texts"


def test_top_k_one_is_greedy(oai):
    greedy = _create(oai, max_tokens=8).choices[0].message.content
    assert _create(oai, max_tokens=8, temperature=1.0, extra_body={"top_k": 1}).choices[0].message.content == greedy


def test_logit_bias_forces_a_token(oai, tokenizer):
    token_id = tokenizer.encode(" banana")[-1]
    piece = tokenizer.token_pieces([token_id])[0][0]
    reply = _create(oai, max_tokens=3, logit_bias={str(token_id): 100})
    assert reply.choices[0].message.content == piece * 3
    assert _streamed(oai, max_tokens=3, logit_bias={str(token_id): 100})[0] == piece * 3
    assert set(_refusal(oai, logit_bias={"banana": 1})) == {"logit_bias"}
    assert set(_refusal(oai, logit_bias={"1": 101})) == {"logit_bias.1"}
    with pytest.raises(openai.UnprocessableEntityError) as refused:  # the engine knows the vocabulary
        _create(oai, logit_bias={"999999999": 1})
    assert "logit_bias token ids must be below the vocabulary size" in str(refused.value.body["detail"])


def test_max_completion_tokens_and_its_alias(oai, api_settings):
    for options in (dict(max_completion_tokens=2, max_tokens=openai.NOT_GIVEN), dict(max_tokens=2),
                    dict(max_tokens=2, max_completion_tokens=2)):
        reply = _create(oai, **options)
        assert reply.usage.completion_tokens <= 2
        assert reply.choices[0].finish_reason == "length" or reply.usage.completion_tokens < 2
        assert _streamed(oai, stream_options={"include_usage": True}, **options)[1][-1].usage.completion_tokens <= 2
    too_many = api_settings.max_tokens_limit + 1
    assert set(_refusal(oai, max_tokens=openai.NOT_GIVEN, max_completion_tokens=too_many)) == {"max_completion_tokens"}
    assert set(_refusal(oai, max_tokens=too_many)) == {"max_tokens"}
    assert set(_refusal(oai, max_tokens=3, max_completion_tokens=2)) == {"max_completion_tokens"}


def test_user_is_logged_with_the_completion_id(oai, caplog):
    caplog.set_level(logging.INFO, logger="api.routers.openai_compat")
    reply = _create(oai, user="end-user-7")
    streamed = _streamed(oai, safety_identifier="end-user-8")[1]
    lines = [r.getMessage() for r in caplog.records if r.name == "api.routers.openai_compat"]
    assert any(reply.id in line and "end-user-7" in line for line in lines), lines
    assert any(streamed[0].id in line and "end-user-8" in line for line in lines), lines


# --- /v1/models ----------------------------------------------------------------------------------------
def test_models_list_the_tenants_ready_adapters_only(server, tenant, tmp_path, tiny_model_config):
    """Two tenants, both with an adapter named ``style`` (tenant A's in two versions), A with one
    more: each sees ``base`` and its own newest ready versions with their creation times."""
    with httpx.Client(base_url=server, timeout=60) as http:
        _b, admin_b = create_tenant(http, OPERATOR_TOKEN, "openai-compat-models-b")
        admin_a = tenant[0]
        made: dict[tuple[str, str], dict] = {}
        for admin, name, seed in ((admin_b, "style", 1), (admin_a, "style", 2), (admin_a, "style", 3),
                                  (admin_a, "a-only", 4)):
            r = upload_adapter(http, admin, name, adapter_files(write_adapter(tmp_path / f"{name}{seed}",
                                                                              tiny_model_config, seed=seed)))
            assert r.status_code == 202, r.text
            adapter = wait_for_status(http, admin, r.json()["id"])
            assert adapter["status"] == "ready", adapter
            made[(admin, name)] = adapter  # the newest version per tenant and name
        chat_b = create_key(http, admin_b, "chat")
        listings = {}
        for admin, key in ((admin_a, tenant[1]), (admin_b, chat_b)):
            models = OpenAI(base_url=f"{server}/v1", api_key=key, max_retries=0).models.list().data
            listings[admin] = {m.id: m for m in models}
        assert set(listings[admin_a]) == {"base", "style", "a-only"} and set(listings[admin_b]) == {"base", "style"}
        assert len(OpenAI(base_url=f"{server}/v1", api_key=chat_b, max_retries=0).models.list().data) == 2
        for (admin, name), adapter in made.items():
            model = listings[admin][name]
            created = http.get(f"/v1/adapters/{adapter['id']}", headers=bearer(admin)).json()["created_at"]
            assert model.created == int(datetime.fromisoformat(created).timestamp())
            assert model.model_extra["parent"] == "base" and model.model_extra["version"] == adapter["version"]
        assert listings[admin_a]["style"].model_extra["version"] == 2
        assert listings[admin_b]["style"].model_extra["version"] == 1
        assert listings[admin_a]["base"].owned_by == "tailor"
        # the adapter answers through its name; another tenant's name is unknown
        OpenAI(base_url=f"{server}/v1", api_key=tenant[1], max_retries=0).chat.completions.create(
            model="a-only", messages=PROMPT, max_tokens=2)
        with pytest.raises(openai.NotFoundError):
            OpenAI(base_url=f"{server}/v1", api_key=chat_b, max_retries=0).chat.completions.create(
                model="a-only", messages=PROMPT, max_tokens=2)


# --- structured outputs -----------------------------------------------------------------------------
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "kind": {"enum": ["cat", "dog"]}},
          "required": ["name", "age", "kind"], "additionalProperties": False}


def _json_format(schema: dict, strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": strict}}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_validates_streamed_and_not(oai, temperature):
    """The tiny random model writes JSON of the schema, greedy and sampled, streamed and not."""
    import jsonschema

    options = dict(response_format=_json_format(PERSON), max_tokens=60, temperature=temperature, seed=3)
    reply = _create(oai, **options)
    assert reply.choices[0].finish_reason == "stop", reply
    jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)
    text, chunks = _streamed(oai, **options)
    assert text == reply.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_json_object_gives_a_json_object(oai):
    reply = _create(oai, response_format={"type": "json_object"}, max_tokens=64)
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    else:  # cut by max_tokens: visible as "length", and still the start of an object
        assert reply.choices[0].finish_reason == "length" and reply.choices[0].message.content.startswith("{")


def test_a_schema_the_grammar_engine_cannot_compile_is_a_422_with_the_reason(oai):
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        _create(oai, response_format=_json_format({"type": "integer", "minimum": 10, "maximum": 5}))
    assert "response_format" in str(refused.value.body) and "minimum" in str(refused.value.body)
    with pytest.raises(openai.UnprocessableEntityError) as refused:  # strict: an unenforceable keyword is refused
        _create(oai, response_format=_json_format({"type": "object", "dependentSchemas": {"a": {}}}))
    assert "response_format" in str(refused.value.body)
    big = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 100} for i in range(700)}}
    assert "response_format.json_schema.json_schema.schema" in _refusal(oai, response_format=_json_format(big))


def test_the_per_user_chat_endpoint_takes_response_format(server, tenant):
    import jsonschema

    admin, chat_key = tenant
    with httpx.Client(base_url=server, timeout=60) as http:
        created = http.post("/v1/users", headers=bearer(admin), json={"external_id": "json-user"})
        assert created.status_code in (200, 201), created.text
        user_id = created.json()["id"]
        answer = http.post(f"/v1/users/{user_id}/chat", headers=bearer(chat_key),
                           json={"message": "Who are you?", "max_tokens": 60, "temperature": 0,
                                 "response_format": _json_format(PERSON)})
        assert answer.status_code == 200, answer.text
        jsonschema.validate(json.loads(answer.json()["message"]["content"]), PERSON)
        bad = http.post(f"/v1/users/{user_id}/chat", headers=bearer(chat_key),
                        json={"message": "x", "response_format": {"type": "yaml"}})
        assert bad.status_code == 422 and "response_format" in bad.text
