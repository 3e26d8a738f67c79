"""Liveness and readiness (no authentication)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api.deps import StateDep
from inference.service.shutdown import is_draining
from tenants.repositories import ping

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    """The process is up."""
    return {"status": "ok"}


def _database_ok(state) -> bool:
    try:
        with state.platform.session_factory() as session:
            ping(session)
        return True
    except Exception:
        return False


def _store_ok(state) -> bool:
    try:
        state.platform.store.exists("healthz/probe")
        return True
    except Exception:
        return False


@router.get("/readyz", responses={503: {"description": "not ready: names the checks that failed (or draining)"}})
async def readyz(request: Request, state: StateDep) -> JSONResponse:
    """200 when the database, the object store and inference all answer (with several inference
    replicas: at least one; ``inference_replicas`` then names each one's state); else 503 naming
    which not. While the process drains for shutdown: 503 ``draining`` at once, without probing
    anything."""
    if is_draining(request.app):
        return JSONResponse({"status": "draining"}, status_code=503, headers={"Retry-After": "5"})
    database, store = await asyncio.gather(asyncio.to_thread(_database_ok, state), asyncio.to_thread(_store_ok, state))
    try:
        inference = bool(await state.inference.is_ready())
    except Exception:
        inference = False
    checks = {"database": database, "object_store": store, "inference": inference}
    body = {name: ("ok" if ok else "unavailable") for name, ok in checks.items()}
    replicas = getattr(state.inference, "replicas", None)  # api.replicas.ReplicaRouter, just probed
    if replicas is not None and len(replicas) > 1:
        body["inference_replicas"] = {r.url: ("ok" if r.healthy else "unavailable") for r in replicas}
    ok = all(checks.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", **body}, status_code=200 if ok else 503,
                        headers=None if ok else {"Retry-After": "5"})
