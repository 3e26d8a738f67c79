"""Best-effort prefetch calls to inference (a cold adapter only costs time, never an error)."""

from __future__ import annotations

import asyncio
import logging

from inference.service.protocol import AdapterSpec

log = logging.getLogger(__name__)


async def prefetch_quietly(inference, spec: AdapterSpec) -> None:
    """Ask inference to warm ``spec``; failures are logged, not raised."""
    try:
        tier = await inference.prefetch(spec)
        log.debug("prefetched adapter %s into %s", spec.id, tier)
    except Exception as exc:
        log.info("prefetching adapter %s failed: %s", spec.id, exc)


def prefetch_from_thread(loop: asyncio.AbstractEventLoop, inference, spec: AdapterSpec) -> None:
    """Schedule ``prefetch_quietly`` on the api's event loop from a worker thread (the in-process
    validation task runs in one)."""
    if not loop.is_closed():
        asyncio.run_coroutine_threadsafe(prefetch_quietly(inference, spec), loop)
