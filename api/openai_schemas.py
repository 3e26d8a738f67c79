"""The OpenAI Chat Completions request as ``POST /v1/chat/completions`` reads it: every field the
official ``openai`` client can send is declared here and is either honoured or refused with a 422
naming it. Nothing is ignored: a field this module does not know is refused too (``extra``), and so
is a known field set to a value Tailor cannot honour (audio...), with a message that says so.
``response_format`` ``json_object`` and ``json_schema`` (with ``strict``) constrain the output to
JSON (of the schema) with a grammar (``inference.structured``); a schema the grammar engine cannot
compile is a 422 with its reason. ``tools`` and ``tool_choice`` constrain the output to the model's
tool-call format (``inference.tool_calls``); the inference service refuses them (422) for a model
whose chat template does not support tools. All problems of one body come back in one 422
(cross-field rules are field validators that read the fields declared before them).

``HONOURED`` and ``REFUSED`` list the fields by policy (the README's table and the tests follow
them); a refused field is accepted only at its neutral value (absent, null, or the value that asks
for what Tailor does anyway, such as ``metadata: {}``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, JsonValue, StringConstraints, Tag, \
    ValidationInfo, field_validator, model_validator

from inference.service.protocol import MAX_TOOLS, ResponseFormat
from inference.structured import MAX_SCHEMA_CHARS
from inference.tool_calls import FUNCTION_NAME_PATTERN, json_object_text, parameters_problem

OPENAI_TYPES = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)  # "42" is not a number, "yes" no boolean
MAX_CONTENT_CHARS = 1_000_000
MAX_STOP = 16
# A length bound also makes pydantic check that the text is valid Unicode (a lone surrogate is not)
Text = Annotated[str, StringConstraints(max_length=MAX_CONTENT_CHARS)]
StopText = Annotated[str, StringConstraints(min_length=1, max_length=500)]
MAX_CHOICES = 8  # ``n``: choices of one completion


def _neutral_only(is_neutral: Callable[[Any], bool], why: str):
    """An ``AfterValidator`` that lets only a neutral value through and refuses anything else with
    ``why`` (the field's name is in the error's ``loc``)."""

    def check(value: Any) -> Any:
        if not is_neutral(value):
            raise ValueError(why)
        return value

    return AfterValidator(check)


def _absent(value: Any) -> bool:
    return value is None


def _absent_or_empty(value: Any) -> bool:
    return value is None or value == [] or value == {}


def refused(why: str, is_neutral: Callable[[Any], bool] = _absent) -> Any:
    """The type of a refused field: any JSON, refused with ``why`` unless neutral."""
    return Annotated[JsonValue, _neutral_only(is_neutral, why)]


# --- messages ---------------------------------------------------------------------------------------
class ContentPart(BaseModel):
    """One part of a message's content: only ``{"type": "text", "text": ...}`` is supported; a part
    of another type (``image_url``, ``input_audio``, ``file``, ``refusal``) is refused, naming it."""

    model_config = OPENAI_TYPES

    type: Annotated[str, _neutral_only(lambda v: v == "text", "only text content parts are supported")]
    text: Text | None = None
    image_url: refused("image parts are not supported (only text)") = None  # the other parts' payloads
    input_audio: refused("audio parts are not supported (only text)") = None
    file: refused("file parts are not supported (only text)") = None
    refusal: refused("refusal parts are not supported (only text)") = None

    @model_validator(mode="after")
    def _text_part(self) -> ContentPart:
        if self.text is None:
            raise ValueError('a text part is {"type": "text", "text": string}')
        return self


# a string, or a list of parts: one branch is validated (errors name ``content.text`` or ``content.parts.<i>``)
Content = Annotated[
    Annotated[Text, Tag("text")] | Annotated[list[ContentPart], Field(min_length=1, max_length=1000), Tag("parts")],
    Discriminator(lambda v: "text" if isinstance(v, str) else "parts"),
]
NO_NAMES = "message names are not supported: the model's chat template has no place for them"


def _supported_role(role: str) -> str:
    if role == "function":
        raise ValueError("function messages are deprecated and not supported: send the result as a tool message")
    return role


class CalledFunction(BaseModel):
    model_config = OPENAI_TYPES

    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    arguments: Annotated[Text, AfterValidator(json_object_text)]


class MessageToolCall(BaseModel):
    """A call an earlier assistant message made (as the completion returned it)."""

    model_config = OPENAI_TYPES

    id: str = Field(min_length=1, max_length=200)
    type: Literal["function"]
    function: CalledFunction


class Message(BaseModel):
    """A chat message. ``developer`` is a ``system`` message; an ``assistant`` message may carry
    the ``tool_calls`` it made (its content may then be null), and a ``tool`` message is the result
    of the call ``tool_call_id``. Names, audio, refusals and ``function`` messages are refused,
    naming the field."""

    model_config = OPENAI_TYPES

    role: Annotated[Literal["system", "developer", "user", "assistant", "tool", "function"],
                    AfterValidator(_supported_role)]
    content: Content | None = None
    name: refused(NO_NAMES) = None
    refusal: refused("a refusal on an earlier assistant message is not supported (send it as content)") = None
    audio: refused("audio is not supported (text only)") = None
    tool_calls: Annotated[list[MessageToolCall], Field(max_length=MAX_TOOLS)] | None = None
    function_call: refused("function_call on a message is deprecated and not supported: use tool_calls") = None
    tool_call_id: str | None = Field(None, min_length=1, max_length=200)

    @model_validator(mode="after")
    def _shape(self) -> Message:
        problems = []
        if self.tool_calls and self.role != "assistant":
            problems.append("only an assistant message has tool_calls")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            problems.append("content is required (only an assistant message with tool_calls may omit it)")
        if self.role == "tool" and self.tool_call_id is None:
            problems.append("a tool message needs the tool_call_id of the call it answers")
        if self.role != "tool" and self.tool_call_id is not None:
            problems.append("only a tool message has a tool_call_id")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def message_text(message: Message) -> str | None:
    """The message's text (text parts joined); None when it has none (an assistant's tool calls)."""
    content = message.content
    if content is None:
        return None
    return content if isinstance(content, str) else "".join(p.text or "" for p in content)


# --- the request ------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = OPENAI_TYPES

    include_usage: bool | None = None
    include_obfuscation: Annotated[bool | None, _neutral_only(lambda v: v is not True,
                                                              "stream obfuscation is not supported")] = None


class TextFormat(BaseModel):
    model_config = OPENAI_TYPES

    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    """The output is one JSON object."""

    model_config = OPENAI_TYPES

    type: Literal["json_object"]


def _schema_size(value: dict[str, JsonValue] | None) -> dict[str, JsonValue] | None:
    if value is not None and len(json.dumps(value, separators=(",", ":"), ensure_ascii=False)) > MAX_SCHEMA_CHARS:
        raise ValueError(f"the schema may be at most {MAX_SCHEMA_CHARS} characters of JSON")
    return value


class JsonSchema(BaseModel):
    """OpenAI's ``json_schema``: ``schema`` (absent: any JSON) and ``strict`` (every keyword
    enforced: a schema with a keyword the grammar engine cannot enforce is a 422; without it such
    keywords are ignored)."""

    model_config = ConfigDict(**OPENAI_TYPES, populate_by_name=False)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = Field(None, max_length=10_000)
    schema_: Annotated[dict[str, JsonValue], AfterValidator(_schema_size)] | None = Field(None, alias="schema")
    strict: bool | None = None


class JsonSchemaFormat(BaseModel):
    """The output is JSON valid against ``json_schema.schema``."""

    model_config = OPENAI_TYPES

    type: Literal["json_schema"]
    json_schema: JsonSchema


ResponseFormatField = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


def response_format_spec(value: TextFormat | JsonObjectFormat | JsonSchemaFormat | None) -> ResponseFormat | None:
    """The engine's ``ResponseFormat`` for a request's ``response_format`` (None: free text)."""
    if value is None or isinstance(value, TextFormat):
        return None
    if isinstance(value, JsonObjectFormat):
        return ResponseFormat(type="json_object")
    return ResponseFormat(type="json_schema", json_schema=value.json_schema.schema_,
                          strict=value.json_schema.strict is True)


def _object_schema(value: dict[str, JsonValue]) -> dict[str, JsonValue]:
    problem = parameters_problem(value)
    if problem:
        raise ValueError(problem)
    return value


class FunctionDefinition(BaseModel):
    """A function the model may call: ``parameters`` is the JSON schema of its arguments (absent:
    none); ``strict``: a schema keyword the grammar engine cannot enforce is a 422, not ignored."""

    model_config = OPENAI_TYPES

    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = Field(None, max_length=10_000)
    parameters: Annotated[dict[str, JsonValue], AfterValidator(_schema_size), AfterValidator(_object_schema)] | None \
        = None
    strict: bool | None = None


class FunctionTool(BaseModel):
    model_config = OPENAI_TYPES

    type: Annotated[str, _neutral_only(lambda v: v == "function", "only function tools are supported")]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = OPENAI_TYPES

    name: str = Field(pattern=FUNCTION_NAME_PATTERN)


class NamedToolChoice(BaseModel):
    """``{"type": "function", "function": {"name": ...}}``: exactly one call of that function."""

    model_config = OPENAI_TYPES

    type: Literal["function"]
    function: FunctionName


def _unique_names(value: list[FunctionTool] | None) -> list[FunctionTool] | None:
    names = [t.function.name for t in value or ()]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"function names must be unique; repeated: {', '.join(repeated)}")
    return value


def _token_id_keys(value: dict[str, float] | None) -> dict[str, float] | None:
    if value is not None:
        bad = [k for k in value if not k.isascii() or not k.isdigit() or len(k) > 9]
        if bad:
            raise ValueError(f"logit_bias keys must be token ids (decimal integers), got {bad[:5]}")
    return value


class ChatCompletionRequest(BaseModel):
    """The body of ``POST /v1/chat/completions`` (see the module docstring for the policy)."""

    model_config = OPENAI_TYPES

    # honoured ------------------------------------------------------------------------------------
    model: str = Field(min_length=1, max_length=200, description="`base` or the name of one of the tenant's ready "
                       "adapters (its newest ready version)")
    messages: list[Message] = Field(min_length=1, max_length=1000)
    stream: bool | None = None
    stream_options: StreamOptions | None = Field(None, description="`include_usage`: a last chunk with the usage "
                                                 "and no choices (only with `stream`)")
    max_tokens: int | None = Field(None, ge=1, description="deprecated alias of `max_completion_tokens`")
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="(extension, as vLLM) keep the k most likely tokens; 0 or -1: all")
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP)] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10, description="(extension, as vLLM) > 1 discourages "
                                             "tokens of the prompt and the output")
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100, le=100)]], Field(max_length=1024),
                          AfterValidator(_token_id_keys)] | None = Field(
        None, description="token id (as a string) -> bias in [-100, 100] added to its logit")
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    n: int | None = Field(None, ge=1, le=MAX_CHOICES, description="choices to generate (they share the prompt's "
                          "KV pages through the prefix cache; choice i samples with `seed + i`)")
    user: str | None = Field(None, max_length=255, description="the end user, logged with the completion's id")
    safety_identifier: str | None = Field(None, max_length=255, description="as `user`")
    service_tier: Annotated[str | None, _neutral_only(lambda v: v in (None, "auto", "default"),
                                                      "only the default service tier exists")] = None
    modalities: Annotated[list[str] | None, _neutral_only(lambda v: v in (None, ["text"]),
                                                          "only the text modality is supported")] = None
    store: Annotated[bool | None, _neutral_only(lambda v: v is not True, "completions are not stored")] = None
    response_format: ResponseFormatField | None = Field(
        None, description="`text`, `json_object` or `json_schema` (with `strict`): the output is constrained to JSON "
        "(of the schema) by a grammar")
    tools: Annotated[list[FunctionTool], Field(max_length=MAX_TOOLS), AfterValidator(_unique_names)] | None = Field(
        None, description="functions the model may call (the model's chat template must support tools); the calls "
        "come back as `tool_calls`, their arguments constrained to each function's schema")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, validate_default=True, description="`auto` (default with tools): text or calls; `required`: one or "
        "more calls; `none`: text only; a named function: one call of it")
    parallel_tool_calls: bool | None = Field(None, description="more than one call in a turn (default true; the "
                                             "model's format may allow only one)")
    # refused ---------------------------------------------------------------------------------------
    functions: refused("functions is deprecated and not supported: use tools", _absent_or_empty) = None
    function_call: refused("function_call is deprecated and not supported: use tool_choice",
                           lambda v: v in (None, "none")) = None
    audio: refused("audio output is not supported (text only)") = None
    prediction: refused("predicted outputs are not supported") = None
    metadata: refused("metadata is not supported: completions are not stored", _absent_or_empty) = None
    reasoning_effort: refused("reasoning_effort is not supported: the model does not reason") = None
    verbosity: refused("verbosity is not supported") = None
    web_search_options: refused("web search is not supported") = None
    moderation: refused("moderation is not supported") = None
    prompt_cache_key: refused("prompt_cache_key is not supported: the prefix cache is automatic (per tenant and "
                              "adapter)") = None
    prompt_cache_options: refused("prompt_cache_options is not supported: the prefix cache is automatic") = None
    prompt_cache_retention: refused("prompt_cache_retention is not supported: the prefix cache is automatic") = None

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and info.data.get("stream") is not True:
            raise ValueError("stream_options is only allowed with stream: true")
        return value

    @field_validator("max_completion_tokens")
    @classmethod
    def _same_as_max_tokens(cls, value: int | None, info: ValidationInfo) -> int | None:
        old = info.data.get("max_tokens")
        if value is not None and old is not None and old != value:
            raise ValueError(f"max_tokens ({old}) and max_completion_tokens ({value}) differ: send one "
                             "(max_tokens is the deprecated name)")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and "logprobs" in info.data and info.data["logprobs"] is not True:
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _choice_fits_tools(cls, value: str | NamedToolChoice | None, info: ValidationInfo) -> str | NamedToolChoice | None:
        if "tools" not in info.data:  # the tools were refused: that error says it
            return value
        names = [t.function.name for t in info.data["tools"] or ()]
        choice = value.function.name if isinstance(value, NamedToolChoice) else value
        if choice not in (None, "none", "auto") and not names:
            raise ValueError(f"tool_choice {choice!r} needs tools")
        if isinstance(value, NamedToolChoice) and choice not in names:
            raise ValueError(f"tool_choice names {choice!r}, which is not one of the tools ({', '.join(names)})")
        constrained = info.data.get("response_format")
        problems = []
        if names and choice != "none" and constrained is not None and not isinstance(constrained, TextFormat):
            problems.append("response_format json_object/json_schema cannot be combined with tools (unless "
                            "tool_choice is none): the tool-call format constrains the output")
        if names and choice != "none" and info.data.get("stop"):
            problems.append("stop cannot be combined with tools (unless tool_choice is none): a stop string could "
                            "cut a call short")
        if problems:
            raise ValueError("; ".join(problems))
        return value

    def tool_choice_name(self) -> str:
        """The engine's ``tool_choice``: auto, none, required or a function's name."""
        choice = self.tool_choice
        return choice.function.name if isinstance(choice, NamedToolChoice) else choice or "auto"

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def top_logprob_count(self) -> int | None:
        """None without ``logprobs``; else how many alternatives to report per token."""
        return (self.top_logprobs or 0) if self.logprobs else None


HONOURED = ("model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature",
            "top_p", "top_k", "seed", "stop", "presence_penalty", "frequency_penalty", "repetition_penalty",
            "logit_bias", "logprobs", "top_logprobs", "n", "user", "safety_identifier", "service_tier", "modalities",
            "store", "response_format", "tools", "tool_choice", "parallel_tool_calls")
REFUSED = tuple(name for name in ChatCompletionRequest.model_fields if name not in HONOURED)
