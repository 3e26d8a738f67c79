"""The engine collector's gauges, read from the metrics registry the way a scrape reads them."""

from __future__ import annotations

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
