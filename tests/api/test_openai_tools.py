"""``tools`` and ``tool_choice`` on ``/v1/chat/completions`` through the official ``openai`` client.

The model is the tiny random Llama with a tool-calling tokenizer as Qwen2.5 has it (``<tool_call>``
and ``</tool_call>`` as added tokens, a Hermes-format chat template: ``tools_checkpoint``). Its
weights are random, so what it says means nothing; what is checked is what the grammar and the
parser guarantee: every call names one of the tools and its arguments validate against that
function's schema; ``required`` and a named function always call, ``none`` never does, ``auto``
does either; streamed calls equal the unstreamed ones; an earlier turn's calls and the tools'
results render as the template renders them (checked against transformers); and a model whose
template has no tools answers 422 saying so.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from openai import OpenAI
from transformers import AutoTokenizer

from api.app import create_app
from support.live_server import serve_app
from support.platform_flows import OPERATOR_TOKEN, create_key, create_tenant
from tenants import migrate

from .conftest import embedded_settings

LLAMA3_TEMPLATE = Path(__file__).parents[1] / "support" / "chat_templates" / "llama3_json_tools.jinja"

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 12},
                          "unit": {"enum": ["celsius", "fahrenheit"]}}}
BOOKING = {"type": "object", "additionalProperties": False, "required": ["guests", "nights"],
           "properties": {"guests": {"type": "integer", "minimum": 1, "maximum": 8},
                          "nights": {"type": "number", "exclusiveMinimum": 0, "maximum": 30},
                          "breakfast": {"type": "boolean"}}}
TAGS = {"type": "object", "additionalProperties": False, "required": ["tags"],
        "properties": {"tags": {"type": "array", "minItems": 1, "maxItems": 3,
                                "items": {"type": "string", "maxLength": 6}}}}
NESTED = {"type": "object", "additionalProperties": False, "required": ["who"],
          "properties": {"who": {"type": "object", "additionalProperties": False, "required": ["age"],
                                 "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 130}}}}}
SCHEMAS = {"get_weather": WEATHER, "book_room": BOOKING, "tag_note": TAGS, "register": NESTED}
TOOLS = [{"type": "function", "function": {"name": name, "description": f"{name} for tests", "parameters": schema}}
         for name, schema in SCHEMAS.items()]
ASK = [{"role": "user", "content": "What is the weather in Paris, and book me a room?"}]


@pytest.fixture(scope="module")
def tools_server(tmp_path_factory, tools_checkpoint):
    settings = embedded_settings(tmp_path_factory.mktemp("tools-api"), tools_checkpoint, max_tokens_limit=96)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate.upgrade(settings.resolved_database_url)
    with serve_app(create_app(settings)) as base_url:
        yield base_url


def _client(server: str, name: str) -> OpenAI:
    with httpx.Client(base_url=server, timeout=60) as http:
        _tenant, admin = create_tenant(http, OPERATOR_TOKEN, name)
        key = create_key(http, admin, "chat")
    return OpenAI(base_url=f"{server}/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def oai(tools_server) -> OpenAI:
    return _client(tools_server, "tools")


@pytest.fixture(scope="module")
def hf_tokenizer(tools_checkpoint):
    return AutoTokenizer.from_pretrained(str(tools_checkpoint))


def _call(oai: OpenAI, **options):
    options = {"model": "base", "messages": ASK, "tools": TOOLS, "max_tokens": 96, "temperature": 1.0, **options}
    return oai.chat.completions.create(**options)


def _check_calls(calls) -> None:
    """Every call names a tool, has an id, and its arguments validate against that tool's schema."""
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in SCHEMAS, call.function.name
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert len({c.id for c in calls}) == len(calls)


def test_required_calls_validate_against_their_schemas(oai):
    finishes = []
    for seed in range(8):
        choice = _call(oai, tool_choice="required", seed=seed).choices[0]
        finishes.append(choice.finish_reason)
        if choice.finish_reason == "length":
            continue  # cut inside a call: nothing to validate
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        _check_calls(choice.message.tool_calls)
    assert finishes.count("tool_calls") >= 6, finishes


def test_a_named_function_is_called_exactly_once(oai):
    for name in SCHEMAS:
        for seed in range(2):
            choice = _call(oai, tool_choice={"type": "function", "function": {"name": name}}, seed=seed).choices[0]
            assert choice.finish_reason == "tool_calls", choice
            (call,) = choice.message.tool_calls
            assert call.function.name == name
            _check_calls([call])


def test_parallel_tool_calls_false_allows_one_call(oai, hf_tokenizer):
    close = hf_tokenizer.convert_tokens_to_ids("</tool_call>")
    newline = hf_tokenizer.encode("\n", add_special_tokens=False)[0]
    # pushed towards going on after a call, the model still ends after one
    for seed in range(3):
        choice = _call(oai, tool_choice="required", parallel_tool_calls=False, seed=seed,
                       logit_bias={str(newline): 20, str(close): 20}).choices[0]
        if choice.finish_reason != "length":
            assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1


def test_auto_calls_or_answers_and_none_only_answers(oai, hf_tokenizer):
    trigger = str(hf_tokenizer.convert_tokens_to_ids("<tool_call>"))
    called = _call(oai, tool_choice="auto", seed=3, logit_bias={trigger: 100}).choices[0]
    assert called.finish_reason == "tool_calls" and called.message.content is None
    _check_calls(called.message.tool_calls)
    answered = _call(oai, seed=3, max_tokens=12, logit_bias={trigger: -100}).choices[0]  # auto is the default
    assert answered.message.tool_calls is None and answered.finish_reason in ("stop", "length")
    assert answered.message.content and "<tool_call>" not in answered.message.content
    # with none, the call trigger is not allowed even when the model prefers it above all
    refrained = _call(oai, tool_choice="none", seed=3, max_tokens=12, logit_bias={trigger: 100}).choices[0]
    assert refrained.message.tool_calls is None and "<tool_call>" not in refrained.message.content
    assert refrained.finish_reason in ("stop", "length")


def test_streamed_calls_equal_the_unstreamed_ones(oai):
    """Two choices with logprobs: each choice's streamed content, calls and finish reason equal the
    unstreamed answer's, and every token's logprob arrives although text is held back."""
    for seed, choice in ((11, "required"), (12, {"type": "function", "function": {"name": "tag_note"}})):
        options = dict(tool_choice=choice, seed=seed, n=2, logprobs=True)
        whole = _call(oai, **options)
        chunks = list(_call(oai, stream=True, stream_options={"include_usage": True}, **options))
        calls: dict[int, dict[int, dict]] = {0: {}, 1: {}}
        content, finish, logprobs = {0: "", 1: ""}, {}, {0: 0, 1: 0}
        for chunk in chunks[:-1]:
            (part_choice,) = chunk.choices
            index, delta = part_choice.index, part_choice.delta
            content[index] += delta.content or ""
            logprobs[index] += len(part_choice.logprobs.content or []) if part_choice.logprobs else 0
            for part in delta.tool_calls or ():
                if part.id is not None:  # a call's first delta: id, type and name, no arguments yet
                    assert part.index not in calls[index] and part.type == "function"
                    assert part.function.arguments == ""
                    calls[index][part.index] = {"id": part.id, "name": part.function.name, "arguments": ""}
                else:
                    calls[index][part.index]["arguments"] += part.function.arguments
            if part_choice.finish_reason is not None:
                finish[index] = part_choice.finish_reason
        for answer in whole.choices:
            i = answer.index
            assert finish[i] == answer.finish_reason and (content[i] or None) == answer.message.content
            assert [(c["name"], c["arguments"]) for _n, c in sorted(calls[i].items())] == \
                [(c.function.name, c.function.arguments) for c in answer.message.tool_calls or ()]
            assert logprobs[i] == len(answer.logprobs.content) > 0
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_earlier_calls_and_results_render_as_the_template_renders_them(oai, hf_tokenizer):
    arguments = json.dumps({"city": "Paris", "unit": "celsius"})
    history = [*ASK,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}},
                   {"id": "call_2", "type": "function", "function": {"name": "tag_note", "arguments": '{"tags":["a"]}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"},
               {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "tagged"}]},
               {"role": "user", "content": "Thanks. Anything else?"}]
    usage = _call(oai, messages=history, max_tokens=4).usage
    reference = [dict(m) for m in history]
    reference[1] = {**reference[1], "tool_calls": [
        {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
        for c in history[1]["tool_calls"]]}
    reference[3] = {**reference[3], "content": "tagged"}
    expected = hf_tokenizer.apply_chat_template(reference, tools=TOOLS, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert usage.prompt_tokens == len(expected)
    without_tools = _call(oai, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=1).usage.prompt_tokens
    bare = oai.chat.completions.create(model="base", messages=ASK, max_tokens=1).usage.prompt_tokens
    assert without_tools > bare + 50  # with none, the tools are still shown to the model


def _problems(oai: OpenAI, **options) -> dict[str, str]:
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        _call(oai, **options)
    detail = refused.value.body.get("detail", refused.value.body) if isinstance(refused.value.body, dict) \
        else refused.value.body
    return {".".join(str(p) for p in problem["loc"][1:]): problem["msg"] for problem in detail}


def test_bad_tool_requests_name_every_problem_in_one_422(oai):
    bad_tools = [*TOOLS, {"type": "function", "function": {"name": "get weather!"}},
                 {"type": "function", "function": {"name": "get_weather"}}, {"type": "custom", "custom": {}},
                 {"type": "function", "function": {"name": "s", "parameters": {"type": "string"}}}]
    problems = _problems(oai, tools=bad_tools, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert set(problems) == {"tools.4.function.name", "tools.6.type", "tools.6.custom", "tools.6.function",
                             "tools.7.function.parameters"}
    assert "object" in problems["tools.7.function.parameters"]
    problems = _problems(oai, tools=TOOLS + TOOLS[:1], response_format={"type": "json_object"})
    assert "unique" in problems["tools"] and "get_weather" in problems["tools"]
    problems = _problems(oai, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert "nope" in problems["tool_choice"] and "get_weather" in problems["tool_choice"]
    problems = _problems(oai, tools=None, tool_choice="required")
    assert "needs tools" in problems["tool_choice"]
    problems = _problems(oai, response_format={"type": "json_object"}, stop=["\n"])
    assert "response_format" in problems["tool_choice"] and "stop" in problems["tool_choice"]
    assert _call(oai, tool_choice="none", stop=["\n"], max_tokens=2).choices[0].message.tool_calls is None
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{not json"}}]},
                {"role": "tool", "content": "18"},
                {"role": "user", "content": "hi", "tool_call_id": "c1"},
                {"role": "assistant"}]
    problems = _problems(oai, messages=messages)
    assert set(problems) == {"messages.1.tool_calls.0.function.arguments", "messages.2", "messages.3", "messages.4"}, \
        problems
    assert "JSON text of an object" in problems["messages.1.tool_calls.0.function.arguments"]
    assert "tool_call_id" in problems["messages.2"] and "only a tool message" in problems["messages.3"]
    assert "content is required" in problems["messages.4"]


def test_a_template_without_tools_is_a_422_that_says_so(api_settings):
    """The tiny model's template (SmolLM2's) has no place for tools: a call cannot be asked for,
    and ``none`` answers without them."""
    with serve_app(create_app(api_settings)) as server:
        oai = _client(server, "no-tools")
        for choice in ("auto", "required"):
            with pytest.raises(openai.UnprocessableEntityError) as refused:
                _call(oai, tool_choice=choice, max_tokens=4)
            assert "does not support tools" in json.dumps(refused.value.body)
        answer = _call(oai, tool_choice="none", max_tokens=4).choices[0]
        assert answer.message.tool_calls is None and answer.message.content is not None
        history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
                   {"role": "tool", "tool_call_id": "c1", "content": "18"}]
        with pytest.raises(openai.UnprocessableEntityError) as refused:
            oai.chat.completions.create(model="base", messages=history, max_tokens=2)
        assert "cannot render tool calls or tool results" in json.dumps(refused.value.body)


def test_llama3_json_calls_through_the_api(tmp_path_factory, tiny_checkpoint):
    """A template in Llama 3's JSON format (Meta's instruction sentence): one call per turn, its
    arguments under ``parameters``, parsed into the same ``tool_calls``; auto may also answer."""
    model = tmp_path_factory.mktemp("llama3-tools")
    shutil.copytree(tiny_checkpoint, model, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    tokenizer.chat_template = LLAMA3_TEMPLATE.read_text()
    tokenizer.save_pretrained(model)
    settings = embedded_settings(tmp_path_factory.mktemp("llama3-api"), model, max_tokens_limit=96)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate.upgrade(settings.resolved_database_url)
    with serve_app(create_app(settings)) as server:
        oai = _client(server, "llama3")
        for seed in range(3):
            choice = _call(oai, tool_choice="required", seed=seed).choices[0]
            if choice.finish_reason != "length":
                assert choice.finish_reason == "tool_calls" and choice.message.content is None
                assert len(choice.message.tool_calls) == 1
                _check_calls(choice.message.tool_calls)
        named = _call(oai, tool_choice={"type": "function", "function": {"name": "register"}}, seed=1).choices[0]
        assert named.finish_reason == "tool_calls" and named.message.tool_calls[0].function.name == "register"
        brace = str(tokenizer.encode("{", add_special_tokens=False)[0])
        answered = _call(oai, seed=2, max_tokens=8, logit_bias={brace: -100}).choices[0]
        assert answered.message.tool_calls is None and not answered.message.content.startswith("{")
        history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "register", "arguments": '{"who":{"age":3}}'}}]},
                   {"role": "tool", "tool_call_id": "c1", "content": "ok"}, {"role": "user", "content": "And?"}]
        usage = _call(oai, messages=history, tool_choice="none", max_tokens=2).usage
        reference = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "register", "arguments": {"who": {"age": 3}}}}]},
                     history[2], history[3]]
        expected = tokenizer.apply_chat_template(reference, tools=TOOLS, add_generation_prompt=True, tokenize=True)
        expected = expected["input_ids"] if hasattr(expected, "keys") else expected
        assert usage.prompt_tokens == len(expected)


def test_a_schema_the_grammar_engine_cannot_use_is_a_422_with_the_reason(oai):
    dangling = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}]
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        _call(oai, tools=dangling, tool_choice="required", max_tokens=4)
    text = json.dumps(refused.value.body)
    assert "tools: the grammar cannot be used" in text and "missing" in text
    strict = [{"type": "function", "function": {"name": "f", "strict": True, "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "format": "no-such-format"}}}}}]
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        _call(oai, tools=strict, tool_choice="required", max_tokens=4)
    assert "tools:" in json.dumps(refused.value.body)
    lenient = [{"type": "function", "function": {"name": "f", "parameters": strict[0]["function"]["parameters"]}}]
    choice = _call(oai, tools=lenient, tool_choice="required", max_tokens=48, seed=1).choices[0]
    assert choice.finish_reason in ("tool_calls", "length")  # without strict the unknown keyword is ignored
