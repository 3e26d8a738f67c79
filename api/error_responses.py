"""The error answers of the routes, as documented in the OpenAPI schema (``responses=`` of the route
decorators): ``responses=errors(401, 404, ...)``.

Every error body is ``{"detail": ...}``: a message (401, 403, 404, 409, 413, 429, 503), or a list
of problems (422): pydantic's ``{"type", "loc", "msg"}`` entries for invalid fields, plain strings
for problems found after validation (a reply too long, every defect of an uploaded adapter).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class Problem(BaseModel):
    type: str
    loc: list[str | int]
    msg: str
    input: Any = None
    ctx: dict[str, Any] | None = None


class ErrorBody(BaseModel):
    detail: str | list[Problem | str]


DESCRIPTIONS = {
    401: "missing, unknown or revoked key (or operator token)",
    403: "the key's scope does not allow this route (an admin key is needed)",
    404: "no such object in the caller's tenant (another tenant's objects included)",
    409: "conflicts with the current state (a duplicate name, an adapter that is not ready)",
    413: "the request body is larger than the limit",
    422: "invalid input: every problem, each naming its field when it has one",
    429: "rate limit, the tenant's concurrent generations or the engine queue is full (see Retry-After)",
    503: "a backing service (database, object store or inference) is unavailable, or the request's first-token "
         "deadline (ttft_slo_s) cannot be met (see Retry-After)",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` metadata for these error statuses."""
    return {status: {"model": ErrorBody, "description": DESCRIPTIONS[status]} for status in statuses}
