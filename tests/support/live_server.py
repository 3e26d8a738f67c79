"""Real servers for tests on free local ports: an ASGI app served by uvicorn in a background thread
(``serve_app``), or a ``tailor serve ...`` command as its own process (``start_cli_service``)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn

REPO_ROOT = Path(__file__).resolve().parents[2]


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


# --- `tailor serve ...` as a real process -------------------------------------------------------------

@dataclass
class CliService:
    """A running ``python -m api.cli <args>`` process and where it answers."""

    process: subprocess.Popen
    url: str
    log_path: Path

    def log(self) -> str:
        """The process's output so far (stdout and stderr)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _answers_ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def start_cli_service(args: list[str], env: dict[str, str], log_path: Path, *, port: int | None = None,
                      wait_ready: bool = True, timeout_s: float = 120.0) -> CliService:
    """Start ``tailor <args> --port <free port>`` (``python -m api.cli``, from the repository root,
    in its own session) with ``env`` over the current environment; wait until ``/readyz`` answers
    200 unless ``wait_ready`` is false. Raises AssertionError with the log if it exits first or is
    not ready within ``timeout_s``. The caller stops it (``stop_cli_service``)."""
    port = port or _free_port()
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    with open(log_path, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "api.cli", *args, "--port", str(port)], env=full_env,
                                   cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    service = CliService(process, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + timeout_s
    while wait_ready and not _answers_ready(service.url):
        if process.poll() is not None:
            raise AssertionError(f"tailor {' '.join(args)} exited with {process.returncode}:\n{service.log()[-5000:]}")
        if time.monotonic() > deadline:
            stop_cli_service(service)
            raise AssertionError(f"tailor {' '.join(args)} not ready after {timeout_s:.0f} s:\n{service.log()[-5000:]}")
        time.sleep(0.1)
    return service


def stop_cli_service(service: CliService, timeout_s: float = 30.0) -> int:
    """SIGTERM the process (if it still runs) and wait; SIGKILL after ``timeout_s``. Its exit status."""
    process = service.process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    return process.returncode


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
