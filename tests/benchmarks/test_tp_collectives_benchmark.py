"""The collective-bytes benchmark runs TP=2 on the tiny Llama (gloo) and its counts meet the formula."""

from __future__ import annotations

import json

from benchmarks import tp_collectives
from inference.model_config import ModelConfig


def test_tp2_counts_match_the_formula_with_and_without_lora(tmp_path, tiny_checkpoint):
    out = tmp_path / "tp.json"
    assert tp_collectives.main(["--model", str(tiny_checkpoint), "--tp", "2", "--batch", "4", "--max-tokens", "3",
                                "--pool-mb", "4", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    layers = ModelConfig.from_checkpoint(tiny_checkpoint).num_layers
    base, lora = report["sides"]["base"], report["sides"]["lora"]
    assert base["max_adapters_in_a_step"] == 0 and lora["max_adapters_in_a_step"] >= 2
    for side in (base, lora):
        assert side["mismatches"] == [] and side["steps"] > 0
        for step in side["per_step"]:
            assert step["calls"]["all_reduce_layer"] == 2 * layers and step["calls"]["all_reduce_embed"] == 1
            assert step["bytes"]["all_reduce_layer"] == step["formula"]["all_reduce_layer"] > 0
        assert side["counted_bytes"]["broadcast_step"] > 0  # the control messages are counted too
    assert lora["counted_bytes"]["scatter_adapter"] > 0 and "scatter_adapter" not in base["counted_bytes"]
    assert report["lora_extra_data_bytes"] == 0
