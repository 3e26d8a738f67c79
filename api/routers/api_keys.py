"""API keys of the caller's tenant (admin scope): create (the secret is shown once), list, revoke."""

from __future__ import annotations

from fastapi import APIRouter, Response

from api.deps import AdminDep, SessionDep, StateDep, is_id, not_found
from api.error_responses import errors
from api.schemas import ApiKeyCreate, ApiKeyCreated, ApiKeyPublic
from tenants import repositories as repo

router = APIRouter(tags=["api-keys"])


def _public(key) -> ApiKeyPublic:
    return ApiKeyPublic(id=key.id, scope=key.scope, prefix=key.prefix, created_at=key.created_at, revoked_at=key.revoked_at)


@router.post("/v1/api-keys", status_code=201, response_model=ApiKeyCreated, responses=errors(401, 403, 413, 429, 503))
def create_api_key(body: ApiKeyCreate, caller: AdminDep, session: SessionDep, state: StateDep) -> ApiKeyCreated:
    key, secret = repo.create_api_key(session, caller.tenant_id, body.scope, pepper=state.settings.api_key_pepper.get_secret_value())
    return ApiKeyCreated(**_public(key).model_dump(), api_key=secret)


@router.get("/v1/api-keys", response_model=list[ApiKeyPublic], responses=errors(401, 403, 429, 503))
def list_api_keys(caller: AdminDep, session: SessionDep) -> list[ApiKeyPublic]:
    """The tenant's live keys (never their secrets)."""
    return [_public(k) for k in repo.list_api_keys(session, caller.tenant_id)]


@router.delete("/v1/api-keys/{key_id}", status_code=204, responses=errors(401, 403, 404, 429, 503))
def revoke_api_key(key_id: str, caller: AdminDep, session: SessionDep) -> Response:
    """Revoke a key at once; requests presenting it answer 401 from now on."""
    if not is_id(key_id) or not repo.revoke_api_key(session, caller.tenant_id, key_id):
        raise not_found("API key", key_id)
    return Response(status_code=204)
