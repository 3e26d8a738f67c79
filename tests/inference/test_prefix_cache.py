"""The prefix cache (inference.prefix_cache) on the engine: reuse, isolation by tenant and adapter
version (through the counters and through timing), sharing by reference count, the eviction order
against adapters and preemption, and outputs identical to the engine without it."""

from __future__ import annotations

import random
import statistics
import time

import pytest

from inference.engine import LLMEngine
from inference.engine_config import EngineConfig
from inference.model_config import ModelConfig
from inference.request import Request
from inference.sampling import SamplingParams
from support.adapters import synthetic_adapter
from support.engine_helpers import run_to_completion

PAGE = 4
TINY_PAGE_BYTES = PAGE * 2 * 32 * 2 * 4  # tokens * (K and V) * kv width * layers * fp32 bytes


def _greedy(n: int = 4) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=0)


def _engine(checkpoint, cache: bool = True, **options) -> LLMEngine:
    config = {"page_tokens": PAGE, "cpu_pool_bytes": 8 << 20, "max_num_batched_tokens": 64, **options}
    return LLMEngine(checkpoint, EngineConfig(enable_prefix_cache=cache, **config))


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 49152) for _ in range(n)]


def _run(engine: LLMEngine, prompt: list[int], tenant=None, adapter=None, max_tokens: int = 4) -> Request:
    request = engine.request_from_ids(prompt, _greedy(max_tokens), None, adapter, tenant=tenant)
    engine.add(request)
    run_to_completion(engine)
    return request


def _hits(engine: LLMEngine, tenant) -> int:
    counts = engine.prefix_cache.stats.get(tenant)
    return 0 if counts is None else counts.hits


def test_a_request_reuses_the_cached_prefix_and_computes_only_the_rest(tiny_checkpoint):
    rng = random.Random(random.getrandbits(64))
    engine = _engine(tiny_checkpoint)
    shared = _tokens(rng, 37)  # 9 full pages and one token
    _run(engine, shared + _tokens(rng, 3), tenant="a")
    assert _hits(engine, "a") == 0
    before = engine.stats.prompt_tokens
    second = _run(engine, shared + _tokens(rng, 5), tenant="a")
    assert _hits(engine, "a") == 36  # the 9 full pages of the shared part
    assert engine.stats.prompt_tokens - before == len(second.prompt_token_ids) - 36
    assert engine.prefix_cache.stats["a"].queries == 40 + 42


def test_the_last_token_is_always_computed(tiny_checkpoint):
    """A prompt that is entirely cached (a whole number of pages) still computes its last page's
    last token, so the step has logits to sample from."""
    rng = random.Random(random.getrandbits(64))
    engine = _engine(tiny_checkpoint)
    prompt = _tokens(rng, 24)
    first = _run(engine, prompt, tenant="a")
    second = _run(engine, prompt, tenant="a")
    assert _hits(engine, "a") == 20
    assert second.output_token_ids == first.output_token_ids


def test_outputs_match_the_engine_without_the_cache(tiny_checkpoint):
    """Greedy tokens equal and log-probs within 1e-4 for conversations that extend each other,
    including generated tokens that the next turn sends back as prompt, under chunked prefill."""
    seed = random.getrandbits(64)
    results = []
    for cache in (True, False):
        rng = random.Random(seed)
        engine = _engine(tiny_checkpoint, cache, max_num_batched_tokens=16)
        history = _tokens(rng, 30)
        turns = []
        for _ in range(5):
            request = _run(engine, history, tenant="t", max_tokens=6)
            turns.append((request.output_token_ids, request.output_logprobs))
            history = history + request.output_token_ids + _tokens(rng, rng.randint(1, 9))
        results.append((turns, _hits(engine, "t")))
    (cached, hits), (plain, no_hits) = results
    assert hits > 0 and no_hits == 0
    for (tokens_a, logprobs_a), (tokens_b, logprobs_b) in zip(cached, plain):
        assert tokens_a == tokens_b
        assert max(abs(a - b) for a, b in zip(logprobs_a, logprobs_b)) < 1e-4


@pytest.fixture(scope="module")
def adapters(tiny_checkpoint, tmp_path_factory):
    config = ModelConfig.from_checkpoint(tiny_checkpoint)
    folder = tmp_path_factory.mktemp("adapters")
    return [synthetic_adapter(folder / f"a{i}", config, r=4, targets=("q_proj", "k_proj", "v_proj", "down_proj"),
                              alpha=8.0, seed=i, std=0.3) for i in range(2)]


def test_no_reuse_across_tenants_adapters_or_adapter_versions(tiny_checkpoint, adapters):
    """The same tokens under another tenant, another adapter, another version of the same adapter,
    or the base model are other pages; only the same tenant and version hits."""
    rng = random.Random(random.getrandbits(64))
    engine = _engine(tiny_checkpoint)
    engine.adapters.register_dir("x", adapters[0])
    engine.adapters.register_dir("y", adapters[1])
    prompt = _tokens(rng, 21)
    _run(engine, prompt, tenant="a", adapter="x")
    for tenant, adapter in (("b", "x"), ("a", "y"), ("a", None), (None, "x")):
        _run(engine, prompt, tenant=tenant, adapter=adapter)
    assert all(counts.hits == 0 for counts in engine.prefix_cache.stats.values())
    _run(engine, prompt, tenant="a", adapter="x")
    assert _hits(engine, "a") == 20
    engine.adapters.register_dir("x", adapters[0], new_version=True)  # same weights, a new version
    _run(engine, prompt, tenant="a", adapter="x")
    assert _hits(engine, "a") == 20


def test_another_tenant_gets_no_timing_advantage(bundled_checkpoint):
    """The cache must not open a timing channel across tenants: tenant b sending exactly what
    tenant a sent (a long shared prompt) waits as long as a cold request, while a's own repeat is
    several times faster. Medians of 3 prompts each; the margins are wide (about 10x on 2 cores)."""
    rng = random.Random(random.getrandbits(64))
    engine = LLMEngine(bundled_checkpoint, EngineConfig(page_tokens=16, cpu_pool_bytes=256 << 20,
                                                        max_num_batched_tokens=1024))

    def first_token_seconds(prompt, tenant) -> float:
        request = engine.request_from_ids(prompt, _greedy(1), None, None, tenant=tenant)
        engine.add(request)
        started = time.perf_counter()
        while not request.output_token_ids:
            engine.step()
        return time.perf_counter() - started

    first_token_seconds(_tokens(rng, 64), "warm-up")
    cold, warm, other = [], [], []
    for _ in range(3):
        prompt = _tokens(rng, 700)
        cold.append(first_token_seconds(prompt, "a"))
        warm.append(first_token_seconds(prompt, "a"))
        other.append(first_token_seconds(prompt, "b"))
    cold_s, warm_s, other_s = (statistics.median(x) for x in (cold, warm, other))
    assert cold_s > 3 * warm_s, f"the cache does not help its own tenant: cold {cold_s:.3f} s, warm {warm_s:.3f} s"
    assert other_s > 3 * warm_s, f"tenant b got a's cached pages: {other_s:.3f} s against a's {warm_s:.3f} s"
    assert _hits(engine, "b") == 0 and _hits(engine, "a") == 3 * 688


def test_shared_pages_survive_an_abort_and_every_page_is_accounted(tiny_checkpoint):
    """Requests drawn from a few shared prefixes, started, aborted and preempted at random (one
    trace, fixed in advance, replayed on both engines): at every step the pool's KV pages are
    exactly the distinct pages live requests hold, idle cached pages plus those add up to the pool,
    and every request that finished on both engines has the same tokens."""
    seed = random.getrandbits(64)
    rng = random.Random(seed)
    prefixes = [_tokens(rng, rng.randint(8, 24)) for _ in range(3)]
    trace: list[tuple[str, object]] = []  # per step: ("add", (prompt, max_tokens)), ("abort", step) or ("", None)
    for step in range(300):
        if rng.random() < 0.3:
            trace.append(("add", (rng.choice(prefixes) + _tokens(rng, rng.randint(1, 6)), rng.randint(1, 12))))
        elif rng.random() < 0.05:
            trace.append(("abort", rng.randrange(step + 1)))  # the request added at that step, if any
        else:
            trace.append(("", None))
    finals = []
    for cache in (True, False):
        engine = _engine(tiny_checkpoint, cache, pool_bytes=12 * TINY_PAGE_BYTES, max_num_batched_tokens=32)
        aborted: set[str] = set()
        final: dict[str, list[int]] = {}
        for step, (action, arg) in enumerate(trace):
            if action == "add" and engine.num_waiting + engine.num_running < 8:
                prompt, max_tokens = arg
                engine.add(engine.request_from_ids(prompt, _greedy(max_tokens), f"r{step}", None, tenant="t"))
            elif action == "abort" and engine.abort(f"r{arg}") is not None:
                aborted.add(f"r{arg}")
            for out in engine.step():
                if out.finished:
                    final[out.request_id] = out.token_ids
            held = {p for r in list(engine.scheduler.running) + list(engine.scheduler.waiting) for p in r.kv_pages}
            occupancy = engine.pool.occupancy()
            assert occupancy.kv == len(held), f"seed {seed} step {step}"
            assert occupancy.free + occupancy.kv + occupancy.cached == occupancy.total
        final.update({rid: out.token_ids for rid, out in run_to_completion(engine).items()})
        finals.append((engine, {rid: tokens for rid, tokens in final.items() if rid not in aborted}))
    (cached, cached_final), (plain, plain_final) = finals
    assert _hits(cached, "t") > 0 and cached.scheduler.num_preemptions > 0, \
        f"seed {seed}: the trace never shared or never filled the pool"
    assert cached.pool.occupancy().kv == 0
    both = cached_final.keys() & plain_final.keys()
    assert len(both) >= 10, f"seed {seed}: too few requests finished on both engines"
    assert {rid: cached_final[rid] for rid in both} == {rid: plain_final[rid] for rid in both}, f"seed {seed}"


def test_idle_cached_pages_go_before_idle_adapters_and_before_preemption(tiny_checkpoint, adapters):
    """A pool full of idle cached pages and one idle adapter: a new request takes cached pages
    (tails first, so the head of the chain still hits) and leaves the adapter resident."""
    rng = random.Random(random.getrandbits(64))
    engine = _engine(tiny_checkpoint, pool_bytes=40 * TINY_PAGE_BYTES)
    engine.adapters.register_dir("x", adapters[0])
    _run(engine, _tokens(rng, 5), adapter="x")  # leaves one idle cached page
    assert engine.adapters.resident_counts()[1] == 1
    num_pages = engine.pool.num_pages
    adapter_pages = engine.pool.occupancy().adapter
    prompt = _tokens(rng, 4 * (num_pages - adapter_pages - 1))
    _run(engine, prompt, tenant="t", max_tokens=1)
    occupancy = engine.pool.occupancy()
    assert occupancy.free == 0 and occupancy.cached == num_pages - adapter_pages
    newcomer = _run(engine, _tokens(rng, 4 * 8), tenant="u", max_tokens=1)  # needs 8 pages, all reclaimed
    assert newcomer.finish_reason.value == "length"
    assert engine.adapters.resident_counts()[1] == 1, "an idle adapter was evicted before idle cached pages"
    assert engine.scheduler.num_preemptions == 0
    _run(engine, prompt[:8] + _tokens(rng, 3), tenant="t")
    assert _hits(engine, "t") == 8, "the head of the chain was reclaimed before its tail"


def test_disabled_cache_counts_lookups_and_keeps_nothing(tiny_checkpoint):
    rng = random.Random(random.getrandbits(64))
    engine = _engine(tiny_checkpoint, cache=False)
    prompt = _tokens(rng, 20)
    _run(engine, prompt, tenant="a")
    _run(engine, prompt, tenant="a")
    assert engine.prefix_cache.stats["a"].queries == 40 and _hits(engine, "a") == 0
    occupancy = engine.pool.occupancy()
    assert occupancy.cached == 0 and occupancy.free == occupancy.total
