"""Storing a checked adapter as a new pending version: the one path by which an adapter enters
the platform, whether uploaded (``api/routers/adapters.py``) or trained (``tenants.training.jobs``).

``insert_pending`` makes the ``pending`` row of the next version of a name (or finds the row an
earlier upload with the same idempotency key made); ``store_files`` streams the staged files to
the object store under the row's server-made key. Validation (``tenants.adapter_validation``)
then turns the row ``ready`` or ``failed``.
"""

from __future__ import annotations

import logging

from sqlalchemy.exc import IntegrityError

from inference.adapters.storage_keys import adapter_file_keys, tenant_adapter_prefix
from tenants import repositories as repo
from tenants.adapter_uploads import StagedAdapter
from tenants.db import session_scope
from tenants.models import Adapter, AdapterStatus, new_id
from tenants.platform import Platform

log = logging.getLogger(__name__)

INSERT_ATTEMPTS = 5


class IdempotencyConflict(ValueError):
    """The idempotency key was used for another payload; ``problems`` names every difference."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


class VersionConflict(RuntimeError):
    """No version could be allocated (concurrent writers kept taking it)."""


class StoreFailed(RuntimeError):
    """The object store failed; nothing of the adapter is kept (its row is deleted)."""


def _same_upload(existing: Adapter, name: str, user_id: str | None, staged: StagedAdapter, key: str) -> None:
    """Raise IdempotencyConflict unless ``existing`` (the row an earlier upload with ``key`` made)
    came from the same payload: the same weights (sha256), name and user."""
    differs = [f"{field} differs (first upload: {then!r}, this one: {now!r})"
               for field, then, now in (("name", existing.name, name), ("user_id", existing.owner_user_id, user_id),
                                        ("the weights' sha256", existing.sha256, staged.sha256)) if then != now]
    if differs:
        raise IdempotencyConflict([f"Idempotency-Key {key!r} was already used for another upload "
                                   f"(adapter {existing.id}): {d}" for d in differs])


def insert_pending(platform: Platform, tenant_id: str, name: str, user_id: str | None, staged: StagedAdapter, *,
                   idempotency_key: str | None = None, provenance: dict | None = None) -> tuple[Adapter, bool]:
    """``(row, True)``: a new ``pending`` row for the next version of ``name``; or ``(row, False)``:
    the row an earlier upload with the same ``idempotency_key`` made. A lost race (the version, or
    the key: the unique constraints) is retried, and the retry finds the winner's row by its key.
    Raises ``repositories.NotFound`` (no such user), IdempotencyConflict, VersionConflict."""
    for _attempt in range(INSERT_ATTEMPTS):
        adapter_id = new_id()
        try:
            with session_scope(platform.session_factory) as session:
                existing = (repo.get_adapter_by_idempotency_key(session, tenant_id, idempotency_key)
                            if idempotency_key is not None else None)
                if existing is not None:
                    _same_upload(existing, name, user_id, staged, idempotency_key)
                    session.expunge(existing)
                    return existing, False
                if user_id is not None and repo.get_user(session, tenant_id, user_id) is None:
                    raise repo.NotFound(f"no user {user_id!r}")
                adapter = repo.create_adapter(
                    session, tenant_id, name, repo.next_adapter_version(session, tenant_id, name),
                    adapter_id=adapter_id, owner_user_id=user_id, status=AdapterStatus.PENDING, rank=staged.rank,
                    target_modules=staged.target_modules, size_bytes=staged.size_bytes, sha256=staged.sha256,
                    storage_key=tenant_adapter_prefix(tenant_id, adapter_id), idempotency_key=idempotency_key,
                )
                adapter.provenance = provenance
                session.flush()
                session.expunge(adapter)
                return adapter, True
        except IntegrityError:
            continue
    raise VersionConflict(f"could not allocate a version for adapter {name!r}; retry")


def store_files(platform: Platform, adapter: Adapter, staged: StagedAdapter) -> None:
    """Stream both files to the object store. On failure remove what was written (best effort: the
    store may be down; the clean-up job removes objects without a row later), delete the row, and
    raise StoreFailed."""
    store = platform.store
    try:
        keys = adapter_file_keys(adapter.storage_key)
        store.put_file(keys.config, staged.config_path)
        store.put_file(keys.weights, staged.weights_path)
    except Exception as exc:
        log.warning("storing adapter %s (tenant %s) failed, nothing is kept: %s: %s",
                    adapter.id, adapter.tenant_id, type(exc).__name__, exc)
        try:
            store.delete_prefix(adapter.storage_key)
        except Exception as cleanup_exc:
            log.warning("removing the objects of failed upload %s failed (the clean-up job will): %s",
                        adapter.id, cleanup_exc)
        with session_scope(platform.session_factory) as session:
            repo.delete_adapter_row(session, adapter.tenant_id, adapter.id)
        raise StoreFailed(f"the object store is unavailable: {type(exc).__name__}: {exc}") from exc
