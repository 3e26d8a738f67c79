"""Tenants: created and weighted by the operator; each tenant's admin reads and configures its own."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request
from sqlalchemy.exc import IntegrityError

from api.deps import AdminDep, SessionDep, StateDep, is_id, not_found, require_operator
from api.error_responses import errors
from api.schemas import TenantCreate, TenantCreated, TenantOperatorUpdate, TenantPublic, TenantUpdate
from tenants import repositories as repo

router = APIRouter(tags=["tenants"])


def _public(tenant) -> TenantPublic:
    return TenantPublic(id=tenant.id, name=tenant.name, system_prompt=tenant.system_prompt,
                        fair_share_weight=tenant.fair_share_weight, ttft_slo_s=tenant.ttft_slo_s,
                        created_at=tenant.created_at)


@router.post("/v1/tenants", status_code=201, response_model=TenantCreated, dependencies=[Depends(require_operator)],
              responses=errors(401, 409, 413, 503))
def create_tenant(body: TenantCreate, session: SessionDep, state: StateDep, request: Request) -> TenantCreated:
    """Create a tenant and its first admin key (operator token required), optionally with its
    fair-share weight and default first-token SLO. The key is shown once. Its name goes into ``tailor_tenant_info`` at once (the dashboards show names)."""
    try:
        with session.begin_nested():
            tenant = repo.create_tenant(session, body.name, body.system_prompt,
                                        fair_share_weight=body.fair_share_weight, ttft_slo_s=body.ttft_slo_s)
    except IntegrityError:
        raise HTTPException(409, f"a tenant named {body.name!r} already exists") from None
    key, secret = repo.create_api_key(session, tenant.id, "admin", pepper=state.settings.api_key_pepper.get_secret_value())
    request.app.state.metrics.tenant_names.set(tenant.id, tenant.name)
    return TenantCreated(**_public(tenant).model_dump(), api_key=secret, api_key_id=key.id)


@router.patch("/v1/tenants/{tenant_id}", response_model=TenantPublic, dependencies=[Depends(require_operator)],
               responses=errors(401, 404, 413, 503))
def update_tenant_as_operator(tenant_id: str, body: TenantOperatorUpdate, session: SessionDep) -> TenantPublic:
    """Set a tenant's fair-share weight and default first-token SLO (operator token required;
    omitted fields stay as they are). The weight applies from the tenant's next request on."""
    if not is_id(tenant_id) or repo.get_tenant(session, tenant_id) is None:
        raise not_found("tenant", tenant_id)
    changes = {name: getattr(body, name) for name in body.model_fields_set}
    return _public(repo.update_tenant(session, tenant_id, **changes))


@router.get("/v1/tenant", response_model=TenantPublic, responses=errors(401, 403, 429, 503))
def get_own_tenant(caller: AdminDep, session: SessionDep) -> TenantPublic:
    """The caller's tenant."""
    return _public(repo.get_tenant(session, caller.tenant_id))


@router.patch("/v1/tenant", response_model=TenantPublic, responses=errors(401, 403, 413, 429, 503))
def update_own_tenant(body: TenantUpdate, caller: AdminDep, session: SessionDep) -> TenantPublic:
    """Set the system prompt that opens every chat of this tenant's users and the tenant's default
    first-token SLO (null removes either; omitted fields stay as they are). The fair-share weight
    is the operator's to set: sending it is a 422."""
    changes = {name: getattr(body, name) for name in body.model_fields_set}
    if changes:
        return _public(repo.update_tenant(session, caller.tenant_id, **changes))
    return _public(repo.get_tenant(session, caller.tenant_id))
