"""Graceful shutdown of the HTTP services (the api and the inference service): drain, then stop.

On the first SIGTERM (or SIGINT) the process keeps its listening socket open and:

1. answers ``GET /readyz`` with 503 at once (the readiness routes read ``app.state.drain``), so
   load balancers and the api's router stop sending it work;
2. refuses new generation requests with 503 JSON and ``Retry-After`` (the client retries
   elsewhere or later); every other request is still served;
3. lets the requests in flight, streams included, run to their end, for at most
   ``drain_timeout_s`` seconds (``TAILOR_DRAIN_TIMEOUT_S``);
4. then runs uvicorn's own shutdown: listeners closed, ``FINAL_GRACE_S`` more seconds for what is
   left (then cancelled), the lifespan shutdown (the engine stops), and a return, so the process
   exits with status 0 instead of re-raising the signal (status 143).

A second signal during the drain skips the rest of it (uvicorn's shutdown starts at once); a third
SIGINT forces the exit. ``install_drain`` wires steps 1-3 into an app; ``serve`` runs it.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Generator
from contextlib import contextmanager
from types import FrameType

import uvicorn
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger(__name__)

FINAL_GRACE_S = 5.0  # after the drain: uvicorn's graceful shutdown for whatever is still open
RETRY_AFTER_S = 5
UNTRACKED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})  # probes and scrapes do not hold a drain
STARTUP_FAILURE = 3  # uvicorn's exit status when the app's lifespan startup fails

Refuse = Callable[[str, str], bool]  # (method, path) -> whether it starts a generation


class Drain:
    """The drain state of one process: whether it drains, since when, and the requests in flight.

    Written by the signal handler (``begin``) and the middleware, read by readiness routes and the
    server's tick, all on the event loop's thread: plain attributes, no lock.
    """

    def __init__(self, timeout_s: float, retry_after_s: int = RETRY_AFTER_S):
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self.in_flight = 0
        self.in_flight_at_start = 0  # requests in flight when the drain began (for the log)
        self._deadline: float | None = None

    @property
    def draining(self) -> bool:
        """True from the first shutdown signal on."""
        return self._deadline is not None

    def begin(self) -> None:
        """Start draining (idempotent: the deadline is set once)."""
        if self._deadline is None:
            self._deadline = time.monotonic() + self.timeout_s
            self.in_flight_at_start = self.in_flight

    def finished(self) -> bool:
        """Draining, and nothing is in flight any more or the drain timeout has passed."""
        return self._deadline is not None and (self.in_flight == 0 or time.monotonic() >= self._deadline)


class DrainMiddleware:
    """Counts the HTTP requests in flight (except probes and scrapes) and, once the drain began,
    answers new generation requests (``refuse(method, path)``) with 503, ``Retry-After`` and
    ``body`` as JSON, before any other work is done for them."""

    def __init__(self, app: ASGIApp, drain: Drain, refuse: Refuse, body: dict):
        self.app = app
        self.drain = drain
        self.refuse = refuse
        self.body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNTRACKED_PATHS:
            await self.app(scope, receive, send)
            return
        if self.drain.draining and self.refuse(scope["method"], scope["path"]):
            headers = {"Retry-After": str(self.drain.retry_after_s), "Connection": "close"}
            await JSONResponse(self.body, status_code=503, headers=headers)(scope, receive, send)
            return
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1


def install_drain(app, timeout_s: float, refuse: Refuse, body: dict) -> Drain:
    """Give ``app`` (a Starlette/FastAPI app that has not started) a ``Drain``: stored as
    ``app.state.drain`` for its readiness route, enforced by the innermost middleware (inside
    metrics and authentication, which therefore still see refused requests)."""
    if app.middleware_stack is not None:
        raise RuntimeError("install_drain must run before the app starts")
    drain = Drain(timeout_s)
    app.state.drain = drain
    app.user_middleware.append(Middleware(DrainMiddleware, drain=drain, refuse=refuse, body=body))
    return drain


def is_draining(app) -> bool:
    """Whether ``app`` has a drain that began (False for apps served without ``serve``)."""
    drain = getattr(app.state, "drain", None)
    return drain is not None and drain.draining


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first SIGTERM/SIGINT starts the drain instead of the shutdown, which
    follows once the drain finished; signals are not re-raised afterwards (exit status 0)."""

    def __init__(self, config: uvicorn.Config, drain: Drain):
        super().__init__(config)
        self.drain = drain
        self._announced = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Signal handler (main thread): first signal drains, the next ones are uvicorn's."""
        if self.drain.draining or self.should_exit:
            super().handle_exit(sig, frame)
        else:
            self.drain.begin()

    async def on_tick(self, counter: int) -> bool:
        """Every 0.1 s: end the main loop once the drain finished (logging outside the handler)."""
        if self.drain.draining and not self._announced:
            self._announced = True
            log.info("shutdown signal: draining %d request(s) for up to %.0f s", self.drain.in_flight_at_start,
                     self.drain.timeout_s)
        if self.drain.finished() and not self.should_exit:
            log.info("drained (%d request(s) still in flight); shutting down", self.drain.in_flight)
            self.should_exit = True
        return await super().on_tick(counter)

    @contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """Install ``handle_exit`` for SIGTERM and SIGINT while serving (main thread only) and
        restore the previous handlers after, without re-raising: a drained stop is a clean exit."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def serve(app, *, host: str, port: int, drain: Drain, log_level: str = "info") -> None:
    """Serve ``app`` until a signal and a finished drain; exit with status 3 (as ``uvicorn.run``
    does) when the app's startup failed."""
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=FINAL_GRACE_S, log_level=log_level)
    server = DrainingServer(config, drain)
    server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)
