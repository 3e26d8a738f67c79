"""``n`` on ``/v1/chat/completions`` through the official ``openai`` client: several choices of one
completion, streamed and not, each reproducible from ``seed + index``, the usage counting the
prompt once, and the later choices reusing the first one's prompt pages from the prefix cache."""

from __future__ import annotations

import re

import httpx
import pytest
from openai import OpenAI

from api.app import create_app
from support.live_server import serve_app
from support.platform_flows import OPERATOR_TOKEN, create_key, create_tenant

PAGE_TOKENS = 16  # EngineConfig's default page size


@pytest.fixture(scope="module")
def server(api_settings):
    with serve_app(create_app(api_settings)) as base_url:
        yield base_url


def _tenant_client(server: str, name: str) -> tuple[str, OpenAI]:
    with httpx.Client(base_url=server, timeout=60) as http:
        tenant, admin = create_tenant(http, OPERATOR_TOKEN, name)
        key = create_key(http, admin, "chat")
    return tenant["id"], OpenAI(base_url=f"{server}/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def oai(server) -> OpenAI:
    return _tenant_client(server, "openai-choices")[1]


def _messages(words: int, topic: str) -> list[dict]:
    return [{"role": "user", "content": " ".join(f"{topic}{i % 7}" for i in range(words))}]


def _hits(server: str, tenant_id: str) -> float:
    """The tenant's prefix-cache hits in tokens, from the api's /metrics (0 before any lookup)."""
    text = httpx.get(f"{server}/metrics", timeout=30).text
    found = re.search(r'^tailor_prefix_cache_hits_tokens_total\{tenant="%s"\} (\S+)$' % re.escape(tenant_id), text,
                      re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_n_choices_are_each_reproducible_from_seed_plus_index_and_count_the_prompt_once(oai):
    options = dict(model="base", messages=_messages(12, "pear"), max_tokens=8, temperature=1.0, seed=1234)
    three = oai.chat.completions.create(n=3, **options)
    assert [c.index for c in three.choices] == [0, 1, 2]
    texts = [c.message.content for c in three.choices]
    alone = [oai.chat.completions.create(**{**options, "seed": 1234 + i}) for i in range(3)]
    assert texts == [a.choices[0].message.content for a in alone]  # choice i samples with seed + i
    assert len(set(texts)) > 1  # the seeds differ, so (on this model, at temperature 1) do the answers
    assert three.usage.prompt_tokens == alone[0].usage.prompt_tokens
    assert three.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    assert three.usage.total_tokens == three.usage.prompt_tokens + three.usage.completion_tokens
    again = oai.chat.completions.create(n=3, **options)
    assert [c.message.content for c in again.choices] == texts


def test_streamed_choices_carry_their_index_and_match_the_unstreamed_ones(oai):
    options = dict(model="base", messages=_messages(10, "plum"), max_tokens=6, temperature=1.0, seed=77, n=2)
    whole = oai.chat.completions.create(**options)
    chunks = list(oai.chat.completions.create(stream=True, stream_options={"include_usage": True}, **options))
    texts, finishes = {0: "", 1: ""}, {}
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason is not None:
            finishes[choice.index] = choice.finish_reason
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert finishes == {c.index: c.finish_reason for c in whole.choices}
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_later_choices_reuse_the_first_ones_prompt_pages(server):
    tenant_id, client = _tenant_client(server, "openai-choices-pages")
    long_prompt = _messages(120, "fig")  # well over 4 pages with the chat template
    first = client.chat.completions.create(model="base", messages=_messages(100, "kiwi"), max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens > 4 * PAGE_TOKENS
    assert _hits(server, tenant_id) == 0  # control: a new prompt finds nothing
    three = client.chat.completions.create(model="base", messages=long_prompt, max_tokens=2, temperature=0, n=3)
    full_pages = three.usage.prompt_tokens // PAGE_TOKENS
    assert full_pages >= 4
    # choices 1 and 2 each found the first choice's full pages (at most one token short of the prompt)
    assert _hits(server, tenant_id) >= 2 * min(full_pages * PAGE_TOKENS, three.usage.prompt_tokens - 1)
    assert len({c.message.content for c in three.choices}) == 1  # greedy: the same answer three times


def test_n_is_bounded_with_a_clear_422(oai):
    import openai

    for n in (0, 9):
        with pytest.raises(openai.UnprocessableEntityError) as refused:
            oai.chat.completions.create(model="base", messages=_messages(3, "fig"), max_tokens=2, n=n)
        (problem,) = refused.value.body["detail"]
        assert problem["loc"] == ["body", "n"], problem
