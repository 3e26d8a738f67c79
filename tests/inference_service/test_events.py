"""Generation events: typed inside, JSON only on the wire. The wire objects keep their exact key
order (the NDJSON bytes are unchanged), and anything else read from the wire is refused."""

from __future__ import annotations

import json

import pytest

from inference.request import FinishReason
from inference.service.events import (
    GenerationEnded,
    GenerationFailed,
    GenerationStarted,
    MalformedEvent,
    TextDelta,
    TokenLogprobs,
    TopLogprob,
    from_wire,
    is_terminal,
    to_wire,
)

EVENTS = [
    (GenerationStarted("r1", 12, 3),
     '{"event": "start", "request_id": "r1", "prompt_tokens": 12, "messages_used": 3}'),
    (GenerationStarted("r2", 40, 1, "hermes"),
     '{"event": "start", "request_id": "r2", "prompt_tokens": 40, "messages_used": 1, "tool_call_format": "hermes"}'),
    (TextDelta("Grüß", 2), '{"event": "delta", "text": "Grüß", "tokens": 2}'),
    (GenerationEnded(FinishReason.LENGTH, 12, 4, "Grüß dich"),
     '{"event": "end", "finish_reason": "length", "prompt_tokens": 12, "completion_tokens": 4, "text": "Grüß dich"}'),
    (GenerationFailed("boom"), '{"event": "error", "message": "boom"}'),
    (TextDelta("", 1, (TokenLogprobs(" \ufffd", (32, 240, 159, 152), -0.5, (TopLogprob("a", (97,), -1.25),)),)),
     '{"event": "delta", "text": "", "tokens": 1, "logprobs": [{"token": " \ufffd", "bytes": [32, 240, 159, 152], '
     '"logprob": -0.5, "top": [{"token": "a", "bytes": [97], "logprob": -1.25}]}]}'),
]


@pytest.mark.parametrize("event, line", EVENTS)
def test_the_wire_form_is_unchanged_and_round_trips(event, line):
    assert json.dumps(to_wire(event), ensure_ascii=False) == line
    assert from_wire(json.loads(line)) == event


def test_only_ended_and_failed_are_terminal():
    assert [is_terminal(e) for e, _ in EVENTS] == [False, False, False, True, True, False]
    assert GenerationEnded(FinishReason.STOP, 2, 3, "x").total_tokens == 5
    assert GenerationFailed("x").status == 503


@pytest.mark.parametrize("obj", [
    [], "start", {"event": "surprise"}, {"event": "delta", "text": "a"}, {"event": "delta", "text": 1, "tokens": 1},
    {"event": "start", "request_id": "r", "prompt_tokens": True, "messages_used": 1},
    {"event": "start", "request_id": "r", "prompt_tokens": 1, "messages_used": 1, "tool_call_format": "xml"},
    {"event": "end", "finish_reason": "bored", "prompt_tokens": 1, "completion_tokens": 1, "text": ""},
    {"event": "delta", "text": "", "tokens": 1, "logprobs": {}},
    {"event": "delta", "text": "", "tokens": 1, "logprobs": [{"token": "a", "bytes": [256], "logprob": 0, "top": []}]},
    {"event": "delta", "text": "", "tokens": 1, "logprobs": [{"token": "a", "bytes": [97], "logprob": "x", "top": []}]},
    {"event": "delta", "text": "", "tokens": 1, "logprobs": [{"token": "a", "bytes": [97], "logprob": 0}]},
])
def test_malformed_wire_objects_are_refused(obj):
    with pytest.raises(MalformedEvent):
        from_wire(obj)


def test_an_error_without_a_message_still_fails():
    assert from_wire({"event": "error"}) == GenerationFailed("generation failed")


def test_both_backends_offer_the_interface_the_api_uses():
    from inference.service.backend import GenerationEvents, InferenceBackend
    from inference.service.client import RemoteEventStream, RemoteInference
    from inference.service.core import GenerationStream, InferenceCore

    for backend in (InferenceCore, RemoteInference):
        for name in ("start", "generate", "prefetch", "drop_adapter", "is_ready", "aclose"):
            assert callable(getattr(backend, name)), (backend, name)
    assert {n for n in InferenceBackend.__dict__ if not n.startswith("_")} == {
        "start", "generate", "prefetch", "drop_adapter", "is_ready", "aclose"}
    for stream in (GenerationStream, RemoteEventStream):
        for name in ("__aiter__", "__anext__", "aclose"):
            assert callable(getattr(stream, name)), (stream, name)
    assert {"__aiter__", "__anext__", "aclose"} <= set(GenerationEvents.__dict__)
