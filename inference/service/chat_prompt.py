"""Rendering a chat for the engine: the system prompt plus the newest messages that fit a token
budget, with the model's chat template.

With a trim step ``S`` (tokens) the history window is *stepped* so that the prefix cache can reuse
the previous turn's pages: the kept history may only start at an *anchor*, and anchors stay put as
messages are appended. Message ``i``'s weight ``w_i`` is its tokens in the template (content plus
the template's per-message wrapping), which depends on that message alone; ``C_i`` is the sum of
the weights of the messages before it. Anchor ``k`` is the first message that is not an answer (an
assistant turn or a tool result) with ``C_i >= k * S``. A new message never moves an existing
anchor, so the window start stays where it is, and each turn's prompt extends the previous one
exactly, until the suffix from it no longer fits; then it jumps to the next anchor that fits,
about ``S`` tokens later. The prompt (system prompt + history + new message) therefore stays
between about ``limit - S`` and ``limit`` tokens (docs/design.md "The history window and the
prefix cache").
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from inference.service.protocol import InferenceError
from inference.tokenizer import Tokenizer


@dataclass
class RenderedPrompt:
    token_ids: list[int]
    messages_used: int  # how many of the request's messages made it into the prompt


def _template(tokenizer: Tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """``tokenizer.apply_chat_template``, with a message it cannot render as InferenceError(422)."""
    try:
        return tokenizer.apply_chat_template(messages, tools)
    except (ValueError, TypeError) as exc:  # TypeError: text the tokenizer cannot encode
        raise InferenceError.invalid(f"the messages cannot be tokenized: {exc}") from exc


def message_weights(tokenizer: Tokenizer, messages: Sequence[dict]) -> list[int]:
    """Tokens each message takes in the chat template: its content plus the template's wrapping
    for its role (measured on empty turns; a system turn counts as a user turn). Each depends on
    its message alone."""
    turns = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}, {"role": "user", "content": ""}]
    lengths = [len(_template(tokenizer, turns[:n])) for n in (1, 2, 3)]
    wrapping = {"assistant": max(0, lengths[1] - lengths[0]), "user": max(0, lengths[2] - lengths[1])}
    empty = len(tokenizer.encode(""))  # a BOS the encoder adds to every text, not part of a message
    try:  # an assistant turn's tool calls count as its text (their template wrapping is not measured)
        return [len(tokenizer.encode(_turn_text(m))) - empty + wrapping.get(m["role"], wrapping["user"])
                for m in messages]
    except (ValueError, TypeError) as exc:
        raise InferenceError.invalid(f"the messages cannot be tokenized: {exc}") from exc


def _turn_text(message: dict) -> str:
    calls = message.get("tool_calls") or []
    return (message.get("content") or "") + "".join(json.dumps(c, ensure_ascii=False) for c in calls)


def _answers(message: dict) -> bool:
    """An assistant turn or a tool result: a history that starts there has lost its question."""
    return message["role"] in ("assistant", "tool")


def history_anchors(messages: Sequence[dict], weights: Sequence[int], step_tokens: int) -> list[int]:
    """Indices where a stepped history may start, ascending: for each ``k >= 0`` the first message
    that is not an assistant turn or tool result with ``sum(weights[:i]) >= k * step_tokens``
    (several ``k`` may share one message). Appending messages never changes the anchors already
    there."""
    if step_tokens < 1:
        raise ValueError(f"step_tokens must be at least 1, got {step_tokens}")
    anchors: list[int] = []
    before = 0  # tokens of the messages before message i
    mark = 0  # the next multiple of step_tokens an anchor must reach
    for i, message in enumerate(messages):
        if not _answers(message) and before >= mark:
            anchors.append(i)
            mark = (before // step_tokens + 1) * step_tokens
        before += weights[i]
    return anchors


def render_chat(
    tokenizer: Tokenizer,
    system_prompt: str | None,
    messages: list[dict],
    token_limit: int,
    step_tokens: int | None = None,
    tools: list[dict] | None = None,
) -> RenderedPrompt:
    """Render ``system_prompt`` + the newest messages that fit ``token_limit`` tokens.

    Without ``step_tokens`` the history starts as early as fits (exact fit). With it (tokens, >= 1)
    the history starts at the earliest anchor (:func:`history_anchors`) whose suffix fits, so the
    start only moves in jumps of about ``step_tokens`` and a growing conversation keeps its prompt
    prefix between jumps; when no anchor's suffix fits (e.g. a very long last exchange) it falls
    back to the exact fit. Fitting is monotone in how many old messages are dropped, so binary
    searches find the starts; the history starts at a user turn when it can (not at an answer: an
    assistant turn or a tool result). ``tools`` (OpenAI tool objects) are rendered with every
    candidate, so they count against the limit. The last message always stays: if it does not fit
    on its own, InferenceError(422).
    """
    if step_tokens is not None and step_tokens < 1:
        raise InferenceError.invalid(f"history_trim_step_tokens must be at least 1, got {step_tokens}")
    prefix = [{"role": "system", "content": system_prompt}] if system_prompt else []
    cache: dict[int, list[int]] = {}

    def ids_from(start: int) -> list[int]:
        if start not in cache:
            cache[start] = _template(tokenizer, prefix + messages[start:], tools)
        return cache[start]

    def fits(start: int) -> bool:
        return len(ids_from(start)) <= token_limit

    last = len(messages) - 1
    if not fits(last):
        raise InferenceError.invalid(
            f"the message is {len(ids_from(last))} tokens with the system prompt and chat template; "
            f"at most {token_limit} fit"
        )
    if step_tokens is not None and not fits(0):
        anchors = history_anchors(messages, message_weights(tokenizer, messages), step_tokens)
        first = _first_true(len(anchors), lambda j: fits(anchors[j]))
        if first < len(anchors):
            return RenderedPrompt(ids_from(anchors[first]), len(messages) - anchors[first])
    start = _first_true(last, fits)  # exact fit; ``last`` always fits
    while start < last and _answers(messages[start]):
        start += 1  # a history should not open with half of an exchange
    return RenderedPrompt(ids_from(start), len(messages) - start)


def _first_true(n: int, predicate) -> int:
    """The smallest ``i`` in ``[0, n)`` with ``predicate(i)`` for a predicate that is monotone
    (false, then true); ``n`` when it is false everywhere."""
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        if predicate(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo
