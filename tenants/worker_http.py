"""The worker's HTTP server: ``/metrics`` (the process's default Prometheus registry),
``/healthz`` (the process answers) and ``/readyz`` (200 while the worker consumes tasks, 503
before it is ready and from the moment it received SIGTERM).

A few lines of ``wsgiref`` with a thread per request, in a daemon thread, like prometheus_client's
own ``start_http_server`` (which serves only metrics).
"""

from __future__ import annotations

import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app


class Readiness:
    """A thread-safe flag: whether the worker takes tasks."""

    def __init__(self) -> None:
        self._ready = threading.Event()

    def set(self, ready: bool) -> None:
        if ready:
            self._ready.set()
        else:
            self._ready.clear()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *_args) -> None:  # scrapes every 15 s would flood the log
        pass


def _app(readiness: Readiness):
    metrics = make_wsgi_app()

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if path in ("/healthz", "/readyz"):
            ok = path == "/healthz" or readiness.ready
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "text/plain; charset=utf-8")])
            return [b"ok\n" if ok else b"not ready\n"]
        return metrics(environ, start_response)

    return app


def start_http_server(host: str, port: int, readiness: Readiness) -> WSGIServer:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` from a daemon thread;
    ``shutdown()`` the returned server to stop it."""
    import tenants.worker_metrics  # noqa: F401  (registers the worker's metrics)

    server = make_server(host, port, _app(readiness), server_class=_ThreadingServer, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="tailor-worker-http", daemon=True)
    thread.start()
    return server
