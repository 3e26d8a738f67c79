"""The per-tenant rate limit: a token bucket, and 429 with Retry-After from the api."""

from __future__ import annotations

from fastapi.testclient import TestClient

from api.app import create_app
from api.rate_limit import TenantRateLimiter
from support.platform_flows import OPERATOR_TOKEN, bearer, create_tenant


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_refills_at_the_configured_rate():
    clock = FakeClock()
    limiter = TenantRateLimiter(120, clock=clock)  # 2 per second, burst 120
    assert all(limiter.acquire("a") is None for _ in range(120))
    wait = limiter.acquire("a")
    assert wait == 1  # half a second to the next token, rounded up
    assert limiter.acquire("b") is None  # tenants do not share a bucket
    clock.now += 0.5
    assert limiter.acquire("a") is None and limiter.acquire("a") is not None
    clock.now += 3600
    assert sum(limiter.acquire("a") is None for _ in range(200)) == 120  # the burst is capped
    assert TenantRateLimiter(0).acquire("a") is None


def test_api_answers_429_with_retry_after(api_settings):
    settings = api_settings.model_copy(update={"rate_limit_per_minute": 3})
    with TestClient(create_app(settings)) as client:
        _tenant, admin = create_tenant(client, OPERATOR_TOKEN, "rate-limited")
        statuses = [client.get("/v1/api-keys", headers=bearer(admin)).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        refused = client.get("/v1/api-keys", headers=bearer(admin))
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        metrics = client.get("/metrics").text
        assert 'tailor_rejected_requests_total{reason="rate_limit",service="api"} 2.0' in metrics
