"""Tool calls: the format a model writes them in, the grammar that constrains them, and parsing
them out of the generated text (streamed or whole).

A chat template that renders ``tools`` tells the model how to call them; Tailor recognises two
formats by the template's text (:func:`detect_format`):

* ``hermes`` (Qwen2.5/Qwen3, Hermes, and their fine-tunes): any text, then one or more
  ``<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`` separated by ``\\n``;
* ``llama3_json`` (Llama 3.1-3.3): either text that does not start with ``{``, or exactly one
  ``{"name": "f", "parameters": {...}}``.

:func:`tool_grammar` writes an llguidance Lark grammar that allows exactly the choice asked for
(``auto``: text or calls; ``required``: calls only; a named function: one call of it; ``none``: text
only) with each function's arguments constrained to its JSON schema, in one fixed layout (compact
arguments), so :class:`ToolCallParser` can split the output without guessing. The parser is
incremental: the streamed pieces of any split of a text equal those of the whole text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

FUNCTION_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule; a name is embedded in the grammar verbatim
ToolChoiceMode = Literal["none", "auto", "required"]


@dataclass(frozen=True)
class ToolCallFormat:
    """How a model writes one call: ``trigger + open + name + arguments_key + ARGUMENTS + close``;
    several calls are joined by ``separator`` (None: one call per turn). ``text_before_calls``:
    free text may precede the calls (else the output is text or calls, told apart by the trigger)."""

    name: str
    trigger: str
    open: str
    arguments_key: str
    close: str
    separator: str | None
    text_before_calls: bool
    markers: tuple[str, ...] = ()  # tag-like texts a tokenizer may hold as single added tokens

    def render(self, function: str, arguments: str) -> str:
        """One call's text (``arguments``: compact JSON)."""
        return f"{self.trigger}{self.open}{function}{self.arguments_key}{arguments}{self.close}"


HERMES = ToolCallFormat("hermes", "<tool_call>", '\n{"name": "', '", "arguments": ', "}\n</tool_call>", "\n", True,
                        ("<tool_call>", "</tool_call>"))
LLAMA3_JSON = ToolCallFormat("llama3_json", "{", '"name": "', '", "parameters": ', "}", None, False)
FORMATS = {f.name: f for f in (HERMES, LLAMA3_JSON)}

# what a template's text says about its format (checked in this order)
_FORMAT_MARKERS = ((HERMES, "<tool_call>"), (LLAMA3_JSON, '"parameters": dictionary of argument name'))


def detect_format(chat_template: str) -> ToolCallFormat | None:
    """The tool-call format a chat template teaches its model, or None when it is none of
    :data:`FORMATS`."""
    for fmt, marker in _FORMAT_MARKERS:
        if marker in chat_template:
            return fmt
    return None


@dataclass(frozen=True)
class FunctionSpec:
    """A function the model may call: ``parameters`` is its arguments' JSON schema (None: no
    arguments, an empty object); ``strict``: a schema keyword the grammar cannot enforce is an
    error instead of being ignored."""

    name: str
    parameters: dict[str, Any] | None = None
    strict: bool = False
    description: str | None = None

    def template_entry(self) -> dict[str, Any]:
        """The tool as chat templates read it (OpenAI's ``{"type": "function", "function": ...}``)."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = self.parameters if self.parameters is not None else {"type": "object",
                                                                                      "properties": {}}
        return {"type": "function", "function": function}


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _sequence(text: str, marker_tokens: Mapping[str, int]) -> str:
    """``text`` as a Lark sequence: quoted literals, and each marker that the tokenizer holds as
    one added token as that token (``<[id]>``: llguidance treats added ``<...>`` tokens as special,
    so their text could only be spelled with other tokens, which the model was not trained on)."""
    parts: list[str] = []
    rest = text
    while rest:
        hits = [(rest.find(m), m) for m in marker_tokens if m in rest]
        if not hits:
            parts.append(_literal(rest))
            break
        at, marker = min(hits)
        if at:
            parts.append(_literal(rest[:at]))
        parts.append(f"<[{marker_tokens[marker]}]>")
        rest = rest[at + len(marker):]
    return " ".join(parts)


def json_object_text(value: str) -> str:
    """``value`` if it is the JSON text of an object (a call's arguments); ValueError otherwise."""
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        raise ValueError("arguments must be the JSON text of an object")
    return value


def parameters_problem(parameters: dict[str, Any] | None) -> str | None:
    """Why a function's ``parameters`` cannot describe its arguments (they are a JSON object), or None."""
    if parameters is not None and parameters.get("type", "object") != "object":
        return 'parameters must be the JSON schema of an object ("type": "object")'
    return None


def _arguments_schema(function: FunctionSpec) -> str:
    """The function's argument schema with llguidance's layout options (compact JSON; ``lenient``
    unless strict), as JSON text for ``%json``."""
    schema = {"type": "object", **function.parameters} if function.parameters is not None else \
        {"type": "object", "properties": {}, "additionalProperties": False}
    options = {"whitespace_flexible": False, "lenient": not function.strict}
    return json.dumps({**schema, "x-guidance": options}, ensure_ascii=False, separators=(",", ":"))


def tool_grammar(fmt: ToolCallFormat, functions: Sequence[FunctionSpec], choice: ToolChoiceMode | str,
                 parallel: bool = True, marker_tokens: Mapping[str, int] | None = None) -> str:
    """The llguidance Lark grammar for a turn with ``functions`` available.

    ``choice``: ``auto`` (text, or calls), ``required`` (one or more calls), ``none`` (text
    without the call trigger), or a function's name (exactly one call of it). ``parallel``: more
    than one call may be made (only where the format has a separator). ``marker_tokens``: the
    format's markers that the tokenizer holds as single added tokens, by token id (see
    :func:`_sequence`). ValueError for a named function that is not in ``functions``.
    """
    markers = dict(marker_tokens or {})
    names = [f.name for f in functions]
    if not names:
        raise ValueError("a tool grammar needs at least one function")
    if choice not in ("auto", "required", "none") and choice not in names:
        raise ValueError(f"tool_choice names {choice!r}, which is not one of the tools")
    lines = ["%llguidance {}"]
    trigger = _sequence(fmt.trigger, markers)
    if fmt.text_before_calls:  # any text that does not contain the trigger
        lines.append(f"TEXT: /(?s:.*)/ & ~/(?s:.*){_regex_escape(fmt.trigger)}(?s:.*)/")
    else:  # text that does not start with the trigger (or none at all)
        lines.append(f"TEXT: /([^{_class_escape(fmt.trigger[0])}](?s:.*))?/")
    several = parallel and fmt.separator is not None
    calls = f"call ({_sequence(fmt.separator or '', markers)} {trigger} call)*" if several else "call"
    if choice == "none":
        lines.append("start: TEXT")
    elif choice == "auto":
        if fmt.text_before_calls and fmt.trigger in markers:  # a special token cannot be part of a lexeme
            lines.append(f"start: TEXT | TEXT {trigger} {calls}")
        elif fmt.text_before_calls:  # the text ends where the trigger is first spelled out
            lines += ["start: TEXT | lead " + calls, f"lead[lazy]: TEXT {trigger}"]
        else:
            lines.append(f"start: TEXT | {trigger} {calls}")
    elif choice == "required":
        lines.append(f"start: {trigger} {calls}")
    else:
        lines.append(f"start: {trigger} fn_{names.index(choice)}")
    lines.append("call: " + " | ".join(f"fn_{i}" for i in range(len(functions))))
    for i, function in enumerate(functions):
        head = _sequence(f"{fmt.open}{function.name}{fmt.arguments_key}", markers)
        lines.append(f"fn_{i}: {head} %json {_arguments_schema(function)} {_sequence(fmt.close, markers)}")
    return "\n".join(lines) + "\n"


def _regex_escape(text: str) -> str:
    """``text`` as a literal inside a Lark ``/.../`` (Rust regex syntax; ``/`` ends the regex)."""
    return "".join("\\" + ch if ch in r".^$*+?()[]{}|\/" else ch for ch in text)


def _class_escape(ch: str) -> str:
    return "\\" + ch if ch in r"\]^-[" else ch


# ---------------------------------------------------------------------------- parsing
@dataclass(frozen=True)
class ContentPiece:
    text: str


@dataclass(frozen=True)
class CallStart:
    """Call ``index`` (0-based, in output order) begins: its function's name is known."""

    index: int
    name: str


@dataclass(frozen=True)
class ArgumentsPiece:
    """More of call ``index``'s arguments (JSON text; the pieces of one call concatenate to it)."""

    index: int
    text: str


Piece = ContentPiece | CallStart | ArgumentsPiece


@dataclass
class ParsedCall:
    name: str
    arguments: str = ""
    complete: bool = False  # its arguments and closing text were all generated


@dataclass
class ToolCallParser:
    """Splits a generated text into content and calls as it arrives (:meth:`feed`, then
    :meth:`finish`). Text the grammar would not have allowed (the parser does not rely on the
    grammar) is content from where it stops matching."""

    fmt: ToolCallFormat
    content: str = ""
    calls: list[ParsedCall] = field(default_factory=list)
    _buffer: str = ""
    _state: Literal["text", "text_only", "head", "arguments", "close", "between"] = "text"
    _depth: int = 0
    _in_string: bool = False
    _escaped: bool = False

    def feed(self, text: str) -> list[Piece]:
        """The pieces ``text`` completes (some of it may be held back until it is unambiguous)."""
        self._buffer += text
        pieces: list[Piece] = []
        while self._buffer:
            before = (self._state, len(self._buffer))
            getattr(self, f"_in_{self._state}")(pieces)
            if (self._state, len(self._buffer)) == before:
                break  # waiting for more text
        return pieces

    def finish(self) -> list[Piece]:
        """The pieces of whatever is still held back (the output ended)."""
        pieces: list[Piece] = []
        if self._state in ("text", "text_only"):
            self._emit_content(self._buffer, pieces)
        # "head", "close", "between": a call's framing, cut (max_tokens): neither content nor arguments
        # ("arguments" never holds text back)
        self._buffer = ""
        return pieces

    # -- states: each consumes a prefix of the buffer, or leaves it as it is to wait for more
    def _in_text(self, pieces: list[Piece]) -> None:
        trigger = self.fmt.trigger
        found = self._buffer.find(trigger)
        if found == 0 or (found > 0 and self.fmt.text_before_calls):
            self._emit_content(self._buffer[:found], pieces)
            self._buffer = self._buffer[found + len(trigger):]
            self._state = "head"
            return
        if not self.fmt.text_before_calls:
            if not trigger.startswith(self._buffer):
                self._state = "text_only"
            return
        keep = _partial_suffix(self._buffer, trigger)
        self._emit_content(self._buffer[:len(self._buffer) - keep], pieces)
        self._buffer = self._buffer[len(self._buffer) - keep:]

    def _in_text_only(self, pieces: list[Piece]) -> None:
        self._emit_content(self._buffer, pieces)
        self._buffer = ""

    def _in_head(self, pieces: list[Piece]) -> None:
        opening, key = self.fmt.open, self.fmt.arguments_key
        if not self._buffer.startswith(opening):
            if not opening.startswith(self._buffer):
                self._malformed(pieces)
            return
        rest = self._buffer[len(opening):]
        quote = rest.find('"')  # a name has no quote: the first one starts ``arguments_key``
        if quote < 0 or not rest[quote:].startswith(key):
            if "\n" in rest or (quote >= 0 and not key.startswith(rest[quote:])):
                self._malformed(pieces)
            return
        name = rest[:quote]
        self.calls.append(ParsedCall(name))
        pieces.append(CallStart(len(self.calls) - 1, name))
        self._buffer = rest[quote + len(key):]
        self._state, self._depth, self._in_string, self._escaped = "arguments", 0, False, False

    def _in_arguments(self, pieces: list[Piece]) -> None:
        for i, ch in enumerate(self._buffer):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self._arguments_text(self._buffer[:i + 1], pieces)
                    self._buffer = self._buffer[i + 1:]
                    self._state = "close"
                    return
        self._arguments_text(self._buffer, pieces)
        self._buffer = ""

    def _in_close(self, pieces: list[Piece]) -> None:
        close = self.fmt.close
        if self._buffer.startswith(close):
            self.calls[-1].complete = True
            self._buffer = self._buffer[len(close):]
            self._state = "between"
        elif not close.startswith(self._buffer):
            self._state = "text_only"

    def _in_between(self, pieces: list[Piece]) -> None:
        nxt = (self.fmt.separator or "") + self.fmt.trigger
        if self.fmt.separator is not None and self._buffer.startswith(nxt):
            self._buffer = self._buffer[len(nxt):]
            self._state = "head"
        elif self.fmt.separator is None or not nxt.startswith(self._buffer):
            self._state = "text_only"

    # -- helpers
    def _emit_content(self, text: str, pieces: list[Piece]) -> None:
        if text:
            self.content += text
            pieces.append(ContentPiece(text))

    def _arguments_text(self, text: str, pieces: list[Piece]) -> None:
        if text:
            self.calls[-1].arguments += text
            pieces.append(ArgumentsPiece(len(self.calls) - 1, text))

    def _malformed(self, pieces: list[Piece]) -> None:
        """What follows the trigger is no call: the trigger and the rest are content."""
        self._emit_content(self.fmt.trigger + self._buffer, pieces)
        self._buffer = ""
        self._state = "text_only"


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def parse_tool_calls(fmt: ToolCallFormat, text: str) -> ToolCallParser:
    """The whole ``text`` parsed (``.content``, ``.calls``)."""
    parser = ToolCallParser(fmt)
    parser.feed(text)
    parser.finish()
    return parser
