"""Small data-access functions. Every query on tenant-owned data filters by ``tenant_id``.

Functions take an open ``Session`` and do not commit (the caller's ``session_scope`` does); they
flush where the caller needs the new row's id or a constraint error at once.

API keys look like ``tk_<prefix>_<secret>``. Only the prefix (to find the row) and an HMAC-SHA256
of the whole key under a server pepper (``TAILOR_API_KEY_PEPPER``) are stored; the key itself is
returned once by ``create_api_key`` and cannot be recovered.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session, joinedload

from tenants.models import Adapter, AdapterStatus, ApiKey, Conversation, Message, Tenant, User, new_id, utcnow

API_KEY_PEPPER_ENV = "TAILOR_API_KEY_PEPPER"
_DEV_PEPPER = "tailor-dev-pepper-change-me"
API_KEY_MARKER = "tk"


class NotFound(LookupError):
    """A referenced row does not exist in this tenant."""


# --- API key secrets ---------------------------------------------------------------------------


def _pepper(pepper: str | bytes | None) -> bytes:
    value = pepper if pepper is not None else os.environ.get(API_KEY_PEPPER_ENV, _DEV_PEPPER)
    return value.encode() if isinstance(value, str) else value


def hash_api_key(secret: str, pepper: str | bytes | None = None) -> str:
    """Hex HMAC-SHA256 of a presented key under the server pepper."""
    return hmac.new(_pepper(pepper), secret.encode(), hashlib.sha256).hexdigest()


def constant_time_equals(a: str | bytes, b: str | bytes) -> bool:
    """Compare two secrets or digests without leaking where they differ."""
    a = a.encode() if isinstance(a, str) else a
    b = b.encode() if isinstance(b, str) else b
    return hmac.compare_digest(a, b)


def split_api_key(presented: str) -> tuple[str, str] | None:
    """``tk_<prefix>_<secret>`` -> (prefix, secret); None when the shape is wrong."""
    parts = presented.split("_", 2)
    if len(parts) != 3 or parts[0] != API_KEY_MARKER or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


# --- tenants and keys ---------------------------------------------------------------------------


def create_tenant(session: Session, name: str, system_prompt: str | None = None, *, fair_share_weight: float = 1.0,
                  ttft_slo_s: float | None = None) -> Tenant:
    """A new tenant; ``IntegrityError`` on flush when the name is taken."""
    tenant = Tenant(name=name, system_prompt=system_prompt, fair_share_weight=fair_share_weight, ttft_slo_s=ttft_slo_s)
    session.add(tenant)
    session.flush()
    return tenant


def get_tenant(session: Session, tenant_id: str) -> Tenant | None:
    return session.get(Tenant, tenant_id)


def set_system_prompt(session: Session, tenant_id: str, system_prompt: str | None) -> Tenant:
    """Set (None: remove) the prompt that opens every chat of the tenant's users."""
    return update_tenant(session, tenant_id, system_prompt=system_prompt)


TENANT_SETTINGS = frozenset({"system_prompt", "fair_share_weight", "ttft_slo_s"})


def update_tenant(session: Session, tenant_id: str, **changes) -> Tenant:
    """Set some of a tenant's settings (``TENANT_SETTINGS``: ``system_prompt``, ``fair_share_weight``,
    ``ttft_slo_s``); the values are checked by the caller and by the table's CHECK constraints.
    Which caller may change which setting is the route's business: the fair-share weight is the
    operator's alone."""
    unknown = set(changes) - TENANT_SETTINGS
    if unknown:
        raise ValueError(f"not tenant settings: {sorted(unknown)}")
    tenant = get_tenant(session, tenant_id)
    if tenant is None:
        raise NotFound(f"no tenant {tenant_id!r}")
    for name, value in changes.items():
        setattr(tenant, name, value)
    session.flush()
    return tenant


def tenant_names(session: Session) -> dict[str, str]:
    """Every tenant's id and name (an operator-level read across tenants, for metrics labels)."""
    return dict(session.execute(select(Tenant.id, Tenant.name)).tuples().all())


def ping(session: Session) -> None:
    """One round trip to the database (raises when it does not answer)."""
    session.execute(text("SELECT 1"))


def create_api_key(
    session: Session, tenant_id: str, scope: str, *, pepper: str | bytes | None = None
) -> tuple[ApiKey, str]:
    """A new key for the tenant: the row and the full key, which is shown this once only."""
    prefix = secrets.token_hex(6)
    presented = f"{API_KEY_MARKER}_{prefix}_{secrets.token_urlsafe(32)}"
    key = ApiKey(tenant_id=tenant_id, prefix=prefix, key_hash=hash_api_key(presented, pepper), scope=scope)
    session.add(key)
    session.flush()
    return key, presented


def find_api_key(session: Session, presented: str, *, pepper: str | bytes | None = None) -> ApiKey | None:
    """The live (not revoked) key matching a presented key, else None. Its ``tenant`` comes in the
    same query (a join), so the caller's fair-share weight and default SLO cost no round trip."""
    parts = split_api_key(presented)
    if parts is None:
        return None
    key = session.scalar(select(ApiKey).options(joinedload(ApiKey.tenant)).where(ApiKey.prefix == parts[0]))
    if key is None or not constant_time_equals(key.key_hash, hash_api_key(presented, pepper)):
        return None
    return None if key.revoked_at is not None else key


def list_api_keys(session: Session, tenant_id: str, *, include_revoked: bool = False) -> Sequence[ApiKey]:
    query = select(ApiKey).where(ApiKey.tenant_id == tenant_id)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    return session.scalars(query.order_by(ApiKey.created_at, ApiKey.id)).all()


def revoke_api_key(session: Session, tenant_id: str, key_id: str) -> bool:
    """Revoke one of the tenant's keys; False when it has no such live key."""
    key = session.scalar(select(ApiKey).where(ApiKey.tenant_id == tenant_id, ApiKey.id == key_id))
    if key is None or key.revoked_at is not None:
        return False
    key.revoked_at = utcnow()
    session.flush()
    return True


# --- end users ----------------------------------------------------------------------------------


def create_user(session: Session, tenant_id: str, external_id: str) -> User:
    """A new end user; ``IntegrityError`` on flush when the tenant already has this external_id."""
    user = User(tenant_id=tenant_id, external_id=external_id)
    session.add(user)
    session.flush()
    return user


def get_user(session: Session, tenant_id: str, user_id: str) -> User | None:
    return session.scalar(select(User).where(User.tenant_id == tenant_id, User.id == user_id))


def get_user_by_external_id(session: Session, tenant_id: str, external_id: str) -> User | None:
    return session.scalar(select(User).where(User.tenant_id == tenant_id, User.external_id == external_id))


def list_users(session: Session, tenant_id: str, *, external_id: str | None = None, limit: int = 100,
               offset: int = 0) -> Sequence[User]:
    """The tenant's users, oldest first (optionally the one with ``external_id``)."""
    query = select(User).where(User.tenant_id == tenant_id)
    if external_id is not None:
        query = query.where(User.external_id == external_id)
    return session.scalars(query.order_by(User.created_at, User.id).limit(limit).offset(offset)).all()


def get_or_create_user(session: Session, tenant_id: str, external_id: str) -> User:
    return get_user_by_external_id(session, tenant_id, external_id) or create_user(session, tenant_id, external_id)


def set_current_adapter(session: Session, tenant_id: str, user_id: str, adapter_id: str | None) -> User:
    """Point a user at one of the same tenant's adapters (or at none)."""
    user = get_user(session, tenant_id, user_id)
    if user is None:
        raise NotFound(f"no user {user_id!r} in tenant {tenant_id!r}")
    if adapter_id is not None and get_adapter(session, tenant_id, adapter_id) is None:
        raise NotFound(f"no adapter {adapter_id!r} in tenant {tenant_id!r}")
    user.current_adapter_id = adapter_id
    session.flush()
    return user


# --- adapters -----------------------------------------------------------------------------------


def create_adapter(
    session: Session,
    tenant_id: str,
    name: str,
    version: int,
    *,
    owner_user_id: str | None = None,
    adapter_id: str | None = None,
    status: AdapterStatus = AdapterStatus.PENDING,
    rank: int | None = None,
    target_modules: Sequence[str] = (),
    size_bytes: int | None = None,
    sha256: str | None = None,
    storage_key: str | None = None,
    idempotency_key: str | None = None,
) -> Adapter:
    """A new adapter row; ``IntegrityError`` on flush when (tenant, name, version) or (tenant,
    idempotency_key) exists. ``adapter_id``: a server-made id chosen by the caller (default: new)."""
    if owner_user_id is not None and get_user(session, tenant_id, owner_user_id) is None:
        raise NotFound(f"no user {owner_user_id!r} in tenant {tenant_id!r}")
    adapter = Adapter(
        id=adapter_id or new_id(),
        tenant_id=tenant_id,
        owner_user_id=owner_user_id,
        name=name,
        version=version,
        status=status,
        rank=rank,
        target_modules=list(target_modules),
        size_bytes=size_bytes,
        sha256=sha256,
        storage_key=storage_key,
        idempotency_key=idempotency_key,
    )
    session.add(adapter)
    session.flush()
    return adapter


def get_adapter(session: Session, tenant_id: str, adapter_id: str) -> Adapter | None:
    return session.scalar(select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.id == adapter_id))


def get_adapter_by_idempotency_key(session: Session, tenant_id: str, key: str) -> Adapter | None:
    return session.scalar(select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.idempotency_key == key))


def next_adapter_version(session: Session, tenant_id: str, name: str) -> int:
    """One more than the newest version of ``name`` in the tenant (1 for a new name)."""
    latest = session.scalar(select(func.max(Adapter.version)).where(Adapter.tenant_id == tenant_id, Adapter.name == name))
    return (latest or 0) + 1


def latest_ready_adapter(session: Session, tenant_id: str, name: str) -> Adapter | None:
    """The newest ready version of the tenant's adapter ``name``."""
    return session.scalar(
        select(Adapter)
        .where(Adapter.tenant_id == tenant_id, Adapter.name == name, Adapter.status == AdapterStatus.READY)
        .order_by(Adapter.version.desc())
        .limit(1)
    )


def ready_adapter_names(session: Session, tenant_id: str) -> Sequence[str]:
    """The names that have at least one ready version, sorted."""
    query = select(Adapter.name).where(Adapter.tenant_id == tenant_id, Adapter.status == AdapterStatus.READY)
    return session.scalars(query.distinct().order_by(Adapter.name)).all()


def ready_adapters(session: Session, tenant_id: str) -> Sequence[Adapter]:
    """The newest ready version of each of the tenant's adapter names (what ``model: <name>``
    resolves to, see ``latest_ready_adapter``), sorted by name; one query."""
    ready = (Adapter.tenant_id == tenant_id, Adapter.status == AdapterStatus.READY)
    newest = (select(Adapter.name, func.max(Adapter.version).label("version"))
              .where(*ready).group_by(Adapter.name).subquery())
    query = (select(Adapter).join(newest, (Adapter.name == newest.c.name) & (Adapter.version == newest.c.version))
             .where(*ready).order_by(Adapter.name))
    return session.scalars(query).all()


def delete_adapter_row(session: Session, tenant_id: str, adapter_id: str) -> bool:
    """Remove the row itself (an upload whose files could not be stored); False when absent."""
    adapter = get_adapter(session, tenant_id, adapter_id)
    if adapter is None:
        return False
    session.delete(adapter)
    session.flush()
    return True


def mark_adapter_deleted(session: Session, tenant_id: str, adapter_id: str) -> Adapter | None:
    """Mark the adapter deleted and unassign it from every user of the tenant; None when there is
    no such adapter (or it is already deleted)."""
    adapter = get_adapter(session, tenant_id, adapter_id)
    if adapter is None or adapter.status == AdapterStatus.DELETED:
        return None
    adapter.status = AdapterStatus.DELETED
    session.execute(
        update(User).where(User.tenant_id == tenant_id, User.current_adapter_id == adapter_id).values(current_adapter_id=None)
    )
    session.flush()
    return adapter


def list_adapters(
    session: Session,
    tenant_id: str,
    *,
    status: AdapterStatus | None = None,
    owner_user_id: str | None = None,
    name: str | None = None,
    include_deleted: bool = False,
    limit: int = 100,
    offset: int = 0,
) -> Sequence[Adapter]:
    """The tenant's adapters (by name, then newest version first), optionally filtered."""
    query = select(Adapter).where(Adapter.tenant_id == tenant_id)
    if status is not None:
        query = query.where(Adapter.status == status)
    elif not include_deleted:
        query = query.where(Adapter.status != AdapterStatus.DELETED)
    if owner_user_id is not None:
        query = query.where(Adapter.owner_user_id == owner_user_id)
    if name is not None:
        query = query.where(Adapter.name == name)
    query = query.order_by(Adapter.name, Adapter.version.desc()).limit(limit).offset(offset)
    return session.scalars(query).all()


def set_adapter_status(
    session: Session, tenant_id: str, adapter_id: str, status: AdapterStatus, failure_reason: str | None = None
) -> Adapter:
    adapter = get_adapter(session, tenant_id, adapter_id)
    if adapter is None:
        raise NotFound(f"no adapter {adapter_id!r} in tenant {tenant_id!r}")
    adapter.status = status
    adapter.failure_reason = failure_reason
    session.flush()
    return adapter


# --- conversations and messages -----------------------------------------------------------------


def create_conversation(session: Session, tenant_id: str, user_id: str, title: str | None = None) -> Conversation:
    if get_user(session, tenant_id, user_id) is None:
        raise NotFound(f"no user {user_id!r} in tenant {tenant_id!r}")
    conversation = Conversation(tenant_id=tenant_id, user_id=user_id, title=title)
    session.add(conversation)
    session.flush()
    return conversation


def get_conversation(session: Session, tenant_id: str, conversation_id: str) -> Conversation | None:
    return session.scalar(
        select(Conversation).where(Conversation.tenant_id == tenant_id, Conversation.id == conversation_id)
    )


def add_message(
    session: Session,
    tenant_id: str,
    conversation_id: str,
    role: str,
    content: str,
    *,
    token_count: int | None = None,
    created_at: datetime | None = None,
    adapter_id: str | None = None,
) -> Message:
    conversation = get_conversation(session, tenant_id, conversation_id)
    if conversation is None:
        raise NotFound(f"no conversation {conversation_id!r} in tenant {tenant_id!r}")
    message = Message(
        tenant_id=tenant_id,
        conversation_id=conversation.id,
        user_id=conversation.user_id,
        role=role,
        content=content,
        token_count=token_count,
        created_at=created_at or utcnow(),
        adapter_id=adapter_id,
    )
    session.add(message)
    session.flush()
    return message


def recent_messages(
    session: Session,
    tenant_id: str,
    user_id: str,
    limit: int = 50,
    *,
    conversation_id: str | None = None,
    before: datetime | None = None,
) -> list[Message]:
    """A user's newest ``limit`` messages (older than ``before`` when paging), oldest first."""
    query = select(Message).where(Message.tenant_id == tenant_id, Message.user_id == user_id)
    if conversation_id is not None:
        query = query.where(Message.conversation_id == conversation_id)
    if before is not None:
        query = query.where(Message.created_at < before)
    query = query.order_by(Message.created_at.desc(), Message.id.desc()).limit(limit)
    return list(reversed(session.scalars(query).all()))
