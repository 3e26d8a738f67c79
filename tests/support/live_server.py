"""Serve an ASGI app with a real uvicorn server on a free local port, in a background thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn


@contextmanager
def serve_app(
    app,
    *,
    host: str = "127.0.0.1",
    startup_timeout_s: float = 30.0,
    graceful_shutdown_s: float = 5.0,
) -> Iterator[str]:
    """Run ``app`` (its lifespan included) until the block exits; yields its base URL
    (``http://127.0.0.1:<port>``).

    The port is bound before the server starts, so there is no race for it. On exit the server
    shuts down gracefully: open streams get ``graceful_shutdown_s`` seconds, then are cancelled.
    Raises RuntimeError if the server stops during startup (a failing lifespan, for instance).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="auto",
                            timeout_graceful_shutdown=graceful_shutdown_s)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    try:
        _wait_started(server, thread, startup_timeout_s)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(graceful_shutdown_s + 10.0)
        sock.close()


def _wait_started(server: uvicorn.Server, thread: threading.Thread, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server stopped during startup (see the log above)")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server did not start within {timeout_s} s")
        time.sleep(0.01)
