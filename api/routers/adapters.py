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
from sqlalchemy.exc import IntegrityError

from api.deps import AdminDep, SessionDep, StateDep, is_id, not_found
from api.error_responses import errors
from api.schemas import AdapterList, AdapterPublic
from tenants import repositories as repo
from tenants.adapter_uploads import StagedAdapter, UploadError, UploadLimits, stage_upload
from tenants.db import session_scope
from inference.adapters.storage_keys import adapter_file_keys, tenant_adapter_prefix
from tenants.models import Adapter, AdapterStatus, new_id

log = logging.getLogger(__name__)
router = APIRouter(tags=["adapters"])

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,199}$"
IDEMPOTENCY_KEY_PATTERN = r"^[\x20-\x7e]{1,255}$"  # printable ASCII
REPLAYED_HEADER = "Idempotent-Replayed"
STORE_RETRY_AFTER_S = 10
STATUS_PATTERN = f"^({'|'.join(AdapterStatus)})$"
_COPY_CHUNK = 1 << 20
_INSERT_ATTEMPTS = 5


def adapter_public(a: Adapter) -> AdapterPublic:
    return AdapterPublic(
        id=a.id, name=a.name, version=a.version, status=AdapterStatus(a.status).value, failure_reason=a.failure_reason,
        user_id=a.owner_user_id, rank=a.rank, target_modules=list(a.target_modules or []),
        size_bytes=a.size_bytes, sha256=a.sha256, created_at=a.created_at,
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


def _same_upload(existing: Adapter, name: str, user_id: str | None, staged: StagedAdapter, key: str) -> None:
    """Raise 422 unless ``existing`` (the row an earlier upload with ``key`` made) came from the
    same payload: the same weights (sha256), name and user."""
    differs = [f"{field} differs (first upload: {then!r}, this one: {now!r})"
               for field, then, now in (("name", existing.name, name), ("user_id", existing.owner_user_id, user_id),
                                        ("the weights' sha256", existing.sha256, staged.sha256)) if then != now]
    if differs:
        raise HTTPException(422, [f"Idempotency-Key {key!r} was already used for another upload "
                                  f"(adapter {existing.id}): {d}" for d in differs])


def _existing_upload(session, tenant_id: str, key: str | None) -> Adapter | None:
    if key is None:
        return None
    return repo.get_adapter_by_idempotency_key(session, tenant_id, key)


def _insert_pending(state, tenant_id: str, name: str, user_id: str | None, staged: StagedAdapter,
                    idempotency_key: str | None = None) -> tuple[Adapter, bool]:
    """``(row, True)``: a new ``pending`` row for the next version of ``name``; or ``(row, False)``:
    the row an earlier upload with the same ``idempotency_key`` made. A lost race (the version, or
    the key: the unique constraints) is retried, and the retry finds the winner's row by its key."""
    for _attempt in range(_INSERT_ATTEMPTS):
        adapter_id = new_id()
        try:
            with session_scope(state.platform.session_factory) as session:
                existing = _existing_upload(session, tenant_id, idempotency_key)
                if existing is not None:
                    _same_upload(existing, name, user_id, staged, idempotency_key)
                    session.expunge(existing)
                    return existing, False
                if user_id is not None and repo.get_user(session, tenant_id, user_id) is None:
                    raise not_found("user", user_id)
                adapter = repo.create_adapter(
                    session, tenant_id, name, repo.next_adapter_version(session, tenant_id, name),
                    adapter_id=adapter_id, owner_user_id=user_id, status=AdapterStatus.PENDING, rank=staged.rank,
                    target_modules=staged.target_modules, size_bytes=staged.size_bytes, sha256=staged.sha256,
                    storage_key=tenant_adapter_prefix(tenant_id, adapter_id), idempotency_key=idempotency_key,
                )
                session.expunge(adapter)
                return adapter, True
        except IntegrityError:
            continue
    raise HTTPException(409, f"could not allocate a version for adapter {name!r}; retry")


def _store_files(state, adapter: Adapter, staged: StagedAdapter) -> None:
    """Stream both files to the object store. On failure: remove what was written (best effort:
    the store may be down; the clean-up job removes objects without a row later), delete the row,
    and answer 503 with Retry-After."""
    store = state.platform.store
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
        with session_scope(state.platform.session_factory) as session:
            repo.delete_adapter_row(session, adapter.tenant_id, adapter.id)
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
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
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
