"""``run_inference_service`` as its own process: it becomes ready, serves, and on SIGTERM lets the
in-flight stream finish (about 3 s of generation here) before it stops the engine and exits 0."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from inference.service.client import RemoteInference
from inference.service.protocol import GenerateRequest

SECRET = "process-test-secret-0123456789"
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the service exited early:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(url + "/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the service did not become ready:\n{log.read_text()[-3000:]}")


async def test_sigterm_drains_the_in_flight_stream(tiny_checkpoint, tmp_path):
    port = _free_port()
    env = {**os.environ, "TAILOR_MODEL": str(tiny_checkpoint), "TAILOR_PORT": str(port),
           "TAILOR_HOST": "127.0.0.1", "TAILOR_INFERENCE_SECRET": SECRET, "TAILOR_DATA_DIR": str(tmp_path)}
    code = ("from tenants.settings import Settings; from inference.service.app import run_inference_service; "
            "run_inference_service(Settings())")
    log = tmp_path / "service.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    remote = RemoteInference(url, SECRET, timeout_s=60.0)
    try:
        _wait_ready(url, process, log)
        req = GenerateRequest(messages=[{"role": "user", "content": "Go on."}], max_tokens=1000,
                              temperature=1.0, seed=3)
        events = await remote.start(req)
        seen = [await anext(events)]
        while seen[-1]["event"] != "delta":
            seen.append(await anext(events))
        process.send_signal(signal.SIGTERM)
        seen += [event async for event in events]
        assert seen[-1]["event"] == "end", seen[-1]
        assert seen[-1]["finish_reason"] in ("length", "stop")
        assert process.wait(timeout=60) == 0, log.read_text()[-3000:]
        text = log.read_text()
        assert "Waiting for connections to close" in text and "stopped on signal SIGTERM" in text, text[-3000:]
        assert await remote.is_ready() is False
    finally:
        await remote.aclose()
        if process.poll() is None:
            process.kill()
            process.wait()
