"""Adapters of the caller's tenant (admin scope): upload, list, read, delete.

An upload is checked (files, archive safety, config and safetensors header against the base model)
before anything is stored; then the row is created ``pending``, its files are streamed to the
object store under a server-made key and a validation task is queued. The task marks it ``ready``
or ``failed``; only ready adapters are ever served.

One upload makes at most one row and one set of objects. If the store fails, what was written is
removed (a multipart upload is aborted by the store layer), the row is deleted and the client gets
503 with ``Retry-After``; what could not be removed while the store was down is found by the
clean-up job (objects without a row, stale multipart uploads).

``Idempotency-Key`` (optional, 1-255 printable ASCII characters, scoped to the tenant): a retried
upload with the same key answers 200 with the row the first one made (header
``Idempotent-Replayed: true``) and stores nothing; the same key with a different payload (weights
sha256, name or user) answers 422 naming what differs. The unique constraint on
``(tenant_id, idempotency_key)`` settles two concurrent uploads with one key: the loser answers
with the winner's row.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, Header, HTTPException, Query, Response, UploadFile
from api.deps import AdminDep, PageLimit, PageOffset, SessionDep, StateDep, is_id, not_found
from api.error_responses import errors
from api.schemas import AdapterList, AdapterPublic
from tenants import repositories as repo
from tenants.adapter_intake import IdempotencyConflict, StoreFailed, VersionConflict, insert_pending, store_files
from tenants.adapter_uploads import StagedAdapter, UploadError, UploadLimits, stage_upload
from tenants.db import session_scope
from tenants.models import Adapter, AdapterStatus

log = logging.getLogger(__name__)
router = APIRouter(tags=["adapters"])

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,199}$"
IDEMPOTENCY_KEY_PATTERN = r"^[\x20-\x7e]{1,255}$"  # printable ASCII
REPLAYED_HEADER = "Idempotent-Replayed"
STORE_RETRY_AFTER_S = 10
STATUS_PATTERN = f"^({'|'.join(AdapterStatus)})$"
_COPY_CHUNK = 1 << 20


def adapter_public(a: Adapter) -> AdapterPublic:
    return AdapterPublic(
        id=a.id, name=a.name, version=a.version, status=AdapterStatus(a.status).value, failure_reason=a.failure_reason,
        user_id=a.owner_user_id, rank=a.rank, target_modules=list(a.target_modules or []),
        size_bytes=a.size_bytes, sha256=a.sha256, created_at=a.created_at, provenance=a.provenance,
    )


def _receive(files: list[UploadFile], into: Path) -> list[tuple[str, Path]]:
    """Copy the spooled upload parts to files under ``into`` (worker thread)."""
    received = []
    for i, upload in enumerate(files):
        path = into / f"part-{i}"
        with open(path, "wb") as out:
            upload.file.seek(0)
            shutil.copyfileobj(upload.file, out, _COPY_CHUNK)
        received.append((upload.filename or "", path))
    return received


def _insert_pending(state, tenant_id: str, name: str, user_id: str | None, staged: StagedAdapter,
                    idempotency_key: str | None = None) -> tuple[Adapter, bool]:
    """``tenants.adapter_intake.insert_pending`` with its refusals as HTTP answers."""
    try:
        return insert_pending(state.platform, tenant_id, name, user_id, staged, idempotency_key=idempotency_key)
    except repo.NotFound:
        raise not_found("user", user_id) from None
    except IdempotencyConflict as exc:
        raise HTTPException(422, exc.problems) from None
    except VersionConflict as exc:
        raise HTTPException(409, str(exc)) from None


def _store_files(state, adapter: Adapter, staged: StagedAdapter) -> None:
    """``tenants.adapter_intake.store_files``; a store failure is 503 with Retry-After."""
    try:
        store_files(state.platform, adapter, staged)
    except StoreFailed as exc:
        raise HTTPException(503, "the object store is unavailable; nothing was stored",
                            headers={"Retry-After": str(STORE_RETRY_AFTER_S)}) from exc


@router.post("/v1/adapters", status_code=202, response_model=AdapterPublic,
             responses=errors(401, 403, 404, 409, 413, 422, 429, 503))
async def upload_adapter(
    caller: AdminDep,
    state: StateDep,
    name: Annotated[str, Form(pattern=NAME_PATTERN, description="letters, digits, '.', '_', '-'")],
    files: Annotated[list[UploadFile], File(description="adapter_config.json and adapter_model.safetensors, or one .zip/.tar.gz")],
    response: Response,
    user_id: Annotated[str | None, Form(description="make it this user's personal adapter")] = None,
    idempotency_key: Annotated[str | None, Header(
        alias="Idempotency-Key", pattern=IDEMPOTENCY_KEY_PATTERN,
        description="1-255 printable ASCII characters; a retry with the same key answers 200 with the "
                    "first upload's adapter")] = None,
) -> AdapterPublic:
    """Upload a PEFT LoRA adapter; answers 202 with status ``pending`` (poll GET /v1/adapters/{id}),
    or 200 with the existing adapter when the ``Idempotency-Key`` was already used for this upload."""
    if user_id == "":
        user_id = None
    if user_id is not None and not is_id(user_id):
        raise not_found("user", user_id)
    settings = state.settings
    limits = UploadLimits(settings.max_upload_bytes, settings.max_archive_members, settings.max_lora_rank)
    workdir = Path(tempfile.mkdtemp(prefix="tailor-upload-"))
    try:
        received = await asyncio.to_thread(_receive, files, workdir)
        staging = workdir / "staged"
        staging.mkdir()
        try:
            staged = await asyncio.to_thread(stage_upload, received, staging, state.platform.model_config, limits)
        except UploadError as exc:
            raise HTTPException(exc.status, exc.problems) from None
        adapter, created = await asyncio.to_thread(_insert_pending, state, caller.tenant_id, name, user_id, staged,
                                                   idempotency_key)
        if created:
            await asyncio.to_thread(_store_files, state, adapter, staged)
    finally:
        await asyncio.to_thread(shutil.rmtree, workdir, True)
    if not created:
        response.status_code = 200
        response.headers[REPLAYED_HEADER] = "true"
        return adapter_public(adapter)
    await _queue_validation(state, adapter.id)
    return adapter_public(adapter)


QUEUE_TIMEOUT_S = 5.0


async def _queue_validation(state, adapter_id: str) -> None:
    """Queue the validation off the event loop. The upload is stored either way: if the broker is
    unreachable (or slow past ``QUEUE_TIMEOUT_S``) the adapter stays ``pending`` and the periodic
    clean-up queues it again after ``TAILOR_PENDING_REQUEUE_S``."""
    try:
        await asyncio.wait_for(asyncio.to_thread(state.tasks.submit_validation, adapter_id), QUEUE_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - any broker failure: the clean-up requeues it
        log.warning("queueing the validation of adapter %s failed (the clean-up will queue it again): %s",
                    adapter_id, exc)


@router.get("/v1/adapters", response_model=AdapterList, responses=errors(401, 403, 429, 503))
def list_adapters(
    caller: AdminDep,
    session: SessionDep,
    status: Annotated[str | None, Query(pattern=STATUS_PATTERN)] = None,
    user_id: Annotated[str | None, Query(max_length=64)] = None,
    name: Annotated[str | None, Query(max_length=200)] = None,
    limit: PageLimit = 100,
    offset: PageOffset = 0,
) -> AdapterList:
    """The tenant's adapters, by name then newest version first (deleted ones only when asked)."""
    rows = repo.list_adapters(session, caller.tenant_id, status=AdapterStatus(status) if status else None,
                              owner_user_id=user_id, name=name,
                              limit=limit, offset=offset)
    return AdapterList(data=[adapter_public(a) for a in rows], limit=limit, offset=offset)


@router.get("/v1/adapters/{adapter_id}", response_model=AdapterPublic, responses=errors(401, 403, 404, 429, 503))
def get_adapter(adapter_id: str, caller: AdminDep, session: SessionDep) -> AdapterPublic:
    adapter = repo.get_adapter(session, caller.tenant_id, adapter_id) if is_id(adapter_id) else None
    if adapter is None:
        raise not_found("adapter", adapter_id)
    return adapter_public(adapter)


def _mark_deleted(state, tenant_id: str, adapter_id: str) -> Adapter:
    with session_scope(state.platform.session_factory) as session:
        adapter = repo.mark_adapter_deleted(session, tenant_id, adapter_id) if is_id(adapter_id) else None
        if adapter is None:
            raise not_found("adapter", adapter_id)
        session.expunge(adapter)
        return adapter


@router.delete("/v1/adapters/{adapter_id}", status_code=204, responses=errors(401, 403, 404, 429, 503))
async def delete_adapter(adapter_id: str, caller: AdminDep, state: StateDep) -> Response:
    """Stop serving the adapter at once, wait for its in-flight requests, remove its files."""
    adapter = await asyncio.to_thread(_mark_deleted, state, caller.tenant_id, adapter_id)
    try:
        await state.inference.drop_adapter(adapter.id)
    except Exception as exc:  # inference down: it cannot be serving the adapter either
        log.info("inference could not drop adapter %s: %s", adapter.id, exc)
    if adapter.storage_key:
        try:
            await asyncio.to_thread(state.platform.store.delete_prefix, adapter.storage_key)
        except Exception:
            log.exception("deleting the files of adapter %s failed", adapter.id)
    return Response(status_code=204)
