"""The replica router's spill choice (api/replicas.py): over its bound, the home's request goes to
an under-bound replica that already holds the adapter (by the router's ``Residency`` record),
the most recently used there first, and only without one to the next replica in hash order."""

from __future__ import annotations

import asyncio
import random

import pytest

from api.replicas import Residency, ReplicaRouter
from inference import LLM
from inference.adapters.object_store import LocalFolderStore
from inference.model_config import ModelConfig
from inference.service.core import InferenceCore
from inference.service.protocol import ChatTurn, GenerateRequest, InferenceError
from support.adapters import put_adapter, synthetic_adapter
from support.service_fixtures import free_ports

SECRET = "replica-spill-secret-0123456789"
URLS = [f"http://10.0.0.{i}:8001" for i in range(1, 5)]


def _router(urls=URLS, load_factor: float = 1.25, **options) -> ReplicaRouter:
    return ReplicaRouter.from_urls(urls, SECRET, load_factor=load_factor, **options)


def _adapter_id() -> str:
    return f"{random.Random(random.getrandbits(64)).getrandbits(128):032x}"


def _overload(router: ReplicaRouter, *replicas) -> None:
    """Put ``replicas`` over the load bound (the others idle): 4 in flight each."""
    for replica in replicas:
        replica.in_flight = 4


def test_a_spill_goes_to_a_holder_beyond_the_next_replica_in_hash_order():
    router = _router()
    key = _adapter_id()
    order = router.order(key)
    _overload(router, order[0])  # total 4 (+1): bound ceil(1.25 * 5 / 4) = 2; the home would hold 5
    assert router.candidates(key)[0] == (order[1], "spill")  # no holder: the next in hash order
    order[3].residency.touch(key)
    candidates = router.candidates(key)
    assert candidates[0] == (order[3], "spill_holder")
    assert [r for r, _d in candidates] == [order[3], order[1], order[2], order[0]]  # then hash order, home last


def test_a_holder_over_the_bound_is_not_chosen():
    router = _router()
    key = _adapter_id()
    order = router.order(key)
    order[3].residency.touch(key)
    _overload(router, order[0], order[3])  # total 8 (+1): bound ceil(1.25 * 9 / 4) = 3
    candidates = router.candidates(key)
    assert candidates[0] == (order[1], "spill")
    assert [r for r, _d in candidates][-2:] == [order[0], order[3]]  # over the bound: last, in hash order


def test_the_home_within_its_bound_is_chosen_even_when_others_hold_the_adapter():
    router = _router()
    key = _adapter_id()
    order = router.order(key)
    for replica in order[1:]:
        replica.residency.touch(key)
    assert router.candidates(key)[0] == (order[0], "home")


def test_the_most_recent_holder_comes_first():
    """Two holders: the one where fewer other adapters came after this one (device before host)."""
    router = _router()
    key = _adapter_id()
    order = router.order(key)
    order[3].residency.touch(key)
    order[2].residency.touch(key)
    for i in range(5):  # five other adapters sent to order[2] since: on a small device tier, it is gone
        order[2].residency.touch(f"other-{i}")
    order[3].residency.touch("other-0")
    _overload(router, order[0])
    assert [(r, d) for r, d in router.candidates(key)][:3] == [
        (order[3], "spill_holder"), (order[2], "spill_holder"), (order[1], "spill")]


def test_an_ejected_home_still_fails_over_in_hash_order():
    """Failover is placement (every api process agrees on it), not a spill: the next replica in
    order takes the ejected home's adapters even when another holds one."""
    router = _router()
    key = _adapter_id()
    order = router.order(key)
    order[2].residency.touch(key)
    router.eject(order[0], "test")
    assert router.candidates(key)[0] == (order[1], "failover")


def test_residency_is_a_bounded_recency_record():
    record = Residency(capacity=3)
    for key in ("a", "b", "c"):
        record.touch(key)
    assert [record.distance(k) for k in ("c", "b", "a")] == [0, 1, 2]
    record.touch("a")  # used again: the most recent
    assert (record.distance("a"), record.distance("b")) == (0, 2)
    record.touch("d")  # past the capacity: the least recent ("b") is forgotten
    assert "b" not in record and record.distance("b") is None and len(record) == 3
    record.forget("c")
    assert "c" not in record and len(record) == 2
    record.clear()
    assert len(record) == 0
    with pytest.raises(ValueError):
        Residency(capacity=0)


def test_ejection_and_delete_clear_the_record():
    ports = free_ports(2)
    router = _router([f"http://127.0.0.1:{port}" for port in ports])  # nothing listens: refused at once
    one, two = router.replicas
    one.residency.touch("a")
    two.residency.touch("a")
    router.eject(one, "test")
    assert len(one.residency) == 0 and "a" in two.residency  # an ejected replica may come back empty

    async def drop() -> None:
        try:
            with pytest.raises(InferenceError):  # no replica answered
                await router.drop_adapter("a", 5.0)
        finally:
            await router.aclose()

    asyncio.run(drop())
    assert "a" not in two.residency


def test_spills_through_real_replicas_land_where_the_adapter_is(tmp_path, tiny_checkpoint):
    """Three in-process replicas: with the home and the next one over the bound, a request pages its
    adapter in on the third; with only the home over it, the next request goes to the third again
    (a device hit there), not to the next replica in order, which never loads the adapter."""
    store = LocalFolderStore(tmp_path / "store")
    config = ModelConfig.from_checkpoint(tiny_checkpoint)
    folder = synthetic_adapter(tmp_path / "adapter", config, r=4, targets=("q_proj", "v_proj"), alpha=8.0, seed=3)
    spec = put_adapter(store, folder, "spilled", "a")
    cores = [InferenceCore(LLM(str(tiny_checkpoint), pool_bytes=16 << 20, adapter_store=store)) for _ in range(3)]
    try:
        router = ReplicaRouter([(f"replica-{i}", core) for i, core in enumerate(cores)], load_factor=1.25)
        order = router.order(spec.id)
        engine = {replica.url: cores[int(replica.url.rsplit("-", 1)[1])].engine for replica in router.replicas}
        request = GenerateRequest(messages=[ChatTurn(role="user", content="hi")], adapter=spec, max_tokens=2,
                                  temperature=0.0)

        async def serve(*overloaded) -> None:
            for replica in overloaded:
                replica.in_flight = 3  # total 6 (+1): bound ceil(1.25 * 7 / 3) = 3, so 3 + 1 is over
            try:
                ended = await router.generate(request)
                assert ended.completion_tokens >= 1
            finally:
                for replica in overloaded:
                    replica.in_flight = 0

        asyncio.run(serve(order[0], order[1]))
        asyncio.run(serve(order[0]))
        sample = router.metrics.registry.get_sample_value
        assert sample("tailor_router_decisions_total", {"replica": order[2].url, "decision": "spill"}) == 1
        assert sample("tailor_router_decisions_total", {"replica": order[2].url, "decision": "spill_holder"}) == 1
        third = engine[order[2].url].adapters.stats.device
        assert (third.loads, third.hits) == (1, 1)  # paged in once, then hit
        assert engine[order[1].url].adapters.registry.get(spec.id) is None  # the next in order never saw it
    finally:
        for core in cores:
            core.close()
