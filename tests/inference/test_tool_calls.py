"""Tool calls (``inference.tool_calls``): which format a chat template teaches, the grammar of each
``tool_choice`` (driven token by token through llguidance with the real tokenizers, the tool tags
as single added tokens and as plain text), and the incremental parser (every split of a text
parses as the whole text does; text that is no call stays content)."""

from __future__ import annotations

import json
import random

import llguidance
import llguidance.hf
import pytest
from transformers import AutoTokenizer

from inference.tokenizer import Tokenizer
from inference.tool_calls import (HERMES, LLAMA3_JSON, ArgumentsPiece, CallStart, ContentPiece, FunctionSpec,
                                  ToolCallParser, detect_format, parse_tool_calls, tool_grammar)

WEATHER = FunctionSpec("get_weather", {"type": "object", "required": ["city"], "additionalProperties": False,
                                       "properties": {"city": {"type": "string"}, "days": {"type": "integer",
                                                                                           "minimum": 1}}})
PING = FunctionSpec("ping")
FUNCTIONS = [WEATHER, PING]
# the sentence Meta's Llama 3.1-3.3 templates use to ask for JSON calls
LLAMA3_TEMPLATE = ('{%- if tools %}Given the following functions, please respond with a JSON for a function call with '
                   'its proper arguments that best answers the given prompt.\n\nRespond in the format {"name": '
                   'function name, "parameters": dictionary of argument name and its value}. Do not use variables.'
                   '{%- for t in tools %}{{ t | tojson }}{%- endfor %}{%- endif %}'
                   '{%- for m in messages %}{{ m.content }}{%- endfor %}')


def test_formats_are_detected_from_the_template(tools_checkpoint, tiny_checkpoint):
    tools = Tokenizer(tools_checkpoint)
    assert tools.renders_tools and tools.tool_call_format is HERMES
    assert tools.added_token_ids(HERMES.markers) == {"<tool_call>": 49152, "</tool_call>": 49153}
    plain = Tokenizer(tiny_checkpoint)  # SmolLM2's template: no tools
    assert not plain.renders_tools and plain.tool_call_format is None and plain.added_token_ids(HERMES.markers) == {}
    assert detect_format(LLAMA3_TEMPLATE) is LLAMA3_JSON
    assert detect_format("{% for t in tools %}<function={{ t.name }}>{% endfor %}") is None


def test_a_template_that_renders_tools_in_an_unknown_format_has_no_format(tmp_path, tiny_checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    tokenizer.chat_template = "{% for t in tools %}<function={{ t.function.name }}>{% endfor %}" \
                              "{% for m in messages %}{{ m.content }}{% endfor %}"
    tokenizer.save_pretrained(tmp_path)
    unknown = Tokenizer(tmp_path)
    assert unknown.renders_tools and unknown.tool_call_format is None


# ----------------------------------------------------------------------------------------- grammars
@pytest.fixture(scope="module")
def tokenizers(tools_checkpoint, tiny_checkpoint) -> dict[str, tuple]:
    """``special``: the tool tags are added tokens (as Qwen2.5 has them); ``text``: they are spelled
    with ordinary tokens. Each: (HF tokenizer, llguidance tokenizer, marker token ids)."""
    out = {}
    for name, path in (("special", tools_checkpoint), ("text", tiny_checkpoint)):
        hf = AutoTokenizer.from_pretrained(str(path))
        markers = Tokenizer(path).added_token_ids(HERMES.markers)
        out[name] = (hf, llguidance.hf.from_tokenizer(hf, n_vocab=len(hf), eos_token=[2]), markers)
    return out


def _accepts(tokenizers, kind: str, fmt, choice, text: str, parallel: bool = True) -> str:
    """'complete' (the grammar accepts ``text`` and may end there), 'prefix' or 'refused'."""
    hf, llg, markers = tokenizers[kind]
    grammar = llguidance.LLMatcher.grammar_from_lark(tool_grammar(fmt, FUNCTIONS, choice, parallel, markers))
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, llg)
    assert not is_error, messages
    matcher = llguidance.LLMatcher(llg, grammar, log_level=0)
    for token in hf.encode(text, add_special_tokens=False):
        if not matcher.consume_token(token):
            return "refused"
    return "complete" if matcher.is_accepting() else "prefix"


CALL = HERMES.render("get_weather", '{"city":"Oslo","days":2}')
PING_CALL = HERMES.render("ping", "{}")


@pytest.mark.parametrize("kind", ["special", "text"])
@pytest.mark.parametrize("choice, text, expected", [
    ("auto", "Just text.", "complete"),
    ("auto", "Let me check.\n" + CALL, "complete"),
    ("auto", CALL + "\n" + PING_CALL, "complete"),
    ("auto", "<tool_call>\nnot a call", "refused"),
    ("auto", CALL.replace('"city":"Oslo"', '"city": "Oslo"'), "refused"),  # the arguments are compact JSON
    ("auto", CALL.replace('"days":2', '"days":0'), "refused"),  # minimum 1
    ("auto", CALL.replace('"city":"Oslo",', ''), "refused"),  # city is required
    ("required", "Just text.", "refused"),
    ("required", CALL, "complete"),
    ("required", CALL[:30], "prefix"),
    ("ping", CALL, "refused"),
    ("ping", PING_CALL, "complete"),
    ("ping", PING_CALL + "\n" + PING_CALL, "refused"),
    ("none", "Just text.", "complete"),
    ("none", "Here: <tool_call>", "refused"),
])
def test_each_tool_choice_allows_exactly_its_outputs(tokenizers, kind, choice, text, expected):
    assert _accepts(tokenizers, kind, HERMES, choice, text) == expected


def test_parallel_calls_can_be_turned_off(tokenizers):
    two = CALL + "\n" + PING_CALL
    assert _accepts(tokenizers, "special", HERMES, "required", two, parallel=True) == "complete"
    assert _accepts(tokenizers, "special", HERMES, "required", two, parallel=False) == "refused"


@pytest.mark.parametrize("choice, text, expected", [
    ("auto", "It is sunny.", "complete"),
    ("auto", LLAMA3_JSON.render("get_weather", '{"city":"Rome"}'), "complete"),
    ("auto", LLAMA3_JSON.render("get_weather", '{"town":"Rome"}'), "refused"),
    ("required", "It is sunny.", "refused"),
    ("none", '{"name": "ping"', "refused"),
    ("required", LLAMA3_JSON.render("ping", "{}") + "; " + LLAMA3_JSON.render("ping", "{}"), "refused"),  # one call
])
def test_llama3_json_calls_are_a_whole_answer(tokenizers, choice, text, expected):
    assert _accepts(tokenizers, "text", LLAMA3_JSON, choice, text) == expected


def test_a_named_function_must_be_one_of_the_tools():
    with pytest.raises(ValueError, match="not one of the tools"):
        tool_grammar(HERMES, FUNCTIONS, "get_time")


# ------------------------------------------------------------------------------------------ parsing
def _stream(fmt, text: str, rng: random.Random) -> tuple[ToolCallParser, list]:
    parser, pieces, at = ToolCallParser(fmt), [], 0
    while at < len(text):
        step = rng.randint(1, 7)
        pieces += parser.feed(text[at:at + step])
        at += step
    return parser, pieces + parser.finish()


def _replay(pieces: list) -> tuple[str, list[tuple[str, str]]]:
    """Content and (name, arguments) per call, from streamed pieces alone."""
    content, calls = "", []
    for piece in pieces:
        if isinstance(piece, ContentPiece):
            content += piece.text
        elif isinstance(piece, CallStart):
            assert piece.index == len(calls)
            calls.append((piece.name, ""))
        else:
            assert isinstance(piece, ArgumentsPiece)
            calls[piece.index] = (calls[piece.index][0], calls[piece.index][1] + piece.text)
    return content, calls


@pytest.mark.parametrize("fmt, text, content, calls", [
    (HERMES, "Checking <b>now</b>.\n" + CALL + "\n" + PING_CALL, "Checking <b>now</b>.\n",
     [("get_weather", '{"city":"Oslo","days":2}'), ("ping", "{}")]),
    (HERMES, HERMES.render("get_weather", '{"city":"a}\\"{[b","days":1}'), "",
     [("get_weather", '{"city":"a}\\"{[b","days":1}')]),
    (HERMES, "No calls, just <tool and text", "No calls, just <tool and text", []),
    (HERMES, "Broken <tool_call>\nplain", "Broken <tool_call>\nplain", []),
    (LLAMA3_JSON, LLAMA3_JSON.render("get_weather", '{"city":"Rome","days":[1,{"x":2}]}'), "",
     [("get_weather", '{"city":"Rome","days":[1,{"x":2}]}')]),
    (LLAMA3_JSON, 'Sunny. {"name": "x"}', 'Sunny. {"name": "x"}', []),
])
def test_every_split_parses_as_the_whole_text(fmt, text, content, calls, random_seed):
    whole = parse_tool_calls(fmt, text)
    assert whole.content == content and [(c.name, c.arguments) for c in whole.calls] == calls
    assert all(c.complete for c in whole.calls)
    rng = random.Random(random_seed)
    for _ in range(50):
        parser, pieces = _stream(fmt, text, rng)
        assert _replay(pieces) == (content, calls)
        assert parser.content == content and parser.calls == whole.calls


def test_a_cut_output_keeps_what_was_generated(random_seed):
    """Cut anywhere (max_tokens), the parse keeps the content, the whole calls, and a prefix of the
    cut call's arguments; the framing text is never content."""
    text = "Sure.\n" + CALL + "\n" + PING_CALL
    for cut in range(len(text) + 1):
        parsed = parse_tool_calls(HERMES, text[:cut])
        full = parse_tool_calls(HERMES, text)
        assert full.content.startswith(parsed.content) or parsed.content.startswith(full.content)
        for got, want in zip(parsed.calls, full.calls):
            assert got.name == want.name and want.arguments.startswith(got.arguments)
        if parsed.calls:
            assert parsed.content == "Sure.\n"
        assert json.loads(full.calls[0].arguments) == {"city": "Oslo", "days": 2}
