"""OpenAI's ``tool_calls`` from a generated text, whole or streamed.

The inference service names the tool-call format in a generation's start event when the output
may hold calls; :class:`ChoiceToolCalls` parses one choice's text with it
(``inference.tool_calls.ToolCallParser``) into OpenAI's shapes: the message's ``content`` (None
when it is only calls) and ``tool_calls`` (each with a fresh ``call_...`` id and its arguments as
JSON text), or, streamed, ``delta`` objects: a call's first delta carries its index, id, type and
name with empty arguments, the following ones pieces of its arguments. ``finish_reason`` is
``tool_calls`` when the model stopped after making calls.
"""

from __future__ import annotations

import uuid

from inference.request import FinishReason
from inference.tool_calls import FORMATS, ArgumentsPiece, CallStart, ContentPiece, Piece, ToolCallParser


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ChoiceToolCalls:
    """One choice's calls, parsed as its text arrives (``format_name``: the start event's
    ``tool_call_format``)."""

    def __init__(self, format_name: str):
        self.parser = ToolCallParser(FORMATS[format_name])
        self.ids: list[str] = []

    def feed(self, text: str) -> list[dict]:
        """The stream deltas ``text`` completes (possibly none: text that may open a call is held)."""
        return self._deltas(self.parser.feed(text))

    def finish(self) -> list[dict]:
        """The deltas of the text still held when the generation ended."""
        return self._deltas(self.parser.finish())

    def _deltas(self, pieces: list[Piece]) -> list[dict]:
        out: list[dict] = []
        for piece in pieces:
            if isinstance(piece, ContentPiece):
                out.append({"content": piece.text})
            elif isinstance(piece, CallStart):
                self.ids.append(new_call_id())
                out.append({"tool_calls": [{"index": piece.index, "id": self.ids[piece.index], "type": "function",
                                            "function": {"name": piece.name, "arguments": ""}}]})
            elif isinstance(piece, ArgumentsPiece):
                out.append({"tool_calls": [{"index": piece.index, "function": {"arguments": piece.text}}]})
        return out

    def finish_reason(self, reason: FinishReason) -> str:
        return "tool_calls" if self.parser.calls and reason is FinishReason.STOP else reason.value

    def message(self, text: str) -> dict:
        """The whole ``text`` as OpenAI's assistant message (after :meth:`finish_reason` is valid)."""
        self.feed(text)
        self.finish()
        calls = [{"id": self.ids[i], "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                 for i, c in enumerate(self.parser.calls)]
        content = self.parser.content
        message = {"role": "assistant", "content": (content or None) if calls else content, "refusal": None}
        if calls:
            message["tool_calls"] = calls
        return message


def plain_message(text: str) -> dict:
    """An assistant message without tool calls."""
    return {"role": "assistant", "content": text, "refusal": None}
