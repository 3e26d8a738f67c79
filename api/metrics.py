"""Prometheus metrics of the api (names in docs/observability.md) and the ``/metrics`` route.

Labels stay bounded: the route *template* (``/v1/users/{user_id}/chat``, never the raw path),
the tenant id (tenants are few), never user or adapter ids. Tenant names are not labels of the
traffic metrics (a name could change, an id never does): ``tailor_tenant_info{tenant,
tenant_name} 1`` maps ids to names, and dashboards join it (``* on(tenant)
group_left(tenant_name) tailor_tenant_info``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

SERVICE = "api"
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
REJECTION_BY_STATUS = {400: "validation", 401: "auth", 403: "auth", 413: "too_large", 422: "validation",
                       429: "overload", 503: "unavailable"}
TENANT_KINDS = {"/v1/users/{user_id}/chat": "chat", "/v1/users/{user_id}/messages": "chat",
                "/v1/chat/completions": "openai", "/v1/models": "openai"}
TENANT_NAMES_REFRESH_S = 60.0


class TenantNames:
    """The ``tailor_tenant_info{tenant, tenant_name} 1`` series: one per tenant, id to name.

    Kept out of the request path: this process sets a name when it creates the tenant, and the
    whole map is reloaded from the database in a background thread at most every ``refresh_s``
    seconds, started by a scrape (so the first scrape after start fills it, and tenants that other
    api processes created appear within a minute). A scrape never waits for the database; if
    the database is down, the last known names stay.
    """

    def __init__(self, refresh_s: float = TENANT_NAMES_REFRESH_S):
        self.refresh_s = refresh_s
        self._names: dict[str, str] = {}
        self._lock = threading.Lock()
        self._loaded_at: float | None = None
        self._loading = False

    def set(self, tenant_id: str, name: str) -> None:
        """Record one tenant's name (a tenant this process just created)."""
        with self._lock:
            self._names = {**self._names, tenant_id: name}

    def replace(self, names: Mapping[str, str]) -> None:
        """Replace the whole map (a reload from the database)."""
        with self._lock:
            self._names = dict(names)

    def refresh_in_background(self, load: Callable[[], Mapping[str, str]]) -> None:
        """Start a thread that replaces the map with ``load()``, unless one runs or the last load
        is younger than ``refresh_s`` seconds."""
        with self._lock:
            due = self._loaded_at is None or time.monotonic() - self._loaded_at >= self.refresh_s
            if self._loading or not due:
                return
            self._loading = True
        threading.Thread(target=self._reload, args=(load,), name="tenant-names", daemon=True).start()

    def _reload(self, load: Callable[[], Mapping[str, str]]) -> None:
        try:
            self.replace(load())
        except Exception as exc:  # the database may be down: keep the last names, try again later
            log.warning("could not reload tenant names for tailor_tenant_info: %s", exc)
        finally:
            with self._lock:
                self._loading = False
                self._loaded_at = time.monotonic()

    def describe(self) -> list[GaugeMetricFamily]:
        return [self._family()]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = self._family()
        for tenant_id, name in sorted(self._names.items()):
            family.add_metric([tenant_id, name], 1)
        yield family

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily("tailor_tenant_info", "1 per tenant: the name (tenant_name) of each tenant id (tenant).",
                                 labels=["tenant", "tenant_name"])


def load_tenant_names(session_factory) -> dict[str, str]:
    """Every tenant's id and name, read from the metadata database (an operator-level query)."""
    from tenants.repositories import tenant_names

    with session_factory() as session:
        return tenant_names(session)


class ApiMetrics:
    """The api's metric objects in their own registry (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("tailor_http_requests", "HTTP requests by route template, method and status.",
                                ["service", "route", "method", "status"], registry=self.registry)
        self.duration = Histogram("tailor_http_request_duration_seconds", "HTTP request latency (until the body ends).",
                                  ["service", "route", "method"], buckets=DURATION_BUCKETS, registry=self.registry)
        self.tenant_requests = Counter("tailor_tenant_requests", "Authenticated requests per tenant and kind.",
                                       ["tenant", "kind"], registry=self.registry)
        self.tenant_tokens = Counter("tailor_tenant_tokens", "Tokens per tenant (prompt or completion).",
                                     ["tenant", "direction"], registry=self.registry)
        self.rejected = Counter("tailor_rejected_requests", "Requests refused, by reason.", ["service", "reason"],
                                registry=self.registry)
        for reason in sorted(set(REJECTION_BY_STATUS.values()) | {"rate_limit", "tenant_concurrency", "deadline"}):
            self.rejected.labels(SERVICE, reason)
        self.tenant_names = TenantNames()
        self.registry.register(self.tenant_names)

    def count_tokens(self, tenant_id: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.tenant_tokens.labels(tenant_id, "prompt").inc(prompt_tokens)
        self.tenant_tokens.labels(tenant_id, "completion").inc(completion_tokens)


class MetricsMiddleware:
    """Counts and times every HTTP request by route template; counts rejections and tenant traffic."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            self._record(scope, status, time.perf_counter() - started)

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        method = scope.get("method", "")
        m = self.metrics
        m.requests.labels(SERVICE, template, method, str(status)).inc()
        m.duration.labels(SERVICE, template, method).observe(seconds)
        state = scope.get("state") or {}
        reason = state.get("reject_reason") or REJECTION_BY_STATUS.get(status)
        if reason is not None:
            m.rejected.labels(SERVICE, reason).inc()
        tenant = state.get("tenant_id")
        if tenant is not None:
            m.tenant_requests.labels(tenant, TENANT_KINDS.get(template, "admin")).inc()


router = APIRouter(tags=["health"])


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """Prometheus text format: the api's registry, the in-process engine's (embedded default) and
    the process-wide default registry (process metrics, in-process task metrics)."""
    registries = [request.app.state.metrics.registry, REGISTRY]
    state = getattr(request.app.state, "tailor", None)
    if state is not None:
        factory = state.platform.session_factory
        request.app.state.metrics.tenant_names.refresh_in_background(lambda: load_tenant_names(factory))
    engine_metrics = getattr(getattr(state, "inference", None), "metrics", None)
    if engine_metrics is not None:
        registries.insert(1, engine_metrics.registry)
    body = b"".join(generate_latest(r) for r in registries)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
