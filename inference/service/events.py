"""Generation events: what one generation produces, typed, from the engine to the HTTP edges.

Inside Tailor a generation is a stream of these frozen dataclasses:

* :class:`GenerationStarted` once, first: the request id, the prompt's length in tokens, how
  many of the request's messages made it into the prompt, and the tool-call format to parse the
  output with (when tools may be called);
* :class:`TextDelta` for every step that produced text (``tokens``: how many token ids it carries;
  with logprobs requested also for steps that produced tokens but no text yet, each new token's
  :class:`TokenLogprobs` in ``logprobs``);
* :class:`GenerationEnded` once, last: finish reason (``stop``, ``length`` or ``abort``), usage and
  the whole text; or
* :class:`GenerationFailed` last, when the request failed inside the engine (or the stream broke).

They become JSON only where bytes cross HTTP: :func:`to_wire` / :func:`from_wire` are the internal
service's NDJSON objects (``inference.service.app`` writes them, ``inference.service.client``
reads them), and the public API renders its own JSON and SSE frames from the typed events
(``api/generation.py`` and the chat routers).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Union

from inference.request import FinishReason
from inference.service.protocol import InferenceError
from inference.tool_calls import FORMATS

FAILED_STATUS = 503  # a generation that fails after it started: the platform's fault, retry later


@dataclass(frozen=True, slots=True)
class GenerationStarted:
    """``tool_call_format``: the output may hold tool calls in this format
    (``inference.tool_calls.FORMATS``), or None."""

    request_id: str
    prompt_tokens: int
    messages_used: int
    tool_call_format: str | None = None


@dataclass(frozen=True, slots=True)
class TopLogprob:
    """One alternative: the token's text, its exact bytes (a token may end inside a UTF-8
    character, so ``token`` may hold U+FFFD where ``bytes`` does not) and its logprob."""

    token: str
    bytes: tuple[int, ...]
    logprob: float


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """A generated token, its logprob under the model, and the ``top`` most likely alternatives."""

    token: str
    bytes: tuple[int, ...]
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str
    tokens: int
    logprobs: tuple[TokenLogprobs, ...] | None = None


@dataclass(frozen=True, slots=True)
class GenerationEnded:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    text: str

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class GenerationFailed:
    """``status``: the HTTP status a caller that has sent nothing yet answers with. Every failure
    after the start is the service's fault (503); the internal wire does not carry it."""

    message: str
    status: int = FAILED_STATUS


GenerationEvent = Union[GenerationStarted, TextDelta, GenerationEnded, GenerationFailed]
TERMINAL_EVENTS = (GenerationEnded, GenerationFailed)


def is_terminal(event: GenerationEvent) -> bool:
    """True for the last event of a generation (ended or failed)."""
    return isinstance(event, TERMINAL_EVENTS)


async def run_to_end(events: AsyncIterator[GenerationEvent]) -> GenerationEnded:
    """Read ``events`` to the last one (closing them in any case): its ``GenerationEnded``, or
    InferenceError(503) with the message of a failure or of a stream that stopped early."""
    final: GenerationEvent | None = None
    try:
        async for event in events:
            final = event
    finally:
        await events.aclose()  # type: ignore[attr-defined]
    if isinstance(final, GenerationEnded):
        return final
    message = final.message if isinstance(final, GenerationFailed) else "generation failed"
    raise InferenceError.unavailable(message)


# --------------------------------------------------------------------------- the internal wire
class MalformedEvent(ValueError):
    """A wire object that is no generation event."""


def to_wire(event: GenerationEvent) -> dict:
    """The internal service's JSON object for ``event`` (key order is part of the wire format)."""
    if isinstance(event, GenerationStarted):
        wire = {"event": "start", "request_id": event.request_id, "prompt_tokens": event.prompt_tokens,
                "messages_used": event.messages_used}
        if event.tool_call_format is not None:
            wire["tool_call_format"] = event.tool_call_format
        return wire
    if isinstance(event, TextDelta):
        wire = {"event": "delta", "text": event.text, "tokens": event.tokens}
        if event.logprobs is not None:
            wire["logprobs"] = [{"token": t.token, "bytes": list(t.bytes), "logprob": t.logprob,
                                 "top": [{"token": a.token, "bytes": list(a.bytes), "logprob": a.logprob} for a in t.top]}
                                for t in event.logprobs]
        return wire
    if isinstance(event, GenerationEnded):
        return {"event": "end", "finish_reason": event.finish_reason.value, "prompt_tokens": event.prompt_tokens,
                "completion_tokens": event.completion_tokens, "text": event.text}
    if isinstance(event, GenerationFailed):
        return {"event": "error", "message": event.message}
    raise TypeError(f"not a generation event: {event!r}")


def _field(obj: dict, name: str, kind: type):
    value = obj.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MalformedEvent(f"{obj.get('event')} event: {name} must be {kind.__name__}")
    return value


def from_wire(obj: object) -> GenerationEvent:
    """The typed event of a wire object (unknown extra keys are ignored); MalformedEvent otherwise."""
    if not isinstance(obj, dict):
        raise MalformedEvent("an event must be a JSON object")
    kind = obj.get("event")
    if kind == "start":
        tool_format = obj.get("tool_call_format")
        if tool_format is not None and tool_format not in FORMATS:
            raise MalformedEvent(f"start event: unknown tool_call_format {tool_format!r}")
        return GenerationStarted(_field(obj, "request_id", str), _field(obj, "prompt_tokens", int),
                                 _field(obj, "messages_used", int), tool_format)
    if kind == "delta":
        logprobs = obj.get("logprobs")
        return TextDelta(_field(obj, "text", str), _field(obj, "tokens", int),
                         None if logprobs is None else _logprobs_from_wire(logprobs))
    if kind == "end":
        try:
            reason = FinishReason(_field(obj, "finish_reason", str))
        except ValueError as exc:
            raise MalformedEvent(f"end event: unknown finish_reason {obj.get('finish_reason')!r}") from exc
        return GenerationEnded(reason, _field(obj, "prompt_tokens", int), _field(obj, "completion_tokens", int),
                               _field(obj, "text", str))
    if kind == "error":
        message = obj.get("message")
        return GenerationFailed(message if isinstance(message, str) else "generation failed")
    raise MalformedEvent(f"unknown event kind {kind!r}")


def _alternative(obj: object) -> TopLogprob:
    if not isinstance(obj, dict):
        raise MalformedEvent("delta event: a logprob entry must be an object")
    raw = obj.get("bytes")
    if not isinstance(raw, list) or any(not isinstance(b, int) or isinstance(b, bool) or not 0 <= b < 256 for b in raw):
        raise MalformedEvent("delta event: logprob bytes must be a list of byte values")
    logprob = obj.get("logprob")
    if not isinstance(logprob, (int, float)) or isinstance(logprob, bool):
        raise MalformedEvent("delta event: logprob must be a number")
    return TopLogprob(_field(obj, "token", str), tuple(raw), float(logprob))


def _logprobs_from_wire(entries: object) -> tuple[TokenLogprobs, ...]:
    if not isinstance(entries, list):
        raise MalformedEvent("delta event: logprobs must be a list")
    out = []
    for entry in entries:
        head = _alternative(entry)
        top = entry.get("top")
        if not isinstance(top, list):
            raise MalformedEvent("delta event: logprobs top must be a list")
        out.append(TokenLogprobs(head.token, head.bytes, head.logprob, tuple(_alternative(a) for a in top)))
    return tuple(out)
