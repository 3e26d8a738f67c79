"""``RemoteInference``: the api's client of the inference service, with ``InferenceCore``'s interface.

Refusals arrive as ``InferenceError`` before the first event, as in-process: 422 and 429 keep the
service's status, problems and ``Retry-After``, and so does a 503 for a request's first-token
deadline (``reason`` ``"deadline"``: ``InferenceError.deadline``); an unreachable, timed-out, failing or misconfigured
service (connection refused, 5xx, a refused shared secret) is a 503 with ``retry_after`` (5 s
unless the service said otherwise). Once streaming, transport failures become a final ``GenerationFailed``
event instead of an exception, so consumers handle one shape. NDJSON lines become typed events
(``inference.service.events.from_wire``) here, at the edge.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from urllib.parse import quote

import httpx

from inference.service.events import (
    GenerationEnded,
    GenerationEvent,
    GenerationFailed,
    MalformedEvent,
    from_wire,
    is_terminal,
    run_to_end,
)
from inference.service.protocol import (
    DEADLINE_REASON,
    SECRET_HEADER,
    AdapterSpec,
    GenerateRequest,
    InferenceError,
    PrefetchRequest,
)

log = logging.getLogger(__name__)

UNAVAILABLE_RETRY_AFTER_S = 5
UNREACHABLE_REASON = "unreachable"  # InferenceError.reason when the service did not answer
PASSED_THROUGH = (422, 429)  # statuses the caller's caller should see as they are
READY_TIMEOUT_S = 5.0  # a readiness probe that takes longer counts as not ready


def _problems(response: httpx.Response) -> list[str]:
    """The ``detail`` of an error answer as a list of strings (FastAPI's validation entries
    become ``"body.field: message"``)."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        text = response.text.strip()
        return [text[:500] or f"HTTP {response.status_code}"]
    if isinstance(detail, str):
        return [detail]
    if not isinstance(detail, list) or not detail:
        return [f"HTTP {response.status_code}"]
    problems = []
    for item in detail:
        if isinstance(item, dict):
            where = ".".join(str(part) for part in item.get("loc", ()))
            problems.append(f"{where}: {item.get('msg', item)}" if where else str(item.get("msg", item)))
        else:
            problems.append(str(item))
    return problems


def _retry_after(response: httpx.Response) -> int | None:
    """``Retry-After`` in whole seconds, or None when absent or not a number of seconds."""
    value = response.headers.get("Retry-After")
    try:
        return max(0, int(value)) if value is not None else None
    except ValueError:
        return None


def _reason(response: httpx.Response) -> str | None:
    """The ``reason`` of an error answer's JSON body (``"deadline"``), or None."""
    try:
        reason = response.json().get("reason")
    except (ValueError, AttributeError):
        return None
    return reason if isinstance(reason, str) else None


def error_from_response(response: httpx.Response) -> InferenceError:
    """The InferenceError a non-success answer of the service stands for (see the module doc)."""
    problems = _problems(response)
    retry_after = _retry_after(response)
    if response.status_code in PASSED_THROUGH:
        return InferenceError(response.status_code, problems, retry_after)
    if response.status_code == 503 and _reason(response) == DEADLINE_REASON:  # the request's own deadline
        return InferenceError.deadline(problems, retry_after if retry_after is not None else 1)
    if response.status_code in (401, 403):
        log.error("the inference service refused the shared secret (TAILOR_INFERENCE_SECRET differs)")
    message = f"the inference service answered {response.status_code}: {'; '.join(problems)}"
    return InferenceError.unavailable(message, retry_after if retry_after is not None else UNAVAILABLE_RETRY_AFTER_S)


def _unreachable(exc: httpx.HTTPError) -> InferenceError:
    """A 503 with ``reason`` ``"unreachable"``: the service did not answer at all (a router takes
    such a replica out of its ring; a 503 the service sent does not mean that)."""
    return InferenceError(503, f"the inference service is unreachable: {type(exc).__name__}: {exc}",
                          UNAVAILABLE_RETRY_AFTER_S, UNREACHABLE_REASON)


def rendezvous_order(key: str, nodes: Sequence[str]) -> list[str]:
    """``nodes`` ordered by rendezvous (highest-random-weight) hashing of ``key``: each node's
    weight is a hash of (node, key), highest first. The first node is the key's home; removing a
    node moves only the keys it was home to, each to its next node in this order. Deterministic
    across processes (BLAKE2b, not Python's salted ``hash``), so every api process and worker
    agrees on the homes."""

    def weight(node: str) -> bytes:
        return hashlib.blake2b(f"{node}\x00{key}".encode(), digest_size=8).digest()

    return sorted(nodes, key=weight, reverse=True)


class RemoteEventStream:
    """The typed events of one streamed generation.

    Ends after the last event (ended or failed); a malformed line, a broken connection or a stream
    that stops early yields one final ``GenerationFailed``. ``aclose()`` (also safe before
    iterating) closes the HTTP response; the service then closes its ``GenerationStream``, which
    aborts the request if it had not finished.
    """

    def __init__(self, response: httpx.Response):
        self._response = response
        self._lines = response.aiter_lines()
        self._done = False
        self.broken = False  # the connection failed or stopped early (not an engine error)

    def __aiter__(self) -> RemoteEventStream:
        return self

    async def __anext__(self) -> GenerationEvent:
        if self._done:
            raise StopAsyncIteration
        try:
            line = await self._next_line()
        except httpx.HTTPError as exc:
            self.broken = True
            return await self._fail(f"the inference stream broke: {type(exc).__name__}: {exc}")
        if line is None:
            self.broken = True
            return await self._fail("the inference stream ended without an end event")
        try:
            event = from_wire(json.loads(line))
        except (ValueError, MalformedEvent):
            return await self._fail(f"malformed event from the inference service: {line[:200]!r}")
        if is_terminal(event):
            await self.aclose()
        return event

    async def _next_line(self) -> str | None:
        """The next non-blank line, or None at the end of the body."""
        async for line in self._lines:
            if line.strip():
                return line
        return None

    async def _fail(self, message: str) -> GenerationFailed:
        log.warning("%s", message)
        await self.aclose()
        return GenerationFailed(message)

    async def aclose(self) -> None:
        """Stop reading and close the response (idempotent)."""
        self._done = True
        try:
            await self._lines.aclose()  # type: ignore[attr-defined]
        finally:
            await self._response.aclose()


class RemoteInference:
    """Talks to the inference service at ``base_url``; same async interface as InferenceCore.

    ``timeout_s`` bounds every network wait (connecting, and the gap between two streamed events).
    """

    def __init__(self, base_url: str, secret: str, timeout_s: float = 300.0, *,
                 transport: httpx.AsyncBaseTransport | None = None):
        """``transport``: an httpx transport to use instead of the network (tests)."""
        self.base_url = base_url.rstrip("/")
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers={SECRET_HEADER: secret},
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
            # the service bounds its own queue (429); the client should not add a second queue
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            transport=transport,
        )

    # ------------------------------------------------------------------ generation
    async def start(self, req: GenerateRequest) -> RemoteEventStream:
        """Submit ``req``; return its events (raises InferenceError before the first one).
        Closing the returned stream aborts the request on the service."""
        request = self._client.build_request(
            "POST", "/internal/generate", content=req.model_dump_json(), headers={"Content-Type": "application/json"}
        )
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise _unreachable(exc) from exc
        if response.status_code != 200:
            try:
                await response.aread()
            except httpx.HTTPError:
                pass
            finally:
                await response.aclose()
            raise error_from_response(response)
        return RemoteEventStream(response)

    async def generate(self, req: GenerateRequest) -> GenerationEnded:
        """Run ``req`` to the end and return its ``GenerationEnded`` (InferenceError 503 if it failed)."""
        return await run_to_end(await self.start(req))

    # ------------------------------------------------------------------ adapters
    async def prefetch(self, spec: AdapterSpec) -> str:
        """Ask the service to load ``spec`` ahead of use; returns the tier (``device``/``host``)."""
        body = PrefetchRequest(adapter=spec).model_dump_json()
        response = await self._call("POST", "/internal/adapters/prefetch", content=body,
                                    headers={"Content-Type": "application/json"})
        return response.json()["tier"]

    async def drop_adapter(self, adapter_id: str, timeout: float | None = 60.0) -> bool:
        """Make the service forget ``adapter_id`` once its in-flight requests finish (False when
        it was not loaded). Raises TimeoutError if they take over ``timeout`` seconds."""
        params = {"timeout_s": timeout} if timeout is not None else None
        path = "/internal/adapters/" + quote(adapter_id, safe="")
        response = await self._call("DELETE", path, params=params, accept=(200, 409))
        if response.status_code == 409:
            raise TimeoutError("; ".join(_problems(response)))
        return bool(response.json()["dropped"])

    async def _call(self, method: str, path: str, *, accept: tuple[int, ...] = (200,), **kwargs) -> httpx.Response:
        """One non-streamed request; statuses outside ``accept`` raise InferenceError."""
        try:
            response = await self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise _unreachable(exc) from exc
        if response.status_code not in accept:
            raise error_from_response(response)
        return response

    # ------------------------------------------------------------------ health
    async def is_ready(self) -> bool:
        """True when the service answers ``/readyz`` with 200 within ``READY_TIMEOUT_S``; False on
        any error."""
        try:
            response = await self._client.get("/readyz", timeout=READY_TIMEOUT_S)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()
