"""Every failed read of an adapter from the object store counts in
``tailor_adapter_fetch_failures_total{reason}``: cold registrations (the platform's first use of an
adapter, ``InferenceCore.ensure_adapter``) as well as re-fetches into host RAM. Against a real
SeaweedFS (the session's server, its own bucket) and a real unreachable endpoint."""

from __future__ import annotations

import hashlib
import time
import uuid

import pytest

from inference import LLM
from inference.service.core import InferenceCore
from inference.service.protocol import AdapterSpec, InferenceError
from support.adapters import synthetic_adapter
from support.service_fixtures import free_ports
from tenants.storage import S3Store

METRIC = "tailor_adapter_fetch_failures_total"


def s3_store(server, bucket: str, endpoint_url: str | None = None) -> S3Store:
    return S3Store(endpoint_url or server.endpoint_url, bucket, server.region, server.access_key_id,
                   server.secret_access_key)


def failures(core: InferenceCore, reason: str) -> float:
    return core.metrics.registry.get_sample_value(METRIC, {"reason": reason})


@pytest.fixture
def core(tiny_checkpoint, seaweedfs, s3_bucket):
    c = InferenceCore(LLM(str(tiny_checkpoint), page_tokens=4, pool_bytes=16 << 20,
                          adapter_store=s3_store(seaweedfs, s3_bucket)))
    yield c
    c.close()


@pytest.fixture
def stored(core, tmp_path) -> AdapterSpec:
    """A valid adapter in the core's store."""
    folder = synthetic_adapter(tmp_path / "a", core.engine.model_config, r=4, targets=("q_proj", "v_proj"),
                               alpha=8.0, seed=3)
    prefix = f"tenants/t/adapters/{uuid.uuid4().hex}"
    config, weights = (folder / "adapter_config.json").read_bytes(), (folder / "adapter_model.safetensors").read_bytes()
    core.engine.adapters.store.put(f"{prefix}/adapter_config.json", config)
    core.engine.adapters.store.put(f"{prefix}/adapter_model.safetensors", weights)
    return AdapterSpec(id=uuid.uuid4().hex, config_key=f"{prefix}/adapter_config.json",
                       weights_key=f"{prefix}/adapter_model.safetensors", sha256=hashlib.sha256(weights).hexdigest())


async def test_every_reason_is_exported_from_the_start(core):
    for reason in ("missing", "checksum", "invalid", "unavailable"):
        assert failures(core, reason) == 0


async def test_a_cold_load_of_a_missing_object_counts(core, stored):
    spec = stored.model_copy(update={"id": uuid.uuid4().hex, "weights_key": stored.weights_key + "-gone"})
    with pytest.raises(InferenceError):
        await core.ensure_adapter(spec)
    assert failures(core, "missing") == 1


async def test_a_cold_load_with_the_wrong_checksum_counts(core, stored):
    with pytest.raises(InferenceError):
        await core.ensure_adapter(stored.model_copy(update={"sha256": "0" * 64}))
    assert failures(core, "checksum") == 1
    assert (await core.ensure_adapter(stored)).sha256 == stored.sha256  # the right one loads
    assert sum(failures(core, r) for r in ("missing", "invalid", "unavailable")) == 0


async def test_a_cold_load_from_an_unreachable_store_counts(tiny_checkpoint, seaweedfs, s3_bucket, stored):
    (dead_port,) = free_ports(1)
    core = InferenceCore(LLM(str(tiny_checkpoint), page_tokens=4, pool_bytes=16 << 20,
                             adapter_store=s3_store(seaweedfs, s3_bucket, f"http://127.0.0.1:{dead_port}")))
    try:
        with pytest.raises(InferenceError) as error:
            await core.ensure_adapter(stored)
        assert error.value.status == 503
        assert failures(core, "unavailable") == 1
    finally:
        core.close()


async def test_a_failed_refetch_into_host_ram_counts(core, stored):
    manager = core.engine.adapters
    ref = await core.ensure_adapter(stored)
    manager.store.delete(stored.weights_key)
    manager.host.discard(ref.uid)  # as if evicted from host RAM
    assert not manager.ensure_host(ref)
    deadline = time.monotonic() + 30
    while manager.failure(ref) is None:
        assert time.monotonic() < deadline, "the fetch did not fail"
        time.sleep(0.05)
    assert failures(core, "missing") == 1


async def test_a_refetch_of_changed_bytes_counts_as_checksum_and_does_not_read_the_config(core, stored):
    """A re-fetch checks the weights' sha256 against the registered one and does not validate again
    (the bytes with that sha256 were validated at registration): garbage under the weights key is a
    checksum failure, never an invalid one, and the config object is not read at all."""
    manager = core.engine.adapters
    ref = await core.ensure_adapter(stored)
    manager.store.put(stored.weights_key, b"not a safetensors file")
    manager.store.delete(stored.config_key)  # not needed: the reference carries the config's content
    manager.host.discard(ref.uid)
    assert not manager.ensure_host(ref)
    deadline = time.monotonic() + 30
    while manager.failure(ref) is None:
        assert time.monotonic() < deadline, "the fetch did not fail"
        time.sleep(0.05)
    assert "sha256" in manager.failure(ref)
    assert failures(core, "checksum") == 1 and failures(core, "invalid") == 0 and failures(core, "missing") == 0
