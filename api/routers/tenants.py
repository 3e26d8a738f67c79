"""Tenants: created by the operator; each tenant's admin reads and configures its own."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request
from sqlalchemy.exc import IntegrityError

from api.deps import AdminDep, SessionDep, StateDep, require_operator
from api.error_responses import errors
from api.schemas import TenantCreate, TenantCreated, TenantPublic, TenantUpdate
from tenants import repositories as repo

router = APIRouter(tags=["tenants"])


def _public(tenant) -> TenantPublic:
    return TenantPublic(id=tenant.id, name=tenant.name, system_prompt=tenant.system_prompt, created_at=tenant.created_at)


@router.post("/v1/tenants", status_code=201, response_model=TenantCreated, dependencies=[Depends(require_operator)],
              responses=errors(401, 409, 413, 503))
def create_tenant(body: TenantCreate, session: SessionDep, state: StateDep, request: Request) -> TenantCreated:
    """Create a tenant and its first admin key (operator token required). The key is shown once.
    Its name goes into ``tailor_tenant_info`` at once (the dashboards show names)."""
    try:
        with session.begin_nested():
            tenant = repo.create_tenant(session, body.name, body.system_prompt)
    except IntegrityError:
        raise HTTPException(409, f"a tenant named {body.name!r} already exists") from None
    key, secret = repo.create_api_key(session, tenant.id, "admin", pepper=state.settings.api_key_pepper.get_secret_value())
    request.app.state.metrics.tenant_names.set(tenant.id, tenant.name)
    return TenantCreated(**_public(tenant).model_dump(), api_key=secret, api_key_id=key.id)


@router.get("/v1/tenant", response_model=TenantPublic, responses=errors(401, 403, 429, 503))
def get_own_tenant(caller: AdminDep, session: SessionDep) -> TenantPublic:
    """The caller's tenant."""
    return _public(repo.get_tenant(session, caller.tenant_id))


@router.patch("/v1/tenant", response_model=TenantPublic, responses=errors(401, 403, 413, 429, 503))
def update_own_tenant(body: TenantUpdate, caller: AdminDep, session: SessionDep) -> TenantPublic:
    """Set the system prompt that opens every chat of this tenant's users (null removes it)."""
    if "system_prompt" in body.model_fields_set:
        return _public(repo.set_system_prompt(session, caller.tenant_id, body.system_prompt))
    return _public(repo.get_tenant(session, caller.tenant_id))
