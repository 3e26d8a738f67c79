"""The per-tenant rate limit: a token bucket per process or a count shared in Redis, and 429 with
Retry-After from the api."""

from __future__ import annotations

import time
import uuid

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.rate_limit import RedisRateLimiter, TenantRateLimiter, make_rate_limiter
from support.platform_flows import OPERATOR_TOKEN, bearer, create_tenant
from support.service_fixtures import free_ports
from tenants.settings import Settings


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


# --- shared in Redis (TAILOR_RATE_LIMIT_STORAGE=redis) -------------------------------------------

def test_two_api_processes_share_one_count_in_redis(redis_url):
    """Two limiters stand for two api processes: together they let ``rate`` requests through per
    tenant and minute, not ``rate`` each; the refusal names the seconds until the window has room."""
    tenant, other = f"t-{uuid.uuid4()}", f"t-{uuid.uuid4()}"
    first, second = RedisRateLimiter(3, redis_url), RedisRateLimiter(3, redis_url)
    assert [first.acquire(tenant), second.acquire(tenant), first.acquire(tenant)] == [None, None, None]
    for limiter in (first, second):
        wait = limiter.acquire(tenant)
        assert wait is not None and 1 <= wait <= 60
    assert second.acquire(other) is None  # tenants do not share a count
    assert RedisRateLimiter(0, redis_url).acquire(tenant) is None  # 0 disables the limit


def test_unreachable_redis_lets_requests_through():
    (port,) = free_ports(1)  # nothing listens there
    limiter = RedisRateLimiter(1, f"redis://127.0.0.1:{port}/0")
    started = time.monotonic()
    assert [limiter.acquire("a") for _ in range(3)] == [None, None, None]
    assert time.monotonic() - started < 10


def test_settings_pick_the_limiter(redis_url):
    assert isinstance(make_rate_limiter(Settings()), TenantRateLimiter)  # the embedded default: no Redis
    shared = Settings(rate_limit_storage="redis", redis_url=redis_url)
    assert isinstance(make_rate_limiter(shared), RedisRateLimiter)
    with pytest.raises(ValueError, match="rate_limit_storage"):
        Settings(rate_limit_storage="memcached")


def test_api_processes_answer_429_from_the_shared_count(api_settings, redis_url):
    settings = api_settings.model_copy(update={"rate_limit_per_minute": 3, "rate_limit_storage": "redis",
                                               "redis_url": redis_url})
    with TestClient(create_app(settings)) as one, TestClient(create_app(settings)) as two:
        _tenant, admin = create_tenant(one, OPERATOR_TOKEN, f"shared-limit-{uuid.uuid4().hex[:8]}")
        statuses = [client.get("/v1/api-keys", headers=bearer(admin)).status_code for client in (one, two, one, two)]
        assert statuses == [200, 200, 200, 429]
        refused = one.get("/v1/api-keys", headers=bearer(admin))
        assert refused.status_code == 429 and 1 <= int(refused.headers["Retry-After"]) <= 60
        assert 'tailor_rejected_requests_total{reason="rate_limit",service="api"} 1.0' in one.get("/metrics").text
