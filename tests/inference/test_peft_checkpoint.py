"""PEFT LoRA checkpoint loading and validation, on adapters written by real PEFT.

Good adapters must come back with exactly PEFT's A and B^T per layer and PEFT's scaling; bad ones
must be refused with an error that names every problem, without ever unpickling anything.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save, save_file

from conftest import write_tiny_llama
from inference.adapters.peft_checkpoint import (
    MODULE_ORDER,
    AdapterValidationError,
    LoraAdapterWeights,
    adapter_files_from_dir,
    load_adapter_dir,
    lora_key,
    validate_adapter_files,
)
from inference.model_config import ModelConfig

import peft  # noqa: E402
import transformers  # noqa: E402

HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE = 64, 2, 4, 2, 96


def tiny_llama(hidden: int = HIDDEN, seed: int = 0, tie: bool = False):
    """An in-memory random LlamaForCausalLM (GQA) and its validated ModelConfig."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config), ModelConfig.from_dict(config.to_dict())


def make_adapter(out_dir: Path, *, r: int = 4, alpha: float = 8, targets=("q_proj", "v_proj"), rslora=False,
                 hidden: int = HIDDEN, seed: int = 0, dtype: torch.dtype | None = None, base=None, **lora_kwargs):
    """Wrap a tiny Llama with real PEFT, give lora_B random values (PEFT inits it to zero), save.

    Returns the PEFT model (for reference weights) and the base model's ModelConfig.
    """
    from peft import LoraConfig, get_peft_model

    model, model_config = base if base is not None else tiny_llama(hidden=hidden, seed=seed)
    lora = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(targets) if isinstance(targets, tuple) else targets,
        use_rslora=rslora,
        task_type="CAUSAL_LM",
        **lora_kwargs,
    )
    peft_model = get_peft_model(model, lora)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, 0.0, 0.5)
    if dtype is not None:
        peft_model = peft_model.to(dtype)
    peft_model.save_pretrained(out_dir)
    return peft_model, model_config


def lora_layer(peft_model, layer: int, module: str):
    block = peft_model.base_model.model.model.layers[layer]
    parent = block.self_attn if module in ("q_proj", "k_proj", "v_proj", "o_proj") else block.mlp
    return getattr(parent, module)


def refused(path_or_files, model: ModelConfig, *fragments: str, max_rank: int = 128) -> AdapterValidationError:
    """Assert the adapter is refused and that the message contains every fragment."""
    with pytest.raises(AdapterValidationError) as info:
        if isinstance(path_or_files, tuple):
            validate_adapter_files(*path_or_files, model, max_rank=max_rank)
        else:
            load_adapter_dir(path_or_files, model, max_rank=max_rank)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    return info.value


def edit_weights(adapter_dir: Path, edit) -> None:
    """Load the adapter's tensors, apply ``edit(dict)`` in place, write them back."""
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def edit_config(adapter_dir: Path, **changes) -> None:
    path = adapter_dir / "adapter_config.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


@pytest.fixture(scope="module")
def base_adapter(tmp_path_factory):
    """One saved q/v adapter (r=4) whose bytes tests copy and corrupt: (config, weights, model_config)."""
    out = tmp_path_factory.mktemp("base_adapter")
    _, model_config = make_adapter(out, r=4, alpha=8, targets=("q_proj", "v_proj"))
    return (out / "adapter_config.json").read_bytes(), (out / "adapter_model.safetensors").read_bytes(), model_config


@pytest.fixture
def adapter_copy(tmp_path, base_adapter):
    """A fresh writable copy of ``base_adapter`` as a directory."""
    config_bytes, weights_bytes, model_config = base_adapter
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "adapter_config.json").write_bytes(config_bytes)
    (out / "adapter_model.safetensors").write_bytes(weights_bytes)
    return out, model_config


# ---------------------------------------------------------------------------------------------
# Good adapters
# ---------------------------------------------------------------------------------------------


def test_weights_and_scaling_match_peft(tmp_path):
    peft_model, model_config = make_adapter(tmp_path, r=4, alpha=16, targets=("down_proj", "q_proj", "v_proj"))
    weights = load_adapter_dir(tmp_path, model_config)

    assert isinstance(weights, LoraAdapterWeights)
    assert weights.target_modules == ("q_proj", "v_proj", "down_proj")  # MODULE_ORDER, not config order
    assert list(weights.modules) == ["q_proj", "v_proj", "down_proj"]
    assert (weights.rank, weights.lora_alpha, weights.use_rslora) == (4, 16.0, False)
    assert weights.scaling == pytest.approx(16 / 4)
    assert weights.scaling == pytest.approx(lora_layer(peft_model, 0, "q_proj").scaling["default"])
    data = (tmp_path / "adapter_model.safetensors").read_bytes()
    assert weights.sha256 == hashlib.sha256(data).hexdigest()
    assert weights.config["peft_type"] == "LORA" and weights.config["r"] == 4

    shapes = model_config.linear_shapes()
    for name, module in weights.modules.items():
        fan_in, fan_out = shapes[name]
        assert module.a.shape == (LAYERS, 4, fan_in) and module.b_t.shape == (LAYERS, 4, fan_out)
        assert (module.rank, module.in_features, module.out_features) == (4, fan_in, fan_out)
        for t in (module.a, module.b_t):
            assert t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
        for layer in range(LAYERS):
            ref = lora_layer(peft_model, layer, name)
            torch.testing.assert_close(module.a[layer], ref.lora_A["default"].weight, rtol=0, atol=0)
            torch.testing.assert_close(module.b_t[layer], ref.lora_B["default"].weight.T, rtol=0, atol=0)
        assert module.b_t.abs().sum() > 0  # lora_B was randomised, so B^T is really compared

    expected_elems = sum(4 * sum(shapes[m]) for m in ("q_proj", "v_proj", "down_proj"))
    assert weights.layer_elems() == expected_elems
    assert weights.nbytes(2) == expected_elems * LAYERS * 2


def test_delta_equals_peft_forward(tmp_path):
    """scaling * B @ A reproduces what the PEFT layer adds to the base projection."""
    peft_model, model_config = make_adapter(tmp_path, r=8, alpha=4, targets=("o_proj",), rslora=True)
    weights = load_adapter_dir(tmp_path, model_config)
    x = torch.randn(3, model_config.q_size)
    module = weights.modules["o_proj"]
    for layer in range(LAYERS):
        peft_layer = lora_layer(peft_model, layer, "o_proj")
        with torch.no_grad():
            expected = peft_layer(x) - peft_layer.base_layer(x)
        got = weights.scaling * (x @ module.a[layer].T) @ module.b_t[layer]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_rslora_scaling(tmp_path):
    peft_model, model_config = make_adapter(tmp_path, r=16, alpha=8, rslora=True)
    weights = load_adapter_dir(tmp_path, model_config)
    assert weights.use_rslora and weights.scaling == pytest.approx(8 / math.sqrt(16))
    assert weights.scaling == pytest.approx(lora_layer(peft_model, 1, "v_proj").scaling["default"])


def test_all_linear_targets_every_projection(tmp_path):
    peft_model, model_config = make_adapter(tmp_path, r=2, targets="all-linear")
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert isinstance(saved, list) and any(t.startswith("model.layers.") for t in saved)  # PEFT expands it to paths
    weights = load_adapter_dir(tmp_path, model_config)
    assert weights.target_modules == MODULE_ORDER
    for name, module in weights.modules.items():
        torch.testing.assert_close(module.a[1], lora_layer(peft_model, 1, name).lora_A["default"].weight)

    # the unexpanded shorthand, as a hand-written config would hold it, resolves the same way
    edit_config(tmp_path, target_modules="all-linear")
    assert load_adapter_dir(tmp_path, model_config).target_modules == MODULE_ORDER


def test_regex_targets(tmp_path):
    peft_model, model_config = make_adapter(tmp_path, targets=r".*\.(down_proj|q_proj)")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == r".*\.(down_proj|q_proj)"
    weights = load_adapter_dir(tmp_path, model_config)
    assert weights.target_modules == ("q_proj", "down_proj")
    ref = lora_layer(peft_model, 0, "down_proj").lora_B["default"].weight
    torch.testing.assert_close(weights.modules["down_proj"].b_t[0], ref.T)


@pytest.mark.parametrize(
    "targets, exclude",
    [
        (["q_proj", "k_proj"], None),
        (["self_attn.o_proj", "mlp.down_proj"], None),
        ("all-linear", ["gate_proj", "self_attn.v_proj"]),
        (r"model\.layers\.\d+\.mlp\.(up|gate)_proj", None),
        (r".*_proj", r".*\.(q|k)_proj"),
    ],
)
def test_target_resolution_agrees_with_peft(tmp_path, targets, exclude):
    """Whatever PEFT actually wrapped with LoRA is exactly what the loader resolves."""
    from peft.tuners.lora import LoraLayer

    peft_model, model_config = make_adapter(tmp_path, targets=targets, exclude_modules=exclude)
    wrapped = {name.rsplit(".", 1)[-1] for name, mod in peft_model.named_modules() if isinstance(mod, LoraLayer)}
    weights = load_adapter_dir(tmp_path, model_config)
    assert set(weights.target_modules) == wrapped


def test_suffix_and_exclude_semantics(adapter_copy):
    path, model_config = adapter_copy
    edit_config(path, target_modules=["self_attn.q_proj", "v_proj"])
    assert load_adapter_dir(path, model_config).target_modules == ("q_proj", "v_proj")
    exclude = ["k_proj", "o_proj", "mlp.gate_proj", "up_proj", "down_proj"]  # PEFT suffix semantics again
    edit_config(path, target_modules="all-linear", exclude_modules=exclude)
    assert load_adapter_dir(path, model_config).target_modules == ("q_proj", "v_proj")
    edit_config(path, target_modules="all-linear", exclude_modules=r".*\.(k_proj|o_proj|gate_proj|up_proj|down_proj)")
    assert load_adapter_dir(path, model_config).target_modules == ("q_proj", "v_proj")


def test_bf16_adapter_is_upcast_exactly(tmp_path):
    peft_model, model_config = make_adapter(tmp_path, targets=("k_proj", "up_proj"), dtype=torch.bfloat16)
    assert load_file(tmp_path / "adapter_model.safetensors")[lora_key(0, "k_proj", "A")].dtype == torch.bfloat16
    weights = load_adapter_dir(tmp_path, model_config)
    ref = lora_layer(peft_model, 1, "up_proj").lora_B["default"].weight
    assert weights.modules["up_proj"].b_t.dtype == torch.float32
    assert torch.equal(weights.modules["up_proj"].b_t[1], ref.float().T)


def test_bytes_api_and_lenient_config(base_adapter):
    config_bytes, weights_bytes, model_config = base_adapter
    from_bytes = validate_adapter_files(config_bytes, weights_bytes, model_config)
    assert from_bytes.sha256 == hashlib.sha256(weights_bytes).hexdigest()
    raw = json.loads(config_bytes)
    for key in ("lora_alpha", "task_type"):
        raw.pop(key)
    raw.update(some_future_peft_key={"x": 1}, base_model_name_or_path="/nowhere", use_rslora=False)
    lenient = validate_adapter_files(json.dumps(raw).encode(), weights_bytes, model_config)
    assert lenient.lora_alpha == 8.0 and lenient.scaling == pytest.approx(8 / 4)  # PEFT's default alpha
    assert torch.equal(lenient.modules["v_proj"].b_t, from_bytes.modules["v_proj"].b_t)


def test_real_checkpoint_directory(tmp_path, bundled_checkpoint):
    """A base checkpoint saved by write_tiny_llama, reloaded by transformers, adapted by PEFT."""
    from transformers import LlamaForCausalLM

    base_dir = write_tiny_llama(tmp_path / "base", bundled_checkpoint, seed=7)
    model_config = ModelConfig.from_checkpoint(base_dir)
    base = (LlamaForCausalLM.from_pretrained(base_dir), model_config)
    peft_model, _ = make_adapter(tmp_path / "adapter", r=8, alpha=16, targets="all-linear", base=base)
    weights = load_adapter_dir(tmp_path / "adapter", model_config)
    assert weights.target_modules == MODULE_ORDER
    ref = lora_layer(peft_model, 1, "gate_proj").lora_A["default"].weight
    torch.testing.assert_close(weights.modules["gate_proj"].a[1], ref)

    # the same adapter does not fit the 30-layer bundled model. PEFT expanded "all-linear" to the
    # tiny model's module paths, which cover only 2 of its 30 layers
    bundled = ModelConfig.from_checkpoint(bundled_checkpoint)
    refused(tmp_path / "adapter", bundled, "select q_proj in only layers [0, 1] of 30", "fewer layers")
    # with plain module names the layers' keys are missing and the widths are wrong
    edit_config(tmp_path / "adapter", target_modules=list(MODULE_ORDER))
    refused(tmp_path / "adapter", bundled, "missing key", "base_model.model.model.layers.2.", "wrong shape",
            f"{lora_key(0, 'q_proj', 'A')}: expected shape [8, 576], got [8, 64]")


def test_large_adapter_loads_fast():
    """rank 64, all seven projections, the 30-layer SmolLM2-135M shapes (about 18M parameters).

    Timed on one intra-op thread: on a shared machine, multi-threaded regions stall whenever another
    process holds a core, which would measure the neighbours rather than this code. A few hundred
    milliseconds is typical; anything per-element in Python would take minutes.
    """
    model_config = ModelConfig.from_dict({
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "vocab_size": 49152,
    })
    r = 64
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)
        tensors = {}
        for layer in range(model_config.num_layers):
            for name, (fan_in, fan_out) in model_config.linear_shapes().items():
                tensors[lora_key(layer, name, "A")] = torch.randn(r, fan_in, generator=gen).to(torch.bfloat16)
                tensors[lora_key(layer, name, "B")] = torch.randn(fan_out, r, generator=gen).to(torch.bfloat16)
        weights_bytes = save(tensors)
        config = {"peft_type": "LORA", "r": r, "lora_alpha": 128, "target_modules": "all-linear"}
        config_bytes = json.dumps(config).encode()
        start = time.perf_counter()
        weights = validate_adapter_files(config_bytes, weights_bytes, model_config)
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    assert weights.target_modules == MODULE_ORDER and weights.scaling == 2.0
    assert weights.layer_elems() * 30 == sum(t.numel() for t in tensors.values())
    assert torch.equal(weights.modules["down_proj"].b_t[29], tensors[lora_key(29, "down_proj", "B")].float().T)
    assert elapsed < 10.0, f"validating a rank-64 all-linear 30-layer adapter took {elapsed:.2f}s"

    # a NaN deep inside is still found and named by the vectorised check
    tensors[lora_key(17, "up_proj", "A")][5, 9] = float("nan")
    refused((config_bytes, save(tensors)), model_config, "1 tensor(s) contain NaN or Inf", lora_key(17, "up_proj", "A"))


# ---------------------------------------------------------------------------------------------
# Bad adapters: directory and files
# ---------------------------------------------------------------------------------------------


class _WritesFileWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("keep_safetensors", [False, True])
def test_pickle_weights_are_refused_unopened(adapter_copy, tmp_path, monkeypatch, keep_safetensors):
    path, model_config = adapter_copy
    marker = tmp_path / "pwned"
    (path / "adapter_model.bin").write_bytes(pickle.dumps(_WritesFileWhenUnpickled(marker)))
    if not keep_safetensors:
        (path / "adapter_model.safetensors").unlink()

    def forbidden(*args, **kwargs):
        raise AssertionError("a pickle loader was called")

    for target, attr in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(target, attr, forbidden)
    err = refused(path, model_config, "adapter_model.bin", "pickle files are not loaded")
    if not keep_safetensors:
        assert any("adapter_model.safetensors is missing" in p for p in err.problems)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["training_args.bin", "model.pt", "w.pth", "x.pkl", "last.ckpt"])
def test_every_pickle_suffix_is_refused(adapter_copy, name):
    path, model_config = adapter_copy
    (path / name).write_bytes(b"\x80\x04not really")
    refused(path, model_config, name, "pickle files are not loaded")


def test_missing_files_and_outside_symlink(adapter_copy, tmp_path):
    path, model_config = adapter_copy
    outside = tmp_path / "elsewhere.safetensors"
    (path / "adapter_model.safetensors").rename(outside)
    (path / "adapter_model.safetensors").symlink_to(outside)
    refused(path, model_config, "adapter_model.safetensors is a symlink pointing outside the adapter directory")

    (path / "adapter_model.safetensors").unlink()
    (path / "adapter_config.json").unlink()
    err = refused(path, model_config, "adapter_config.json is missing", "adapter_model.safetensors is missing")
    assert len(err.problems) == 2
    refused(tmp_path / "does-not-exist", model_config, "is not a directory")


def test_inside_symlink_is_fine(adapter_copy):
    path, model_config = adapter_copy
    (path / "adapter_model.safetensors").rename(path / "real.safetensors")
    (path / "adapter_model.safetensors").symlink_to("real.safetensors")
    assert adapter_files_from_dir(path)[1] == (path / "real.safetensors").read_bytes()
    assert load_adapter_dir(path, model_config).target_modules == ("q_proj", "v_proj")


def test_truncated_safetensors(adapter_copy):
    path, model_config = adapter_copy
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    refused(path, model_config, "adapter_model.safetensors is not a valid safetensors file")
    (path / "adapter_model.safetensors").write_bytes(b"")
    refused(path, model_config, "adapter_model.safetensors is not a valid safetensors file")


# ---------------------------------------------------------------------------------------------
# Bad adapters: weights
# ---------------------------------------------------------------------------------------------


def test_wrong_shapes_from_another_hidden_size(tmp_path):
    make_adapter(tmp_path, hidden=32, targets=("q_proj", "down_proj"))
    _, model_config = tiny_llama(hidden=HIDDEN)
    q_a = lora_key(0, "q_proj", "A")
    err = refused(tmp_path, model_config, "wrong shape", f"{q_a}: expected shape [4, 64], got [4, 32]",
                  f"{lora_key(1, 'down_proj', 'B')}: expected shape [64, 4], got [32, 4]")
    assert len(err.problems) == 1  # all shape errors in one problem entry (key set and rank are fine)


def test_missing_key(adapter_copy):
    path, model_config = adapter_copy
    key = lora_key(1, "v_proj", "B")
    edit_weights(path, lambda t: t.pop(key))
    refused(path, model_config, "1 missing key(s)", key)


def test_unexpected_keys(adapter_copy):
    path, model_config = adapter_copy
    extra = [lora_key(0, "k_proj", "A"), "base_model.model.lm_head.lora_A.weight"] + [f"junk.{i}" for i in range(6)]

    def add(tensors):
        for key in extra:
            tensors[key] = torch.zeros(4, 64)

    edit_weights(path, add)
    err = refused(path, model_config, "8 unexpected key(s)", lora_key(0, "k_proj", "A"), "(and 3 more)")
    assert "missing" not in str(err)


def test_nan_and_inf_are_named(adapter_copy):
    path, model_config = adapter_copy
    nan_key, inf_key = lora_key(0, "q_proj", "B"), lora_key(1, "v_proj", "A")

    def poison(tensors):
        tensors[nan_key][3, 1] = float("nan")
        tensors[inf_key][0, 0] = float("-inf")

    edit_weights(path, poison)
    refused(path, model_config, "2 tensor(s) contain NaN or Inf", nan_key, inf_key)


def test_integer_dtype(adapter_copy):
    path, model_config = adapter_copy
    key = lora_key(1, "q_proj", "A")
    edit_weights(path, lambda t: t.__setitem__(key, t[key].to(torch.int32)))
    refused(path, model_config, "dtype int32 not supported", key)


def test_weights_rank_must_equal_config_r(adapter_copy):
    path, model_config = adapter_copy
    edit_config(path, r=8)
    refused(path, model_config, "rank dimension is [4] but adapter_config.json says r=8",
            "expected shape [8, 64], got [4, 64]")


# ---------------------------------------------------------------------------------------------
# Bad adapters: config
# ---------------------------------------------------------------------------------------------


def test_config_not_json(base_adapter):
    _, weights_bytes, model_config = base_adapter
    refused((b"{not json", weights_bytes), model_config, "adapter_config.json is not valid JSON")
    refused((b"[1, 2]", weights_bytes), model_config, "must hold a JSON object")
    refused((b"\xff\xfe\x00garbage", weights_bytes), model_config, "adapter_config.json is not valid JSON")


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"peft_type": "IA3"}, "peft_type must be 'LORA', got 'IA3'"),
        ({"peft_type": None}, "peft_type must be 'LORA'"),
        ({"r": 0}, "r=0 is out of range"),
        ({"r": -3}, "r=-3 is out of range"),
        ({"r": 4.0}, "r must be an integer"),
        ({"r": True}, "r must be an integer"),
        ({"lora_alpha": 0}, "lora_alpha must be a finite number > 0"),
        ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number > 0"),
        ({"lora_alpha": 10**400}, "lora_alpha must be a finite number > 0"),
        ({"lora_alpha": "16"}, "lora_alpha must be a finite number > 0"),
        ({"use_rslora": "yes"}, "use_rslora must be true or false"),
        ({"task_type": "SEQ_CLS"}, "task_type 'SEQ_CLS' not supported"),
        ({"use_dora": True}, "DoRA (use_dora) not supported"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"lora_bias": True}, "lora_bias"),
        ({"use_qalora": True}, "QALoRA"),
        ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
        ({"layer_replication": [[0, 2]]}, "layer_replication"),
        ({"alora_invocation_tokens": [5]}, "alora_invocation_tokens"),
        ({"target_parameters": ["mlp.experts.gate_up_proj"]}, "target_parameters"),
        ({"bias": "all"}, "bias='all' not supported"),
        ({"bias": "lora_only"}, "bias='lora_only' not supported"),
        ({"layers_to_transform": [0]}, "layers_to_transform=[0] not supported"),
        ({"layers_to_transform": 0}, "layers_to_transform=0 not supported"),
        ({"layers_pattern": "layers"}, "layers_pattern='layers' not supported"),
        ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
        ({"alpha_pattern": {"q_proj": 8}}, "alpha_pattern"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save ['lm_head'] not supported"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' not supported"),
        ({"init_lora_weights": "olora"}, "init_lora_weights='olora' not supported"),
        ({"target_modules": None}, "target_modules is missing or empty"),
        ({"target_modules": []}, "target_modules is missing or empty"),
        ({"target_modules": 7}, "target_modules must be a list of names or a regex string"),
        ({"target_modules": ["q_proj", "lm_head"]}, "target 'lm_head' not supported"),
        ({"target_modules": ["q_proj", "mlp"]}, "target 'mlp' not supported"),
        ({"target_modules": ["q_proj", "c_attn"]}, "target 'c_attn' not supported"),
        ({"target_modules": "(q_proj"}, "target_modules regex '(q_proj' is invalid"),
        ({"target_modules": r".*embed_tokens|.*\.q_proj"}, "matches model.embed_tokens: target not supported"),
        ({"target_modules": r"nothing"}, "selects none of"),
        ({"target_modules": ["model.layers.0.self_attn.q_proj"]}, "select q_proj in only layers [0] of 2"),
        ({"target_modules": r"model\.layers\.1\..*_proj"}, "per-layer targeting is not supported"),
    ],
)
def test_config_problems_are_named(base_adapter, changes, fragment):
    config_bytes, weights_bytes, model_config = base_adapter
    raw = {**json.loads(config_bytes), **changes}
    refused((json.dumps(raw).encode(), weights_bytes), model_config, fragment)


def test_rank_above_max_rank(tmp_path):
    _, model_config = make_adapter(tmp_path, r=16)
    assert load_adapter_dir(tmp_path, model_config, max_rank=16).rank == 16
    refused(tmp_path, model_config, "r=16 is out of range: the rank must be in [1, 8]", max_rank=8)


def test_dora_from_peft(tmp_path):
    _, model_config = make_adapter(tmp_path, targets=("q_proj",), use_dora=True)
    err = refused(tmp_path, model_config, "DoRA (use_dora) not supported", "unexpected key", "lora_magnitude_vector")
    assert len(err.problems) == 2


def test_modules_to_save_from_peft(tmp_path):
    _, model_config = make_adapter(tmp_path, targets=("q_proj",), modules_to_save=["lm_head"])
    refused(tmp_path, model_config, "modules_to_save ['lm_head'] not supported", "unexpected key", "lm_head")


def test_embedding_and_head_targets_from_peft(tmp_path):
    _, model_config = make_adapter(tmp_path, targets=("q_proj", "lm_head", "embed_tokens"))
    refused(tmp_path, model_config, "target 'lm_head' not supported", "target 'embed_tokens' not supported")


def test_every_problem_reported_at_once(adapter_copy):
    path, model_config = adapter_copy
    edit_config(path, use_dora=True, modules_to_save=["lm_head"], task_type="SEQ_CLS", lora_alpha=-1,
                bias="all", fan_in_fan_out=True)
    missing = lora_key(0, "q_proj", "A")
    nan_key = lora_key(1, "q_proj", "B")

    def corrupt(tensors):
        tensors.pop(missing)
        tensors[nan_key][0, 0] = float("nan")
        tensors[lora_key(0, "v_proj", "A")] = tensors[lora_key(0, "v_proj", "A")].to(torch.int64)

    edit_weights(path, corrupt)
    err = refused(path, model_config, "DoRA", "modules_to_save", "task_type 'SEQ_CLS'", "lora_alpha", "bias='all'",
                  "fan_in_fan_out", "missing key", missing, "NaN", nan_key, "dtype int64")
    assert len(err.problems) == 9  # six config problems, then dtype, missing key and NaN
    assert str(err).startswith("invalid LoRA adapter (9 problems):")
    assert isinstance(err, ValueError)


# ---------------------------------------------------------------------------------------------
# Hostile input: refused, never another exception (the loader and the validation job run this)
# ---------------------------------------------------------------------------------------------


def _header_file(header: str, data: bytes = b"") -> bytes:
    raw = header.encode()
    return len(raw).to_bytes(8, "little") + raw + data


@pytest.mark.parametrize("which, data, fragment", [
    ("config", b"[" * 100_000 + b"]" * 100_000, "nested"),
    ("config", b'{"r": 1' + b"0" * 5000 + b"}", "not valid JSON"),
    ("config", b'{"target_modules": "' + b"(" * 5000 + b'"}', "regex"),
    ("weights", _header_file("[" * 100_000 + "]" * 100_000), "nested"),
    ("weights", _header_file('{"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, Infinity]}}', b"\0" * 4),
     "JSON"),
    ("weights", _header_file('{"t": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 4]}}', b"\0" * 4), "JSON"),
    ("weights", _header_file('{"t": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]}}', b"\0" * 4),
     "bad byte range"),
    ("weights", _header_file('{"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                             '"u": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4), "overlap"),
], ids=["config deep", "config huge int", "config regex nesting", "header deep", "header infinite offset",
        "header infinite shape", "header float offsets", "header overlapping"])
def test_hostile_files_are_refused_by_the_loader(adapter_copy, which, data, fragment):
    """The engine's loader (``load_adapter_dir``; the validation job calls the same
    ``validate_adapter_files``) refuses JSON nested past the parser's depth, oversized integers,
    regexes that break ``re.compile`` and safetensors headers with non-finite or overlapping
    offsets with AdapterValidationError, not RecursionError/ValueError/OverflowError."""
    path, model_config = adapter_copy
    (path / ("adapter_config.json" if which == "config" else "adapter_model.safetensors")).write_bytes(data)
    refused(path, model_config, fragment)
