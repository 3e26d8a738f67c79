"""The Gateway API inference extension's model-server gauges (vLLM names), read from the metrics
registry the way its endpoint picker scrapes them."""

from __future__ import annotations

import time

from prometheus_client import generate_latest

from support.adapters import synthetic_adapter

from inference import LLM, SamplingParams
from inference.service.metrics import InferenceMetrics


def _lora_info(metrics: InferenceMetrics) -> tuple[dict[str, str], float]:
    """The labels and value of the one ``vllm:lora_requests_info`` sample."""
    (family,) = [f for f in metrics.registry.collect() if f.name == "vllm:lora_requests_info"]
    (sample,) = family.samples
    return sample.labels, sample.value


def test_lora_requests_info_names_device_adapters_and_queued_ones(tmp_path, tiny_checkpoint):
    llm = LLM(str(tiny_checkpoint), page_tokens=4, pool_bytes=16 << 20)
    try:
        metrics = InferenceMetrics(llm.engine)
        cfg = llm.engine.model_config
        for seed, name in enumerate(("alice", "bob", "carol")):
            llm.register_adapter(name, synthetic_adapter(tmp_path / name, cfg, r=4, targets=("q_proj", "v_proj"),
                                                         alpha=8.0, seed=seed))
        labels, _value = _lora_info(metrics)
        assert labels == {"running_lora_adapters": "", "waiting_lora_adapters": "", "max_lora": "1"}
        before = time.time()
        llm.generate(["hello there", "good morning"], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
                     adapters=["alice", "bob"])
        engine = llm.engine
        engine.add(engine.request_from_ids([10, 11, 12], SamplingParams(max_tokens=2), None, "carol"))
        labels, value = _lora_info(metrics)
        assert labels["running_lora_adapters"] == "alice,bob"  # paged in, ready for the next batch
        assert labels["waiting_lora_adapters"] == "carol"  # queued, not yet paged in
        free = engine.pool.occupancy().free
        per_adapter = engine.pool.occupancy().adapter // 2
        assert int(labels["max_lora"]) == 2 + free // per_adapter
        assert before <= value <= time.time()  # the endpoint picker keeps the newest sample
        sample = metrics.registry.get_sample_value
        assert sample("vllm:num_requests_waiting") == 1 == engine.num_waiting
        assert sample("vllm:num_requests_running") == 0
        occupancy = engine.pool.occupancy()
        used = (occupancy.kv + occupancy.adapter) / occupancy.total
        assert sample("vllm:kv_cache_usage_perc") == sample("vllm:gpu_cache_usage_perc") == used > 0
        text = generate_latest(metrics.registry).decode()  # the names survive the text format
        assert 'vllm:lora_requests_info{max_lora="' in text and "vllm:num_requests_waiting 1.0" in text
    finally:
        llm.close()
