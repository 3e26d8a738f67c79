"""The engine picks one backend at start-up; the Triton backend's start-up compile launches every
kernel variant on tensors shaped like the model's, without touching the pool."""

from __future__ import annotations

import pytest
import torch

from inference.backends import select_backend
from inference.backends import triton_warm_up
from inference.engine import LLMEngine
from inference.engine_config import EngineConfig
from kernels.triton_support import triton_available


def test_cpu_device_gets_the_cpu_backend_and_triton_is_chosen_explicitly():
    assert select_backend("cpu").name == "cpu"
    assert select_backend("cpu", use_triton=False).name == "cpu"
    if triton_available():
        assert select_backend("cpu", use_triton=True).name == "triton"


def test_engine_warms_its_backend_up_once_at_start(tiny_checkpoint, monkeypatch):
    calls = []
    real = select_backend

    def spy(device, use_triton=None):
        backend = real(device, use_triton)
        object.__setattr__(backend, "warm_up", lambda config, pool, rank: calls.append((config, pool, rank)))
        return backend

    monkeypatch.setattr("inference.engine.select_backend", spy)
    engine = LLMEngine(tiny_checkpoint, EngineConfig(cpu_pool_bytes=8 << 20, max_lora_rank=24))
    assert calls == [(engine.model_config, engine.pool, 24)]
    calls.clear()
    LLMEngine(tiny_checkpoint, EngineConfig(cpu_pool_bytes=8 << 20, warm_up_kernels=False))
    assert calls == []


@pytest.mark.skipif(not triton_available(), reason="needs triton (interpreted on CPU)")
def test_warm_up_launches_run_and_leave_the_pool_alone(tiny_checkpoint, monkeypatch):
    """The warm-up's kernel calls pass the kernels' checks for the model's shapes and strides (run
    interpreted here: on CUDA they compile), and write nothing into the pool."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    engine = LLMEngine(tiny_checkpoint, EngineConfig(cpu_pool_bytes=8 << 20, use_triton=True))
    pool = engine.pool
    pool.tensor.normal_()
    before = pool.tensor.clone()
    monkeypatch.setattr(triton_warm_up, "WARM_SEGMENT_ROWS", (16, 32))
    for rank in (1, 16):
        triton_warm_up._warm_lora(engine.model_config, pool, rank)
    triton_warm_up._warm_attention(engine.model_config, pool)
    assert torch.equal(pool.tensor, before)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_engine_without_cuda_is_refused_clearly(tiny_checkpoint):
    with pytest.raises(ValueError, match="CUDA is not available"):
        LLMEngine(tiny_checkpoint, EngineConfig(device="cuda"))


def test_a_cuda_device_without_an_index_becomes_the_current_one(monkeypatch):
    """``cuda`` is made ``cuda:N`` at start-up, so the loop thread can bind it: torch's
    ``set_device`` refuses a device without an index (the first GPU check failed there). The
    machine has no GPU here, so CUDA's presence and current device are stood in for."""
    from inference.device import require_available

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert require_available(torch.device("cuda")) == torch.device("cuda", 3)
    assert require_available(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert require_available(torch.device("cpu")) == torch.device("cpu")
