"""``tailor serve`` (the api with its in-process engine) drains on SIGTERM: ``/readyz`` answers 503
at once, a new chat is refused with 503 and ``Retry-After``, the SSE stream in flight runs to its
``done`` event, and the process exits with status 0."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterable, Iterator

import httpx
import pytest
from support.live_server import start_cli_service, stop_cli_service
from support.platform_flows import OPERATOR_TOKEN, bearer, create_key, create_tenant, create_user

# The stream must still run at SIGTERM and end within the drain: 120 tokens of the tiny model take
# well under a second on an idle machine and about 15 s on a heavily shared one (the log shows
# that the stream was in flight).
STREAM_TOKENS = 120
DRAIN_TIMEOUT_S = 50


def _sse_events(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(event, data) pairs of an SSE line iterator."""
    event = None
    for line in lines:
        if line.startswith("event: "):
            event = line[len("event: "):]
        elif line.startswith("data: ") and event is not None:
            yield event, line[len("data: "):]
            event = None


@pytest.mark.timeout(180)
def test_sigterm_drains_the_chat_stream_and_exits_0(tmp_path, tiny_checkpoint):
    env = {"TAILOR_MODEL": str(tiny_checkpoint), "TAILOR_DATA_DIR": str(tmp_path / "var"),
           "TAILOR_OPERATOR_TOKEN": OPERATOR_TOKEN, "TAILOR_POOL_BYTES": str(32 << 20),
           "TAILOR_DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S), "TAILOR_MODE": "development"}
    service = start_cli_service(["serve"], env, tmp_path / "serve.log")
    try:
        with httpx.Client(base_url=service.url, timeout=30) as client:
            _tenant, admin = create_tenant(client, OPERATOR_TOKEN, "drain-tenant")
            chat_key = create_key(client, admin, "chat")
            user = create_user(client, admin, "drain@user")
            body = {"message": "Go on.", "stream": True, "max_tokens": STREAM_TOKENS, "temperature": 1.0, "seed": 3}
            with client.stream("POST", f"/v1/users/{user['id']}/chat", json=body, headers=bearer(chat_key)) as stream:
                assert stream.status_code == 200
                events = _sse_events(stream.iter_lines())
                assert [next(events)[0] for _ in range(2)] == ["start", "delta"]
                signalled = time.monotonic()
                service.process.send_signal(signal.SIGTERM)

                ready = httpx.get(f"{service.url}/readyz", timeout=5)
                assert ready.status_code == 503 and time.monotonic() - signalled < 2.0, ready.text
                refused = httpx.post(f"{service.url}/v1/users/{user['id']}/chat", json={"message": "hi"},
                                     headers=bearer(chat_key), timeout=5)
                assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1, refused.text
                assert "detail" in refused.json()

                rest = [name for name, _ in events]
            assert rest and rest[-1] == "done", rest[-5:]
        assert service.process.wait(timeout=DRAIN_TIMEOUT_S + 15) == 0, service.log()[-5000:]
        assert "draining 1 request(s)" in service.log(), service.log()[-5000:]  # the stream was in flight
    finally:
        stop_cli_service(service)
