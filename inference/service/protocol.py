"""What the api sends the inference service and what comes back (shared by both sides).

A generation streams typed events (``inference.service.events``: started, text delta, ended,
failed); over HTTP each is one JSON object per line (``application/x-ndjson``):

* ``{"event": "start", "request_id", "prompt_tokens", "messages_used"}`` once, first (with
  ``"tool_call_format"`` when the output may hold tool calls: ``inference.tool_calls.FORMATS``);
* ``{"event": "delta", "text", "tokens"}`` for every step that produced text (``tokens``: how many
  token ids this delta carries); with ``logprobs`` requested, for every step that produced tokens,
  with ``"logprobs": [{"token", "bytes", "logprob", "top": [{"token", "bytes", "logprob"}]}]``,
  one entry per new token;
* ``{"event": "end", "finish_reason", "prompt_tokens", "completion_tokens", "text"}`` once, last
  (``finish_reason``: ``stop``, ``length`` or ``abort``); or
* ``{"event": "error", "message"}`` last, when the request failed inside the engine.

Problems found before anything is scheduled are raised as :class:`InferenceError` (HTTP status
422, 429 or 503 on the wire) instead of being streamed. So is the early abort of a request with a
first-token deadline (``ttft_slo_s``): the service answers only once the first token (or the
refusal) is there, the refusal as 503 with ``Retry-After`` and ``{"detail": [...], "reason":
"deadline"}``.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue, field_validator, model_validator

from inference.structured import StructuredOutput
from inference.tool_calls import FUNCTION_NAME_PATTERN, FunctionSpec, json_object_text, parameters_problem

SECRET_HEADER = "X-Tailor-Inference-Secret"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
MAX_TEXT_CHARS = 4_000_000
MAX_TOOLS = 128  # functions offered in one request, and calls in one assistant turn


class AdapterSpec(BaseModel):
    """An adapter the platform stored and validated: the engine registers it on first use.

    ``id`` is the platform's adapter id (one id per uploaded version, so its weights never change);
    the keys point into the shared object store; ``sha256`` is that of the safetensors file.
    """

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=200)
    config_key: str = Field(min_length=1, max_length=1024)
    weights_key: str = Field(min_length=1, max_length=1024)
    sha256: str = Field(pattern=SHA256_PATTERN)


class ToolCallTurn(BaseModel):
    """A call an earlier assistant turn made: ``arguments`` is the JSON text of an object."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=200)
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    arguments: Annotated[str, Field(max_length=MAX_TEXT_CHARS), AfterValidator(json_object_text)]


class ChatTurn(BaseModel):
    """A message: ``content`` (None only on an assistant turn that made ``tool_calls``); a ``tool``
    message is the result of the call ``tool_call_id``."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = Field(max_length=MAX_TEXT_CHARS)  # a bound also makes pydantic refuse lone surrogates
    tool_calls: list[ToolCallTurn] | None = Field(None, min_length=1, max_length=MAX_TOOLS)
    tool_call_id: str | None = Field(None, min_length=1, max_length=200)

    @model_validator(mode="after")
    def _consistent(self) -> ChatTurn:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only an assistant message has tool_calls")
        if self.content is None and self.tool_calls is None:
            raise ValueError("content is missing (only an assistant message with tool_calls may omit it)")
        if (self.tool_call_id is not None) != (self.role == "tool"):
            raise ValueError("a tool message, and only a tool message, has a tool_call_id")
        return self

    def template_message(self) -> dict[str, Any]:
        """The message as chat templates read it (a call's arguments as an object)."""
        message: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls is not None:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": json.loads(c.arguments)}}
                                     for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class ToolSpec(BaseModel):
    """A function the model may call (OpenAI's ``function`` object): ``parameters`` is the JSON
    schema of its arguments (None: none); ``strict``: every schema keyword is enforced."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    parameters: dict[str, JsonValue] | None = None
    strict: bool = False

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, value: dict[str, JsonValue] | None) -> dict[str, JsonValue] | None:
        problem = parameters_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    def function(self) -> FunctionSpec:
        return FunctionSpec(self.name, self.parameters, self.strict, self.description)


class ResponseFormat(BaseModel):
    """A structured output: ``json_object`` (any JSON object) or ``json_schema`` (an instance of
    ``json_schema``; ``strict``: a keyword the grammar engine cannot enforce is refused, not
    ignored). See ``inference.structured``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["json_object", "json_schema"]
    json_schema: dict[str, JsonValue] | bool | None = None
    strict: bool = False

    def structured(self) -> StructuredOutput:
        if self.type == "json_object":
            return StructuredOutput.json_object()
        return StructuredOutput.json_schema(True if self.json_schema is None else self.json_schema, self.strict)


class GenerateRequest(BaseModel):
    """A chat generation. ``messages`` are oldest first and end with the user's new message.

    The service renders ``system_prompt`` + ``messages`` with the model's chat template, dropping
    the oldest messages until the prompt fits ``history_token_budget`` tokens (and the context
    window with ``max_tokens`` room); the last message is never dropped. With
    ``history_trim_step_tokens`` (S) the oldest kept message may only be at stable anchors about S
    tokens apart, so the window jumps by about S tokens at a time and most turns' prompts extend the
    previous turn's exactly, for the prefix cache (``inference.service.chat_prompt``); ``None``
    drops exactly as many as needed.

    ``tenant`` and ``tenant_weight`` set the request's fair share in the engine's scheduler: it
    orders admission by each tenant's virtual token counter, charged in weighted tokens divided by
    ``tenant_weight`` (docs/design.md "Scheduling"); ``None`` is one tenant of its own.

    ``ttft_slo_s`` (seconds, or None) is the request's first-token deadline: while it is still
    queued and the deadline can no longer be met, the engine refuses it (early abort), and the
    service answers 503 with ``Retry-After`` before any event (``InferenceError.deadline``).

    Sampling: ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``, the penalties
    (``presence_penalty``, ``frequency_penalty``, ``repetition_penalty``) and ``logit_bias``
    (token id -> bias) as ``inference.sampling.SamplingParams`` defines them; ``logprobs``: None,
    or the number of top alternatives (0-20) to report with each generated token's logprob.
    ``response_format``: the output must be JSON (of a schema), see :class:`ResponseFormat`.

    Tools: ``tools`` are rendered with the chat template (which must support them) and the output
    is constrained to the template's tool-call format (``inference.tool_calls``); ``tool_choice``
    is ``auto`` (text or calls), ``required`` (calls only), ``none`` (text only) or the name of
    one of the tools (one call of it); ``parallel_tool_calls``: more than one call may be made.
    The start event names the format (``tool_call_format``) when calls may come, for the caller
    to parse them out of the text.
    """

    model_config = ConfigDict(extra="forbid")

    request_id: str | None = Field(None, max_length=200)
    messages: list[ChatTurn] = Field(min_length=1)
    system_prompt: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    history_token_budget: int | None = Field(None, ge=1)
    history_trim_step_tokens: int | None = Field(None, ge=1, strict=True)
    adapter: AdapterSpec | None = None
    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: list[str] = Field(default_factory=list, max_length=16)
    presence_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    repetition_penalty: float = Field(1.0, gt=0, le=10, allow_inf_nan=False)
    logit_bias: dict[int, float] = Field(default_factory=dict, max_length=1024)
    logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[ToolSpec] | None = Field(None, min_length=1, max_length=MAX_TOOLS)
    tool_choice: str = Field("auto", min_length=1, max_length=64)
    parallel_tool_calls: bool = True
    tenant: str | None = Field(None, min_length=1, max_length=200, strict=True)
    tenant_weight: float = Field(1.0, gt=0, allow_inf_nan=False, strict=True)
    ttft_slo_s: float | None = Field(None, gt=0, allow_inf_nan=False, strict=True)

    @model_validator(mode="after")
    def _tools_consistent(self) -> GenerateRequest:
        names = [t.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            raise ValueError("tools: function names must be unique")
        if self.tool_choice not in ("auto", "none") and self.tool_choice != "required" and self.tool_choice not in names:
            raise ValueError(f"tool_choice {self.tool_choice!r} is not auto, none, required or one of the tools")
        if self.tool_choice == "required" and not names:
            raise ValueError("tool_choice required needs tools")
        if names and self.tool_choice != "none" and self.response_format is not None:
            raise ValueError("response_format cannot be combined with tools (unless tool_choice is none)")
        if names and self.tool_choice != "none" and self.stop:
            raise ValueError("stop cannot be combined with tools (unless tool_choice is none): a stop string could cut "
                             "a call short")
        return self


class PrefetchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter: AdapterSpec


DEADLINE_REASON = "deadline"


class InferenceError(Exception):
    """A generation refused before it started: ``status`` is the HTTP status the api answers
    with (422 bad request, 429 overloaded, 503 unavailable); ``retry_after`` in seconds.
    ``reason`` tells refusals of one status apart where callers care: ``"deadline"`` for a request
    whose first-token deadline could not be met (503), else None."""

    def __init__(self, status: int, problems: list[str] | str, retry_after: int | None = None,
                 reason: str | None = None):
        self.status = status
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.retry_after = retry_after
        self.reason = reason
        super().__init__("; ".join(self.problems))

    @classmethod
    def invalid(cls, problems: list[str] | str) -> InferenceError:
        return cls(422, problems)

    @classmethod
    def overloaded(cls, message: str, retry_after: int = 1) -> InferenceError:
        return cls(429, message, retry_after)

    @classmethod
    def unavailable(cls, message: str, retry_after: int = 5) -> InferenceError:
        return cls(503, message, retry_after)

    @classmethod
    def deadline(cls, problems: list[str] | str, retry_after: int) -> InferenceError:
        """The engine refused the queued request: its first token could no longer arrive before
        its deadline (``FinishReason.DEADLINE``); ``retry_after``: whole seconds, at least 1."""
        return cls(503, problems, max(1, retry_after), DEADLINE_REASON)

    @property
    def is_deadline(self) -> bool:
        return self.reason == DEADLINE_REASON
