"""``tailor serve inference`` as its own process: it becomes ready, serves, and on SIGTERM drains:
``/readyz`` answers 503 at once, a new generation is refused with 503 and ``Retry-After``, the
in-flight NDJSON stream runs to its ``end`` event, then the engine
stops and the process exits with status 0."""

from __future__ import annotations

import signal
import time

import httpx
import pytest
from support.live_server import start_cli_service, stop_cli_service

from inference.service.client import RemoteInference
from inference.service.events import GenerationEnded, TextDelta
from inference.service.protocol import SECRET_HEADER, GenerateRequest

SECRET = "process-test-secret-0123456789"
# The stream must still run at SIGTERM and end within the drain: 120 tokens of the tiny model take
# well under a second on an idle machine and about 15 s on a heavily shared one (the log shows
# that the stream was in flight).
STREAM_TOKENS = 120
DRAIN_TIMEOUT_S = 50


@pytest.mark.timeout(180)
async def test_sigterm_drains_the_in_flight_stream(tiny_checkpoint, tmp_path):
    env = {"TAILOR_MODEL": str(tiny_checkpoint), "TAILOR_HOST": "127.0.0.1", "TAILOR_INFERENCE_SECRET": SECRET,
           "TAILOR_DATA_DIR": str(tmp_path), "TAILOR_DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S)}
    service = start_cli_service(["serve", "inference"], env, tmp_path / "service.log")
    remote = RemoteInference(service.url, SECRET, timeout_s=60.0)
    try:
        req = GenerateRequest(messages=[{"role": "user", "content": "Go on."}], max_tokens=STREAM_TOKENS,
                              temperature=1.0, seed=3)
        events = await remote.start(req)
        seen = [await anext(events)]
        while not isinstance(seen[-1], TextDelta):
            seen.append(await anext(events))
        signalled = time.monotonic()
        service.process.send_signal(signal.SIGTERM)

        async with httpx.AsyncClient(base_url=service.url, timeout=5) as client:
            ready = await client.get("/readyz")
            assert ready.status_code == 503 and time.monotonic() - signalled < 2.0, ready.text
            refused = await client.post("/internal/generate", headers={SECRET_HEADER: SECRET},
                                        json=req.model_dump(mode="json"))
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1, refused.text
        assert refused.json()["detail"], refused.text

        seen += [event async for event in events]
        assert isinstance(seen[-1], GenerationEnded), seen[-1]
        assert seen[-1].finish_reason.value in ("length", "stop")
        assert service.process.wait(timeout=DRAIN_TIMEOUT_S + 15) == 0, service.log()[-3000:]
        assert "draining 1 request(s)" in service.log(), service.log()[-3000:]  # the stream was in flight
        assert "engine stopped" in service.log(), service.log()[-3000:]
        assert await remote.is_ready() is False
    finally:
        await remote.aclose()
        stop_cli_service(service)
