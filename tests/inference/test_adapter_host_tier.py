"""The host tier and page-in, on the CPU: each adapter is packed once into one
``[layers, padded_elems]`` tensor in the pool's dtype when it enters host RAM (registration or a
fetch), the host budget counts exactly those bytes, a page-in writes exactly the adapter's pool
rows, and a fetch after host eviction checks the sha256 and does not validate again. The CUDA
variant (pinned host memory, the side stream) runs only where a GPU is."""

from __future__ import annotations

import hashlib
import time

import pytest
import torch

from inference.adapters import host_tier
from inference.adapters.lora_weights import LoraModuleWeights, layer_offsets, pack_layers
from inference.adapters.manager import AdapterManager, module_layout
from inference.adapters.object_store import LocalFolderStore
from inference.adapters.peft_checkpoint import validate_adapter_files
from inference.model_config import ModelConfig
from inference.page_pool import PageGeometry, PagePool
from inference.scheduler import Admission
from support.adapters import synthetic_adapter

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def config(tiny_checkpoint) -> ModelConfig:
    return ModelConfig.from_checkpoint(tiny_checkpoint)


def _files(tmp_path, config, name, seed, r=4, targets=ALL):
    folder = synthetic_adapter(tmp_path / name, config, r=r, targets=targets, alpha=8.0, seed=seed, std=0.3)
    return (folder / "adapter_config.json").read_bytes(), (folder / "adapter_model.safetensors").read_bytes()


class CountingStore(LocalFolderStore):
    """A real local store that records the keys read and can be slowed down."""

    delay = 0.0

    def __init__(self, root):
        super().__init__(root)
        self.reads: list[str] = []

    def get(self, key):
        self.reads.append(key)
        time.sleep(self.delay)
        return super().get(key)


def _manager(tmp_path, config, dtype=torch.float32, num_pages=64, host_budget=64 << 20, device="cpu"):
    geometry = PageGeometry.for_model(config, 4, dtype)
    pool = PagePool(geometry, num_pages, device, dtype)
    store = CountingStore(tmp_path / "store")
    return AdapterManager(config, pool, store, host_budget_bytes=host_budget), store


def _expected_rows(weights, ref, config, padded_elems, dtype) -> torch.Tensor:
    """The packed form built independently: per layer, each module's A then Bᵀ, flattened."""
    rows = torch.zeros((config.num_layers, padded_elems), dtype=torch.float64)
    for name, (a_off, b_off, rank) in module_layout(ref, config.linear_shapes()).items():
        module = weights.modules[name]
        for layer in range(config.num_layers):
            a = module.a[layer].double().flatten()
            b_t = module.b_t[layer].double().flatten()
            rows[layer, a_off:a_off + a.numel()] = a
            rows[layer, b_off:b_off + b_t.numel()] = b_t
    return rows.to(dtype)


def _wait(predicate, seconds=30.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_registration_packs_once_and_page_in_writes_exactly_the_adapters_rows(tmp_path, config, dtype, monkeypatch):
    packs = []
    monkeypatch.setattr(host_tier, "pack_layers", lambda *a, **k: packs.append(a) or pack_layers(*a, **k))
    manager, _ = _manager(tmp_path, config, dtype)
    config_bytes, weights_bytes = _files(tmp_path, config, "a", 1, r=4, targets=("q_proj", "v_proj", "down_proj"))
    ref = manager.register_files("a", config_bytes, weights_bytes)
    weights = validate_adapter_files(config_bytes, weights_bytes, config)
    assert len(packs) == 1
    packed = manager.host.get(ref.uid)
    geometry = manager.pool.geometry
    pages_needed = geometry.pages_for_elems(ref.layer_elems)
    assert packed.shape == (config.num_layers, pages_needed * geometry.page_elems) and packed.dtype == dtype
    assert packed.is_contiguous() and not packed.is_pinned()  # CPU pool: no pinning
    expected = _expected_rows(weights, ref, config, packed.shape[1], dtype)
    assert torch.equal(packed, expected)

    sentinel = 7.0
    manager.pool.tensor.fill_(sentinel)
    assert manager.admit(ref) is Admission.READY
    resident = manager.resident(ref.uid)
    assert resident.ready_event is None and len(resident.pages) == pages_needed
    pool = manager.pool.tensor
    written = pool[:, resident.pages, :].reshape(config.num_layers, -1)
    assert torch.equal(written, expected)  # every module at its offsets, the padding zero
    others = [p for p in range(pool.shape[1]) if p not in resident.pages]
    assert bool((pool[:, others, :] == sentinel).all())  # no other page touched

    assert len(packs) == 1  # paging in never packs
    manager.drop([ref])
    assert manager.resident(ref.uid) is None and not manager.host.contains(ref.uid)


def test_page_in_after_device_eviction_reuses_the_host_packing(tmp_path, config, monkeypatch):
    manager, _ = _manager(tmp_path, config)
    ref = manager.register_files("a", *_files(tmp_path, config, "a", 2))
    packed = manager.host.get(ref.uid)
    monkeypatch.setattr(host_tier, "pack_layers", lambda *a, **k: pytest.fail("packed again"))
    for _ in range(2):
        assert manager.admit(ref) is Admission.READY
        manager.make_room(manager.pool.num_pages)  # evicts it (no running request)
        assert manager.resident(ref.uid) is None
    assert manager.host.get(ref.uid) is packed


def test_the_host_budget_counts_the_packed_bytes(tmp_path, config):
    geometry = PageGeometry.for_model(config, 4, torch.bfloat16)
    files = [_files(tmp_path, config, f"a{i}", 10 + i, r=2 + 2 * i) for i in range(3)]
    manager, _ = _manager(tmp_path, config, torch.bfloat16, host_budget=1 << 30)
    refs = [manager.register_files(f"a{i}", *f) for i, f in enumerate(files)]
    sizes = [config.num_layers * geometry.pages_for_elems(r.layer_elems) * geometry.page_elems * 2 for r in refs]
    assert manager.host.resident_bytes == sum(sizes)
    assert all(manager.host.entry_bytes(manager.host.get(r.uid)) == s for r, s in zip(refs, sizes))
    # a budget that holds the last two: registering the third evicts the first
    small, _ = _manager(tmp_path / "small", config, torch.bfloat16, host_budget=sizes[1] + sizes[2])
    refs = [small.register_files(f"a{i}", *f) for i, f in enumerate(files)]
    assert not small.host.contains(refs[0].uid) and small.host.contains(refs[1].uid) and small.host.contains(refs[2].uid)
    assert small.host.resident_bytes == sizes[1] + sizes[2] and small.stats.host.evictions == 1


def test_a_fetch_checks_the_sha256_and_does_not_validate_again(tmp_path, config, monkeypatch):
    manager, store = _manager(tmp_path, config, torch.bfloat16)
    ref = manager.register_files("a", *_files(tmp_path, config, "a", 3))
    before = manager.host.get(ref.uid).clone()
    manager.host.discard(ref.uid)  # as if evicted from host RAM

    import inference.adapters.manager as manager_module
    import inference.adapters.peft_checkpoint as peft_checkpoint

    def refuse(*args, **kwargs):
        raise AssertionError("validated again")

    monkeypatch.setattr(peft_checkpoint, "validate_adapter_files", refuse)
    monkeypatch.setattr(manager_module, "validate_adapter_files", refuse)
    store.reads.clear()
    assert not manager.ensure_host(ref)
    _wait(lambda: manager.host.contains(ref.uid) or manager.failure(ref) is not None)
    assert manager.failure(ref) is None
    assert store.reads == [ref.weights_key]  # the config is not read: the reference carries it
    assert torch.equal(manager.host.get(ref.uid), before)  # the same packing as at registration
    assert manager.stats.host.misses == 1


def test_a_fetch_of_changed_bytes_fails_with_the_checksum_reason(tmp_path, config):
    manager, store = _manager(tmp_path, config)
    config_bytes, weights_bytes = _files(tmp_path, config, "a", 4)
    ref = manager.register_files("a", config_bytes, weights_bytes)
    _, other = _files(tmp_path, config, "b", 5)
    assert hashlib.sha256(other).hexdigest() != ref.sha256
    store.put(ref.weights_key, other)  # a valid adapter, but not the registered one
    manager.host.discard(ref.uid)
    assert manager.admit(ref) is Admission.COLD
    _wait(lambda: manager.failure(ref) is not None)
    assert "sha256" in manager.failure(ref) and manager.admit(ref) is Admission.FAILED
    assert manager.stats.fetch_failures == {"missing": 0, "checksum": 1, "invalid": 0, "unavailable": 0}
    assert not manager.host.contains(ref.uid)


def test_registered_bytes_that_cannot_be_loaded_count_as_invalid(tmp_path, config, monkeypatch):
    manager, _ = _manager(tmp_path, config)
    ref = manager.register_files("a", *_files(tmp_path, config, "a", 6))
    manager.host.discard(ref.uid)

    def broken(*args):
        raise KeyError("a tensor")

    monkeypatch.setattr(host_tier, "load_registered", broken)  # stands in for a server bug
    manager.ensure_host(ref)
    _wait(lambda: manager.failure(ref) is not None)
    assert manager.stats.fetch_failures["invalid"] == 1


def test_a_fetch_that_completes_after_its_version_was_dropped_leaves_nothing(tmp_path, config):
    manager, store = _manager(tmp_path, config)
    old = manager.register_files("a", *_files(tmp_path, config, "a", 7))
    manager.host.discard(old.uid)
    store.delay = 0.3
    manager.ensure_host(old)  # under way while the version is superseded (no request uses it)
    new = manager.register_files("a", *_files(tmp_path, config, "b", 8), new_version=True)
    assert not manager.registry.knows(old.uid)
    _wait(lambda: not manager._host_tier._fetches)
    assert not manager.host.contains(old.uid) and manager.host.contains(new.uid)
    assert manager.failure(old) is None


def test_a_fetch_under_way_when_its_adapter_is_unregistered_leaves_and_counts_nothing(tmp_path, config):
    manager, store = _manager(tmp_path, config)
    ref = manager.register_files("a", *_files(tmp_path, config, "a", 13))
    manager.host.discard(ref.uid)
    store.delay = 0.3
    manager.ensure_host(ref)  # will find the objects deleted
    manager.unregister("a", lambda fn: fn(), timeout=0)
    assert not store.exists(ref.weights_key) and not manager.registry.knows(ref.uid)
    _wait(lambda: not manager._host_tier._fetches)
    assert not manager.host.contains(ref.uid) and manager.failure(ref) is None
    assert sum(manager.stats.fetch_failures.values()) == 0


def test_pack_layers_matches_the_layout_for_non_contiguous_factors(config):
    shapes = config.linear_shapes()
    layers = config.num_layers
    modules = {}
    for name, rank in (("k_proj", 3), ("up_proj", 5)):
        in_f, out_f = shapes[name]
        b = torch.randn(layers, out_f, rank, dtype=torch.float16)
        modules[name] = LoraModuleWeights(a=torch.randn(layers, rank, in_f, dtype=torch.float16), b_t=b.transpose(1, 2))
    offsets = layer_offsets({"k_proj": 3, "up_proj": 5}, shapes)
    end = max(b_off + r * shapes[n][1] for n, (_, b_off, r) in offsets.items())
    packed = pack_layers(modules, end + 11, torch.float32, pin=False)
    for name, (a_off, b_off, rank) in offsets.items():
        in_f, out_f = shapes[name]
        assert torch.equal(packed[:, a_off:b_off].reshape(layers, rank, in_f), modules[name].a.float())
        assert torch.equal(packed[:, b_off:b_off + rank * out_f].reshape(layers, rank, out_f), modules[name].b_t.float())
    assert bool((packed[:, end:] == 0).all())
    with pytest.raises(ValueError):
        pack_layers(modules, end - 1, torch.float32, pin=False)


def test_the_side_stream_page_in_in_order_with_fake_streams(tmp_path, config, monkeypatch):
    """The CUDA branch of the page-in run on the CPU with stand-in streams and events: the copy
    stream first waits for the compute stream, the index is made from pinned memory inside the
    copy stream's context, the event is recorded on the copy stream, and the rows written are the
    adapter's. (What only a GPU shows, the asynchronous copies themselves, is the next test.)"""
    from contextlib import contextmanager

    log = []
    compute = object()

    class FakeStream:
        def wait_stream(self, other):
            log.append(("wait", other))

    class FakeEvent:
        def record(self, stream):
            log.append(("record", stream))

        def synchronize(self):
            log.append(("synchronize",))

    @contextmanager
    def on_stream(stream):
        log.append(("enter", stream))
        yield
        log.append(("exit", stream))

    real_tensor = torch.tensor

    def tensor(*args, pin_memory=False, **kwargs):
        log.append(("tensor", pin_memory))
        return real_tensor(*args, **kwargs)

    manager, _ = _manager(tmp_path, config, torch.bfloat16)
    ref = manager.register_files("a", *_files(tmp_path, config, "a", 12))
    side = manager._device._copier._stream = FakeStream()
    monkeypatch.setattr(torch.cuda, "stream", on_stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch, "tensor", tensor)
    assert manager.admit(ref) is Admission.READY
    assert log == [("wait", compute), ("enter", side), ("tensor", True), ("record", side), ("exit", side)]
    resident = manager.resident(ref.uid)
    assert isinstance(resident.ready_event, FakeEvent)
    written = manager.pool.tensor[:, resident.pages, :].reshape(config.num_layers, -1)
    assert torch.equal(written, manager.host.get(ref.uid))
    manager.make_room(manager.pool.num_pages)  # evicting a page-in nobody waited for waits for it
    assert log[-1] == ("synchronize",) and manager.resident(ref.uid) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_page_in_from_pinned_memory_matches_the_cpu(tmp_path, config):
    files = _files(tmp_path, config, "a", 9)
    cpu, _ = _manager(tmp_path / "cpu", config, torch.bfloat16)
    gpu, _ = _manager(tmp_path / "gpu", config, torch.bfloat16, device="cuda")
    cpu_ref, gpu_ref = cpu.register_files("a", *files), gpu.register_files("a", *files)
    packed = gpu.host.get(gpu_ref.uid)
    assert packed.is_pinned() and packed.device.type == "cpu"
    assert torch.equal(packed, cpu.host.get(cpu_ref.uid))
    assert gpu.admit(gpu_ref) is Admission.READY and cpu.admit(cpu_ref) is Admission.READY
    resident = gpu.resident(gpu_ref.uid)
    gpu.host.discard(gpu_ref.uid)  # dropping the host copy at once must not disturb the copy
    del packed
    resident.ready_event.synchronize()
    pages = resident.pages
    assert pages == cpu.resident(cpu_ref.uid).pages
    assert torch.equal(gpu.pool.tensor[:, pages, :].cpu(), cpu.pool.tensor[:, pages, :])
