"""Request and response bodies of the public API (separate Create / Public models per resource)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from api.openai_schemas import ResponseFormatField
from tenants.settings import MAX_TTFT_SLO_S

Scope = Literal["admin", "chat"]
# tenants.models.AdapterStatus's values, spelled out so the OpenAPI schema stays an inline enum
# (tests/api/test_platform_api.py keeps the two equal)
AdapterStatusName = Literal["pending", "ready", "failed", "deleted"]
ID_PATTERN = r"^[0-9a-f]{32}$"


class StrictBody(BaseModel):
    """A request body: unknown fields, wrong JSON types (``"42"`` for a number, ``"yes"`` for a
    boolean) and non-finite numbers are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# --- tenants and keys -----------------------------------------------------------------------------
MAX_FAIR_SHARE_WEIGHT = 1000.0
TTFT_SLO_DESCRIPTION = ("first-token deadline in seconds: a request still queued when its first token can no longer "
                        "arrive in time is refused with 503 and Retry-After instead of being served late")


def _weight(default=...):
    """A fair-share weight: finite, > 0, at most ``MAX_FAIR_SHARE_WEIGHT``."""
    return Field(default, gt=0, le=MAX_FAIR_SHARE_WEIGHT,
                 description="the tenant's weight in the engine's fair scheduler (1: an equal share; 2: twice the "
                             "tokens of a weight-1 tenant while both are backlogged)")


def _slo(description: str = TTFT_SLO_DESCRIPTION):
    """An optional first-token SLO: finite seconds, > 0, at most ``MAX_TTFT_SLO_S``."""
    return Field(None, gt=0, le=MAX_TTFT_SLO_S, description=description)


class TenantCreate(StrictBody):
    """A new tenant (operator only), optionally with its fair-share weight and default SLO."""

    name: str = Field(min_length=1, max_length=200, pattern=r"^\S(.*\S)?$")
    system_prompt: str | None = Field(None, max_length=8000)
    fair_share_weight: float = _weight(1.0)
    ttft_slo_s: float | None = _slo(f"the default {TTFT_SLO_DESCRIPTION} (null: TAILOR_TTFT_SLO_S applies)")


class TenantUpdate(StrictBody):
    """What a tenant's admin may change. The fair-share weight is not among it (the operator sets
    it): sending it is refused like every unknown field. An SLO only makes the tenant's own
    requests stricter."""

    system_prompt: str | None = Field(None, max_length=8000)
    ttft_slo_s: float | None = _slo(f"the default {TTFT_SLO_DESCRIPTION} (null: TAILOR_TTFT_SLO_S applies)")


class TenantOperatorUpdate(StrictBody):
    """What the operator may change on any tenant; omitted fields stay as they are."""

    fair_share_weight: float = _weight(None)  # omitted: unchanged; null is refused (a weight is always set)
    ttft_slo_s: float | None = _slo(f"the default {TTFT_SLO_DESCRIPTION} (null: TAILOR_TTFT_SLO_S applies)")


class TenantPublic(BaseModel):
    id: str
    name: str
    system_prompt: str | None
    fair_share_weight: float
    ttft_slo_s: float | None
    created_at: datetime


class ApiKeyCreate(StrictBody):
    scope: Scope


class ApiKeyPublic(BaseModel):
    id: str
    scope: Scope
    prefix: str
    created_at: datetime
    revoked_at: datetime | None = None


class ApiKeyCreated(ApiKeyPublic):
    api_key: str = Field(description="the secret key, shown this once only")


class TenantCreated(TenantPublic):
    api_key: str = Field(description="the tenant's first admin key, shown this once only")
    api_key_id: str


# --- users ------------------------------------------------------------------------------------------
class UserCreate(StrictBody):
    external_id: str = Field(min_length=1, max_length=255)


class UserPublic(BaseModel):
    id: str
    external_id: str
    current_adapter_id: str | None
    created_at: datetime


class AdapterAssignment(StrictBody):
    adapter_id: str | None = Field(description="a ready adapter of this tenant, or null for the base model", max_length=64)


# --- adapters ---------------------------------------------------------------------------------------
class AdapterPublic(BaseModel):
    id: str
    name: str
    version: int
    status: AdapterStatusName
    failure_reason: str | None
    user_id: str | None
    rank: int | None
    target_modules: list[str]
    size_bytes: int | None
    sha256: str | None
    created_at: datetime
    provenance: dict | None = Field(None, description="for a version made by a training job: the job's id, its "
                                    "example count and losses (null for an upload)")


class AdapterList(BaseModel):
    data: list[AdapterPublic]
    limit: int
    offset: int


# --- chat -------------------------------------------------------------------------------------------
class ChatRequest(StrictBody):
    message: str = Field(min_length=1, max_length=32_000)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    ttft_slo_s: float | None = _slo(f"this request's {TTFT_SLO_DESCRIPTION} (default: the tenant's, else "
                                    "TAILOR_TTFT_SLO_S)")
    response_format: ResponseFormatField | None = Field(
        None, description="as OpenAI's: `text`, `json_object` or `json_schema` (with `strict`): the answer is "
        "constrained to JSON (of the schema)")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class MessagePublic(BaseModel):
    id: str
    role: Literal["user", "assistant", "system"]
    content: str
    created_at: datetime
    adapter_id: str | None = Field(None, description="for an answer: the adapter version that wrote it (null: the "
                                   "base model)")


class ChatResponse(BaseModel):
    id: str = Field(description="the id of the stored assistant message")
    conversation_id: str
    message: MessagePublic
    adapter_id: str | None = Field(description="the personal adapter that answered (null: the base model)")
    adapter_version: int | None = Field(None, description="that adapter's version number (each version has its own "
                                        "id): every answer comes from exactly one version")
    finish_reason: str
    history_messages_used: int
    usage: Usage


class MessagePage(BaseModel):
    data: list[MessagePublic]
    next_before: str | None = Field(description="pass as `before` to get the previous page; null at the start")
