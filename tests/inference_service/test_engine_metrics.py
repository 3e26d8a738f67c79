"""The engine collector's gauges, read from the metrics registry the way a scrape reads them."""

from __future__ import annotations

import pytest

from support.adapters import synthetic_adapter

from inference import LLM, SamplingParams
from inference.service.metrics import InferenceMetrics


def test_staged_adapter_bytes_are_exported(tmp_path, tiny_checkpoint):
    llm = LLM(str(tiny_checkpoint), page_tokens=4, pool_bytes=16 << 20)
    try:
        metrics = InferenceMetrics(llm.engine)
        assert metrics.registry.get_sample_value("tailor_adapter_staged_bytes") == 0
        cfg = llm.engine.model_config
        refs = [llm.register_adapter(name, synthetic_adapter(tmp_path / name, cfg, r=4, targets=("q_proj", "v_proj"),
                                                             alpha=8.0, seed=seed))
                for seed, name in enumerate(("alice", "bob"))]
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        llm.generate(["hello there", "good morning"], params, adapters=["alice", "bob"])
        # in every decode step both adapters (one layout, a row each) ran as one group on the CPU
        # path: two staged copies of the adapter's per-layer weights, which stay staged while idle
        element_bytes = llm.engine.pool.tensor.element_size()
        expected = 2 * refs[0].layer_elems * cfg.num_layers * element_bytes
        assert refs[0].layer_elems == refs[1].layer_elems
        assert metrics.registry.get_sample_value("tailor_adapter_staged_bytes") == expected
    finally:
        llm.close()


def test_prefix_cache_and_slo_metrics_per_tenant(tiny_checkpoint):
    """What a scrape reads equals what the engine did: tokens looked up and reused per tenant, the
    cache's pages by state, the pool's idle cached pages, and first-token SLO outcomes per tenant."""
    from inference.engine import LLMEngine
    from inference.engine_config import EngineConfig
    from support.engine_helpers import run_to_completion

    engine = LLMEngine(tiny_checkpoint, EngineConfig(page_tokens=4, cpu_pool_bytes=8 << 20))
    metrics = InferenceMetrics(engine)
    sample = metrics.registry.get_sample_value
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    prompt = list(range(10, 31))  # 21 tokens: 5 full pages reusable
    for tenant, slo in (("a", 3600.0), ("a", 3600.0), ("b", 1e-9)):
        engine.add(engine.request_from_ids(prompt, params, None, None, tenant=tenant, ttft_slo_s=slo))
        run_to_completion(engine)
    assert sample("tailor_prefix_cache_queries_tokens_total", {"tenant": "a"}) == 2 * 21
    assert sample("tailor_prefix_cache_hits_tokens_total", {"tenant": "a"}) == 20
    assert sample("tailor_prefix_cache_queries_tokens_total", {"tenant": "b"}) is None  # refused before admission
    idle = engine.prefix_cache.num_reclaimable
    assert idle == 5  # a's pages: the full pages of 21 prompt + 1 computed output token
    assert sample("tailor_prefix_cache_pages", {"state": "idle"}) == idle
    assert sample("tailor_prefix_cache_pages", {"state": "in_use"}) == 0
    assert sample("tailor_pool_pages", {"kind": "cached"}) == idle
    assert sample("tailor_pool_pages", {"kind": "kv"}) == 0
    assert sample("tailor_slo_ttft_attained_total", {"tenant": "a"}) == 2
    assert sample("tailor_slo_ttft_missed_total", {"tenant": "a"}) == 0
    assert sample("tailor_slo_ttft_missed_total", {"tenant": "b"}) == 1
    assert sample("tailor_slo_early_aborts_total", {"tenant": "b"}) == 1


def test_step_token_budget_gauge_follows_the_engine(tiny_checkpoint):
    """The budget starts full and, with a target below any real step, is lowered to its floor."""
    from inference.engine import LLMEngine
    from inference.engine_config import EngineConfig
    from inference.step_budget import MIN_STEP_TOKENS
    from support.engine_helpers import run_to_completion

    engine = LLMEngine(tiny_checkpoint, EngineConfig(page_tokens=4, cpu_pool_bytes=8 << 20, step_time_target_s=1e-6))
    sample = InferenceMetrics(engine).registry.get_sample_value
    assert sample("tailor_step_token_budget") == engine.config.max_num_batched_tokens
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    for start in (10, 60):  # two requests: a request alone is not held to the budget
        engine.add(engine.request_from_ids(list(range(start, start + 40)), params, None, None))
    run_to_completion(engine)
    assert sample("tailor_step_token_budget") == engine.step_budget.tokens == MIN_STEP_TOKENS


def test_the_service_setting_reaches_the_engine():
    from tenants.settings import Settings

    assert Settings().engine_options()["step_time_target_s"] == 0.15
    assert Settings(step_time_target_s=0).engine_options()["step_time_target_s"] is None  # off
    assert Settings(step_time_target_s=0.4).engine_options()["step_time_target_s"] == 0.4
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="step_time_target_s"):
            Settings(step_time_target_s=bad)
