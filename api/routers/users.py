"""End users of the caller's tenant (admin scope) and their personal adapter."""

from __future__ import annotations

from fastapi import APIRouter, BackgroundTasks, HTTPException, Query
from sqlalchemy.exc import IntegrityError

from api.deps import AdminDep, PageLimit, PageOffset, SessionDep, StateDep, is_id, not_found
from api.error_responses import errors
from api.prefetch import prefetch_quietly
from api.schemas import AdapterAssignment, UserCreate, UserPublic
from tenants import repositories as repo
from tenants.models import AdapterStatus, User
from tenants.platform import adapter_spec

router = APIRouter(tags=["users"])


def user_public(user: User) -> UserPublic:
    return UserPublic(id=user.id, external_id=user.external_id, current_adapter_id=user.current_adapter_id,
                      created_at=user.created_at)


def load_user(session, tenant_id: str, user_id: str) -> User:
    """The tenant's user or 404 (another tenant's user is as absent as a made-up id)."""
    user = repo.get_user(session, tenant_id, user_id) if is_id(user_id) else None
    if user is None:
        raise not_found("user", user_id)
    return user


@router.post("/v1/users", status_code=201, response_model=UserPublic, responses=errors(401, 403, 409, 413, 429, 503))
def create_user(body: UserCreate, caller: AdminDep, session: SessionDep) -> UserPublic:
    """Register an end user under the tenant's own ``external_id`` (unique per tenant)."""
    try:
        with session.begin_nested():
            user = repo.create_user(session, caller.tenant_id, body.external_id)
    except IntegrityError:
        raise HTTPException(409, f"a user with external_id {body.external_id!r} already exists") from None
    return user_public(user)


@router.get("/v1/users", response_model=list[UserPublic], responses=errors(401, 403, 429, 503))
def list_users(
    caller: AdminDep,
    session: SessionDep,
    external_id: str | None = Query(None, max_length=255),
    limit: PageLimit = 100,
    offset: PageOffset = 0,
) -> list[UserPublic]:
    users = repo.list_users(session, caller.tenant_id, external_id=external_id, limit=limit, offset=offset)
    return [user_public(u) for u in users]


@router.get("/v1/users/{user_id}", response_model=UserPublic, responses=errors(401, 403, 404, 429, 503))
def get_user(user_id: str, caller: AdminDep, session: SessionDep) -> UserPublic:
    return user_public(load_user(session, caller.tenant_id, user_id))


@router.put("/v1/users/{user_id}/adapter", response_model=UserPublic, responses=errors(401, 403, 404, 409, 413, 429, 503))
def assign_adapter(
    user_id: str, body: AdapterAssignment, caller: AdminDep, session: SessionDep, state: StateDep, background: BackgroundTasks
) -> UserPublic:
    """Make a ready adapter of this tenant the user's personal adapter (null: the base model).
    Inference is asked to prefetch it so the user's next chat finds it warm."""
    user = load_user(session, caller.tenant_id, user_id)
    if body.adapter_id is not None:
        adapter = repo.get_adapter(session, caller.tenant_id, body.adapter_id) if is_id(body.adapter_id) else None
        if adapter is None or adapter.status == AdapterStatus.DELETED:
            raise not_found("adapter", body.adapter_id)
        if adapter.status != AdapterStatus.READY:
            raise HTTPException(409, f"adapter {adapter.id} is {adapter.status}, not ready")
        background.add_task(prefetch_quietly, state.inference, adapter_spec(adapter))
    return user_public(repo.set_current_adapter(session, caller.tenant_id, user.id, body.adapter_id))
