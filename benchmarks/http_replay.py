"""Open-loop replay of a trace against the running service over HTTP, streamed, so that first-token
latency is what a client sees (the api, its database work, the inference service and the network
stack included).

Each trace request becomes one streamed ``POST /v1/chat/completions`` (the OpenAI-compatible
endpoint), sent at its arrival time whatever is still running: the prompt's token ids decoded to
text as the user message, ``model`` the adapter's name (``base`` for none), greedy, ``max_tokens``
the trace's output length, ``stream_options.include_usage`` for the token counts, and a
``logit_bias`` of -100 on the end-of-sequence ids, so that every answer has the trace's length as in
the in-process replay (``ignore_eos``). The prompt the engine sees is the chat template around that
text (and the tenant's system prompt, none here), so prompt lengths differ a little from the trace's.

Timing per request (``benchmarks.open_loop.RequestTiming``), from its scheduled arrival: the first
token when the first chunk with text arrives (not the role chunk, which is sent before any token),
the last when the stream's ``[DONE]`` arrives. A non-200 answer, an ``error`` chunk or a broken
stream count as failed.

:class:`LocalService` starts ``tailor serve`` (the embedded default) on loopback for the
benchmark; :func:`create_tenant` and :func:`upload_adapter` set a tenant up through the public API.
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks.live_server import free_port, start_server, stop_server, wait_ready
from benchmarks.open_loop import RequestTiming
from benchmarks.trace import Trace
from benchmarks.workload import BenchRequest

OPERATOR_TOKEN = "op_benchmark_http_replay_0123456789"
# a benchmark measures the engine, not the per-tenant guards in front of it
SERVER_SETTINGS = {
    "TAILOR_RATE_LIMIT_PER_MINUTE": "0",
    "TAILOR_MAX_CONCURRENT_PER_TENANT": "0",
    "TAILOR_MAX_WAITING": "1000000",
    "TAILOR_CLEANUP_INTERVAL_S": "0",
    "TAILOR_DRAIN_TIMEOUT_S": "5",
    "TAILOR_OPERATOR_TOKEN": OPERATOR_TOKEN,
}


@dataclass(frozen=True)
class TenantKeys:
    """A tenant on a running service: its id, an admin key and a chat key."""

    base: str
    tenant_id: str
    admin_key: str
    chat_key: str


def bearer(key: str) -> dict[str, str]:
    """The Authorization header of ``key``."""
    return {"Authorization": f"Bearer {key}"}


def json_ok(response: httpx.Response) -> dict:
    """The JSON body of a 2xx answer; RuntimeError naming the call, the status and the body otherwise."""
    if response.status_code >= 300:
        raise RuntimeError(f"{response.request.method} {response.request.url.path} answered "
                           f"{response.status_code}: {response.text[:500]}")
    return response.json()


def create_tenant(base: str, name: str, operator_token: str = OPERATOR_TOKEN, system_prompt: str | None = None,
                  timeout_s: float = 30.0) -> TenantKeys:
    """Create a tenant (operator token) and a chat key for it."""
    body = {"name": name} if system_prompt is None else {"name": name, "system_prompt": system_prompt}
    tenant = json_ok(httpx.post(f"{base}/v1/tenants", json=body, headers=bearer(operator_token), timeout=timeout_s))
    chat = json_ok(httpx.post(f"{base}/v1/api-keys", json={"scope": "chat"}, headers=bearer(tenant["api_key"]),
                          timeout=timeout_s))
    return TenantKeys(base, tenant["id"], tenant["api_key"], chat["api_key"])


def zip_folder(folder: Path) -> bytes:
    """The files of ``folder`` (not its subfolders) as an uncompressed zip."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as zf:
        for path in sorted(Path(folder).iterdir()):
            if path.is_file():
                zf.write(path, path.name)
    return buffer.getvalue()


def upload_adapter(tenant: TenantKeys, name: str, peft_dir: Path, timeout_s: float = 300.0) -> str:
    """Upload the PEFT adapter in ``peft_dir`` as ``name`` and wait until it is ready; its id."""
    files = [("files", (f"{name}.zip", zip_folder(peft_dir), "application/zip"))]
    adapter = json_ok(httpx.post(f"{tenant.base}/v1/adapters", data={"name": name}, files=files,
                             headers=bearer(tenant.admin_key), timeout=timeout_s))
    deadline = time.monotonic() + timeout_s
    while adapter["status"] == "pending":
        if time.monotonic() > deadline:
            raise TimeoutError(f"adapter {name} still pending after {timeout_s} s")
        time.sleep(0.05)
        adapter = json_ok(httpx.get(f"{tenant.base}/v1/adapters/{adapter['id']}", headers=bearer(tenant.admin_key),
                                timeout=30.0))
    if adapter["status"] != "ready":
        raise RuntimeError(f"adapter {name} is {adapter['status']}: {adapter.get('error')}")
    return adapter["id"]


class LocalService:
    """``tailor serve`` on a free loopback port with ``settings`` (plus :data:`SERVER_SETTINGS`),
    its data in a temporary folder; ``base`` is its URL. A context manager: stopped on exit, and the
    tail of its log printed if the block raised."""

    def __init__(self, settings: dict[str, str]):
        self.settings = {**SERVER_SETTINGS, **settings}
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._tmp = tempfile.TemporaryDirectory(prefix="tailor-bench-http-")
        self.process = None

    def __enter__(self) -> LocalService:
        self.process = start_server(self.settings, Path(self._tmp.name), self.port, inherit_tailor_env=False)
        try:
            wait_ready(self.base, self.process)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                log = Path(self._tmp.name, "server.log").read_text(errors="replace")
                print("--- server log (tail) ---\n" + log[-3000:], file=sys.stderr)
        finally:
            if self.process is not None:
                stop_server(self.process)
                self.process = None
            self._tmp.cleanup()


async def _one(client: httpx.AsyncClient, chat_key: str, body: dict, timing: RequestTiming, arrival: float) -> None:
    """Stream one completion into ``timing`` (times from ``arrival``, monotonic seconds)."""
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body, headers=bearer(chat_key)) as r:
            if r.status_code != 200:
                timing.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    timing.latency_s = time.monotonic() - arrival
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    timing.error = str(chunk["error"])[:300]
                    return
                if chunk.get("usage"):
                    timing.output_tokens = chunk["usage"]["completion_tokens"]
                choices = chunk.get("choices") or []
                if timing.first_token_s is None and choices and choices[0].get("delta", {}).get("content"):
                    timing.first_token_s = time.monotonic() - arrival
            timing.error = "the stream ended without [DONE]"
    except (httpx.HTTPError, ValueError) as exc:
        timing.error = f"{type(exc).__name__}: {exc}"


async def replay_http(base: str, chat_key: str, trace: Trace, model_of: Callable[[BenchRequest], str],
                      prompt_text: Callable[[BenchRequest], str], eos_ids: list[int],
                      progress: Callable[[int], None] | None = None, timeout_s: float = 3600.0) -> list[RequestTiming]:
    """Send every request of ``trace`` at its arrival time (see the module docstring) and wait for
    all of them. ``model_of(request)`` is the ``model`` field, ``prompt_text(request)`` the user
    message; ``progress(1)`` is called as each request ends."""
    timings = [RequestTiming(r.index, r.arrival_time) for r in trace.requests]
    bias = {str(i): -100 for i in eos_ids}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    timeout = httpx.Timeout(timeout_s, connect=30.0)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=timeout) as client:
        start = time.monotonic()

        async def send(request: BenchRequest, timing: RequestTiming) -> None:
            arrival = start + request.arrival_time
            await asyncio.sleep(max(0.0, arrival - time.monotonic()))
            body = {"model": model_of(request), "messages": [{"role": "user", "content": prompt_text(request)}],
                    "max_tokens": request.output_len, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}, "logit_bias": bias}
            await _one(client, chat_key, body, timing, arrival)
            if progress is not None:
                progress(1)

        await asyncio.wait_for(asyncio.gather(*(send(r, t) for r, t in zip(trace.requests, timings))),
                               timeout_s + trace.duration_s)
    return timings
