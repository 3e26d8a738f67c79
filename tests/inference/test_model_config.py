"""Config parsing: supported fields, clear errors, RoPE scaling against transformers' own code."""

import json

import pytest
import torch

from inference.model import rope_inv_freq
from inference.model_config import ModelConfig, UnsupportedModelError

BASE = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
}


def test_parses_gqa_shapes():
    cfg = ModelConfig.from_dict(BASE)
    assert (cfg.head_dim, cfg.q_size, cfg.kv_size) == (16, 64, 32)
    assert cfg.linear_shapes()["k_proj"] == (64, 32)
    assert cfg.linear_shapes()["down_proj"] == (96, 64)


def test_every_unsupported_field_is_named_at_once():
    raw = {**BASE, "architectures": ["MixtralForCausalLM"], "hidden_act": "gelu", "attention_bias": True,
           "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(UnsupportedModelError) as info:
        ModelConfig.from_dict(raw)
    message = str(info.value)
    for needle in ("MixtralForCausalLM", "gelu", "attention_bias", "yarn"):
        assert needle in message


def test_bad_head_grouping():
    with pytest.raises(UnsupportedModelError, match="multiple"):
        ModelConfig.from_dict({**BASE, "num_key_value_heads": 3})


def test_missing_or_broken_config(tmp_path):
    with pytest.raises(ValueError, match="config.json is missing"):
        ModelConfig.from_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        {"rope_type": "linear", "factor": 2.5},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192},
    ],
)
def test_rope_inverse_frequencies_match_transformers(scaling):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    raw = {**BASE, "hidden_size": 256, "num_attention_heads": 2, "num_key_value_heads": 2, "rope_theta": 500000.0}
    if scaling:
        raw["rope_scaling"] = scaling
    ours = rope_inv_freq(ModelConfig.from_dict(raw).rope, 128)
    hf_config = LlamaConfig(**{k: v for k, v in raw.items() if k != "architectures"})
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        expected = 1.0 / (500000.0 ** (torch.arange(0, 128, 2).float() / 128))
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
    torch.testing.assert_close(ours, expected.float(), rtol=1e-6, atol=0)


def test_transformers5_rope_parameters_spelling(tmp_path):
    raw = {**BASE, "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert ModelConfig.from_checkpoint(tmp_path).rope.theta == 100000.0
