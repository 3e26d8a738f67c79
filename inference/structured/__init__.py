"""Structured outputs: generation constrained to a JSON schema (or to any JSON object), or to a
grammar (the tool-call grammars of ``inference.tool_calls``).

``StructuredOutput`` (here, no dependency) is what a request asks for; it rides on
``SamplingParams.structured``. ``inference.structured.grammar`` compiles it with llguidance (imported
lazily, so the engine runs where the package is missing and only a constrained request is refused),
caches the compiled grammars, and gives each request a :class:`~inference.structured.grammar.GrammarMatcher`
whose token mask the batched sampler applies (``inference.sampling.apply_logit_adjustments``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

MAX_SCHEMA_CHARS = 64_000  # the schema as compact JSON text
MAX_GRAMMAR_CHARS = 1_000_000  # a Lark grammar (tool calls: every function's schema inlined)


@dataclass(frozen=True)
class StructuredOutput:
    """What the output must be: ``json_object`` (any JSON object), ``json_schema`` (an instance of
    ``schema``, held as JSON text so the value is hashable and is the grammar cache's key) or
    ``lark`` (a sentence of the llguidance Lark grammar ``schema``; tool calls use it).

    ``strict``: every keyword of the schema must be enforced; a keyword the grammar engine cannot
    enforce makes the schema a 422. Without it such keywords are ignored (the output is still JSON
    of the schema's shape, as far as the supported keywords go).
    """

    kind: Literal["json_object", "json_schema", "lark"]
    schema: str | None = None
    strict: bool = False
    origin: str = "response_format"  # the request field it comes from, named in its errors

    @classmethod
    def json_object(cls) -> StructuredOutput:
        return cls("json_object")

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool, strict: bool = False) -> StructuredOutput:
        """From a schema object (its key order is kept: it is the order properties are written in)."""
        return cls("json_schema", json.dumps(schema, separators=(",", ":"), ensure_ascii=False), bool(strict))

    @classmethod
    def lark(cls, grammar: str, origin: str) -> StructuredOutput:
        """From an llguidance Lark grammar (``origin``: the request field it was built from)."""
        return cls("lark", grammar, origin=origin)

    def problems(self) -> list[str]:
        """Structural problems (the grammar engine finds the rest when it compiles)."""
        if self.kind == "json_object":
            return [] if self.schema is None else ["a json_object format takes no schema"]
        if self.kind == "lark":
            if not isinstance(self.schema, str) or not self.schema:
                return ["a lark grammar is a non-empty text"]
            return [] if len(self.schema) <= MAX_GRAMMAR_CHARS else \
                [f"the grammar is {len(self.schema)} characters long; at most {MAX_GRAMMAR_CHARS} are allowed"]
        if self.kind != "json_schema":
            return [f"unknown structured output kind {self.kind!r}"]
        if not isinstance(self.schema, str):
            return ["a json_schema format needs a schema"]
        if len(self.schema) > MAX_SCHEMA_CHARS:
            return [f"the JSON schema is {len(self.schema)} characters long; at most {MAX_SCHEMA_CHARS} are allowed"]
        try:
            value = json.loads(self.schema)
        except ValueError as exc:
            return [f"the JSON schema is not JSON: {exc}"]
        if not isinstance(value, (dict, bool)):
            return ["a JSON schema is an object (or a boolean)"]
        return []

    def schema_object(self) -> dict[str, Any] | bool:
        """The JSON schema to compile (``{"type": "object"}`` for ``json_object``; not for ``lark``)."""
        return {"type": "object"} if self.kind == "json_object" else json.loads(self.schema or "null")
