"""The prefix cache through the platform (embedded mode): a user's next turn reuses the pages of the
turn before, and a tenant with the very same system prompt reuses nothing of another tenant's, read
from the counters a Prometheus scrape of /metrics sees."""

from __future__ import annotations

import uuid

from prometheus_client.parser import text_string_to_metric_families

from support.platform_flows import OPERATOR_TOKEN, bearer, chat, create_key, create_tenant, create_user

SYSTEM_PROMPT = "You answer as a patient librarian who knows every book in the building. " * 6


def _counters(client) -> dict[tuple[str, str], float]:
    """{(metric, tenant): value} for the prefix-cache counters on /metrics."""
    values = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name in ("tailor_prefix_cache_queries_tokens", "tailor_prefix_cache_hits_tokens"):
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    values[(family.name, sample.labels["tenant"])] = sample.value
    return values


def _tenant(client, name: str):
    tenant, admin = create_tenant(client, OPERATOR_TOKEN, f"{name}-{uuid.uuid4().hex[:8]}", system_prompt=SYSTEM_PROMPT)
    return tenant["id"], create_key(client, admin, "chat"), create_user(client, admin, f"user-{name}")["id"]


def test_a_second_turn_hits_and_another_tenant_with_the_same_prompt_does_not(client):
    a_id, a_key, a_user = _tenant(client, "cache-a")
    b_id, b_key, b_user = _tenant(client, "cache-b")
    assert chat(client, a_key, a_user, "Where are the atlases?").status_code == 200
    first = _counters(client)
    assert first.get(("tailor_prefix_cache_hits_tokens", a_id), 0) == 0
    assert first[("tailor_prefix_cache_queries_tokens", a_id)] > 0

    # the second turn resends system prompt + first exchange: most of it comes from the cache
    assert chat(client, a_key, a_user, "And the dictionaries?").status_code == 200
    second = _counters(client)
    queried = second[("tailor_prefix_cache_queries_tokens", a_id)] - first[("tailor_prefix_cache_queries_tokens", a_id)]
    hits = second[("tailor_prefix_cache_hits_tokens", a_id)]
    assert hits > 0.5 * queried, (hits, queried)

    # tenant b, identical system prompt and first message: nothing of a's is reused
    assert chat(client, b_key, b_user, "Where are the atlases?").status_code == 200
    third = _counters(client)
    assert third[("tailor_prefix_cache_queries_tokens", b_id)] > 0
    assert third.get(("tailor_prefix_cache_hits_tokens", b_id), 0) == 0
    assert third[("tailor_prefix_cache_hits_tokens", a_id)] == hits
