"""The adapter validation job (a Celery task in production, a thread in the embedded default).

``validate_adapter_job`` is idempotent: it acts only on a ``pending`` adapter and flips the status
with a conditional UPDATE, so a redelivered or duplicated task does nothing the second time. A
failed adapter's objects are deleted from the store; a ready one becomes its owner's current
personal adapter and inference is told to prefetch it.
"""

from __future__ import annotations

import enum
import hashlib
import logging

from sqlalchemy import update

from inference.adapters.object_store import ObjectNotFoundError
from inference.adapters.storage_keys import adapter_file_keys
from inference.adapters.peft_checkpoint import AdapterValidationError, validate_adapter_files
from tenants.db import session_scope
from tenants.models import Adapter, AdapterStatus, User
from tenants.platform import Platform, adapter_spec

log = logging.getLogger(__name__)

MAX_REASON_CHARS = 4000


class ValidationOutcome(enum.StrEnum):
    """What one validation attempt did to a pending adapter."""

    READY = "ready"  # valid: now served
    FAILED = "failed"  # invalid (or given up on): files deleted, reason recorded
    SKIPPED = "skipped"  # unknown id, or no longer pending: nothing done


def _mark(platform: Platform, adapter_id: str, status: AdapterStatus, **values) -> bool:
    """pending -> ``status`` if still pending; True when this call made the change."""
    with session_scope(platform.session_factory) as session:
        result = session.execute(
            update(Adapter)
            .where(Adapter.id == adapter_id, Adapter.status == AdapterStatus.PENDING)
            .values(status=status, **values)
        )
        if result.rowcount != 1:
            return False
        if status == AdapterStatus.READY:
            adapter = session.get(Adapter, adapter_id)
            if adapter is not None and adapter.owner_user_id is not None:
                session.execute(
                    update(User)
                    .where(User.id == adapter.owner_user_id, User.tenant_id == adapter.tenant_id)
                    .values(current_adapter_id=adapter_id)
                )
        return True


def _fail(platform: Platform, adapter: Adapter, reason: str) -> ValidationOutcome:
    reason = reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 3] + "..."
    if _mark(platform, adapter.id, AdapterStatus.FAILED, failure_reason=reason):
        try:
            platform.store.delete_prefix(adapter.storage_key)
        except Exception:  # the row says failed either way; a later clean-up can retry
            log.exception("deleting the objects of failed adapter %s failed", adapter.id)
        return ValidationOutcome.FAILED
    return ValidationOutcome.SKIPPED


def validate_adapter_job(platform: Platform, adapter_id: str) -> ValidationOutcome:
    """Validate a pending adapter's stored files with the engine's rules.

    Returns ``ready``, ``failed`` or ``skipped`` (unknown id, or no longer pending). Store or
    database outages raise, so that the task queue retries; invalid files never raise.
    """
    with session_scope(platform.session_factory) as session:
        adapter = session.get(Adapter, adapter_id)
        if adapter is None or adapter.status != AdapterStatus.PENDING:
            return ValidationOutcome.SKIPPED
        session.expunge(adapter)
    if adapter.storage_key is None:
        return _fail(platform, adapter, "the upload stored no files")
    spec_keys = adapter_file_keys(adapter.storage_key)
    try:
        config_bytes, weights_bytes = (platform.store.get(k) for k in spec_keys)
    except ObjectNotFoundError as exc:
        return _fail(platform, adapter, f"adapter file missing from storage: {exc}")
    if adapter.sha256 is not None and hashlib.sha256(weights_bytes).hexdigest() != adapter.sha256:
        return _fail(platform, adapter, "the stored weights do not match the uploaded sha256")
    try:
        weights = validate_adapter_files(
            config_bytes, weights_bytes, platform.model_config, platform.settings.max_lora_rank
        )
    except AdapterValidationError as exc:
        return _fail(platform, adapter, "; ".join(exc.problems))
    changed = _mark(
        platform,
        adapter.id,
        AdapterStatus.READY,
        failure_reason=None,
        rank=weights.rank,
        target_modules=list(weights.target_modules),
        sha256=weights.sha256,
    )
    if not changed:
        return ValidationOutcome.SKIPPED
    adapter.sha256 = weights.sha256
    platform.adapter_ready(adapter_spec(adapter))
    return ValidationOutcome.READY


def give_up(platform: Platform, adapter_id: str, reason: str) -> ValidationOutcome:
    """Mark a still-pending adapter failed with ``reason`` and delete its files (the task queue
    calls this when no further attempt will be made)."""
    with session_scope(platform.session_factory) as session:
        adapter = session.get(Adapter, adapter_id)
        if adapter is None or adapter.status != AdapterStatus.PENDING:
            return ValidationOutcome.SKIPPED
        session.expunge(adapter)
    return _fail(platform, adapter, reason)
