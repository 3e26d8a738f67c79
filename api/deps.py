"""Dependencies: the app state, a database session, and the authenticated caller."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.state import AppState
from tenants import repositories as repo
from tenants.db import session_scope
from tenants.models import ID_LENGTH

AUTH_HEADERS = {"WWW-Authenticate": "Bearer"}


def get_state(request: Request) -> AppState:
    return request.app.state.tailor


StateDep = Annotated[AppState, Depends(get_state)]


def get_session(state: StateDep) -> Iterator[Session]:
    """A session per request: committed when the handler returns normally, else rolled back.
    For short routes only: generation routes open their own short sessions around the
    generation, never across it. ``SessionDep`` scopes it to the route function, so the commit
    happens before the answer is sent (FastAPI's default for ``yield`` dependencies ends them
    after the response: a client acting on a 2xx at once could miss the write, and a failing
    commit would follow a 2xx)."""
    session = state.platform.session_factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session, scope="function")]


@dataclass(frozen=True)
class Caller:
    """Who called: the key's tenant and scope, and that tenant's scheduling settings as stored
    when the key was looked up (read with the key in one query): its fair-share weight and its
    default first-token SLO (None: none)."""

    tenant_id: str
    scope: str
    key_id: str
    tenant_weight: float = 1.0
    tenant_ttft_slo_s: float | None = None


bearer_scheme = HTTPBearer(auto_error=False, description="an API key (tk_...) or, for POST /v1/tenants, the operator token")
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]


def _bearer(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or not credentials.credentials.strip():
        raise HTTPException(401, "missing bearer token (Authorization: Bearer <key>)", headers=AUTH_HEADERS)
    return credentials.credentials.strip()


def get_caller(request: Request, credentials: BearerDep, state: StateDep) -> Caller:
    """The tenant and scope of the presented API key; 401 when missing, unknown or revoked.

    The key is looked up in a session of its own, closed before the route runs: a chat route
    must hold no database connection while its tokens are generated (a flood of chats would
    otherwise take every pooled connection and stall the other tenants)."""
    token = _bearer(credentials)
    with session_scope(state.platform.session_factory) as session:
        key = repo.find_api_key(session, token, pepper=state.settings.api_key_pepper.get_secret_value())
    if key is None:
        raise HTTPException(401, "invalid or revoked API key", headers=AUTH_HEADERS)
    caller = Caller(key.tenant_id, key.scope, key.id, key.tenant.fair_share_weight, key.tenant.ttft_slo_s)
    request.state.tenant_id = key.tenant_id
    wait_s = state.rate_limiter.acquire(key.tenant_id)
    if wait_s is not None:
        request.state.reject_reason = "rate_limit"
        raise HTTPException(429, f"rate limit of {state.settings.rate_limit_per_minute} requests per minute reached",
                            headers={"Retry-After": str(wait_s)})
    return caller


def require_admin(caller: Annotated[Caller, Depends(get_caller)]) -> Caller:
    if caller.scope != "admin":
        raise HTTPException(403, "this route needs an admin key")
    return caller


def require_chat(caller: Annotated[Caller, Depends(get_caller)]) -> Caller:
    """Chat routes accept chat keys and admin keys."""
    return caller


def require_operator(credentials: BearerDep, state: StateDep) -> None:
    token = _bearer(credentials)
    if not repo.constant_time_equals(token, state.operator_token):
        raise HTTPException(401, "invalid operator token", headers=AUTH_HEADERS)


AdminDep = Annotated[Caller, Depends(require_admin)]
ChatDep = Annotated[Caller, Depends(require_chat)]

# the paging query parameters of the list endpoints
PageLimit = Annotated[int, Query(ge=1, le=1000)]
PageOffset = Annotated[int, Query(ge=0, le=10_000_000)]


def is_id(value: str) -> bool:
    """Ids are server-made 32-hex strings; anything else cannot name a row."""
    return len(value) == ID_LENGTH and all(c in "0123456789abcdef" for c in value)


def not_found(kind: str, object_id: str) -> HTTPException:
    return HTTPException(404, f"no {kind} {object_id!r}")
