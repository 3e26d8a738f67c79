"""The api's replica router (api/replicas.py): rendezvous placement, bounded loads, base-model
balance, health ejection, and TAILOR_INFERENCE_URLS validated at start-up. The live two-process
scenario is tests/api/test_replicas_live.py."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest
from pydantic import SecretStr, ValidationError

from api.app import build_inference
from api.replicas import DEFAULT_LOAD_FACTOR, ReplicaRouter
from inference import LLM
from inference.adapters.object_store import LocalFolderStore
from inference.model_config import ModelConfig
from inference.service.app import create_inference_app
from inference.service.client import RemoteInference, rendezvous_order
from inference.service.core import InferenceCore
from inference.service.protocol import AdapterSpec, ChatTurn, GenerateRequest, InferenceError
from support.adapters import put_adapter, synthetic_adapter
from support.live_server import serve_app
from support.service_fixtures import free_ports
from tenants.platform import remote_prefetch_hook
from tenants.settings import Settings

SECRET = "replica-routing-secret-0123456789"
URLS = ["http://10.0.0.1:8001", "http://10.0.0.2:8001", "http://10.0.0.3:8001"]


def _router(urls=URLS, **options) -> ReplicaRouter:
    return ReplicaRouter.from_urls(urls, SECRET, **options)


def _adapter_ids(n: int) -> list[str]:
    rng = random.Random(random.getrandbits(64))
    return [f"{rng.getrandbits(128):032x}" for _ in range(n)]


def test_rendezvous_spreads_homes_and_moves_only_the_removed_replicas_keys():
    ids = _adapter_ids(3000)
    homes = {key: rendezvous_order(key, URLS)[0] for key in ids}
    counts = Counter(homes.values())
    assert set(counts) == set(URLS) and all(800 <= c <= 1200 for c in counts.values()), counts
    assert rendezvous_order(ids[0], URLS) == rendezvous_order(ids[0], list(reversed(URLS)))  # no list-order bias
    survivors = URLS[:2]
    for key in ids:
        after = rendezvous_order(key, survivors)[0]
        if homes[key] != URLS[2]:
            assert after == homes[key]  # a key whose home stays keeps it
        else:
            assert after == rendezvous_order(key, URLS)[1]  # the removed replica's keys go to their next


def test_a_request_goes_home_until_the_home_exceeds_its_load_bound():
    router = _router(load_factor=1.25)
    key = _adapter_ids(1)[0]
    order = router.order(key)
    assert [(r, d) for r, d in router.candidates(key)][0] == (order[0], "home")
    order[0].in_flight = 2  # total 2 in flight (+1 new): bound ceil(1.25 * 3 / 3) = 2, home would hold 3
    replica, decision = router.candidates(key)[0]
    assert (replica, decision) == (order[1], "spill")
    order[1].in_flight = order[2].in_flight = 2  # evenly loaded: bound ceil(1.25 * 7 / 3) = 3, home fits again
    assert router.candidates(key)[0] == (order[0], "home")


def test_an_ejected_home_fails_over_to_the_next_replica_and_comes_back():
    router = _router()
    key = _adapter_ids(1)[0]
    order = router.order(key)
    router.eject(order[0], "test")
    candidates = router.candidates(key)
    assert candidates[0] == (order[1], "failover")
    assert candidates[-1] == (order[0], "failover")  # still tried last, in case the probe was stale
    assert router.metrics.registry.get_sample_value("tailor_router_ejections_total", {"replica": order[0].url}) == 1
    assert router.metrics.registry.get_sample_value("tailor_router_replica_up", {"replica": order[0].url}) == 0
    router.restore(order[0])
    assert router.candidates(key)[0] == (order[0], "home")


def test_base_model_requests_go_to_the_least_loaded_replica():
    router = _router()
    router.replicas[0].in_flight, router.replicas[1].in_flight, router.replicas[2].in_flight = 3, 1, 2
    assert router.candidates(None)[0] == (router.replicas[1], "least_loaded")
    for replica in router.replicas:
        replica.in_flight = 0
    firsts = Counter(router.candidates(None)[0][0].url for _ in range(30))
    assert firsts == {url: 10 for url in URLS}  # ties go round the replicas


@pytest.mark.parametrize("raw, problem", [
    ("127.0.0.1:8001", "is not an http(s)://host[:port] URL"),
    ("http://a:8001,http://a:8001", "more than once"),
    ("http://a:80x1", "is malformed"),
    (" , ", "lists no URL"),
    ("http://u:p@a:8001", "may not carry credentials"),
])
def test_a_malformed_replica_list_is_a_start_up_error_naming_the_problem(raw, problem):
    with pytest.raises(ValidationError, match="TAILOR_INFERENCE_URLS") as info:
        Settings(inference_mode="remote", inference_urls=raw)
    assert problem in str(info.value)


def test_the_single_url_keeps_working():
    assert Settings(inference_url="http://x:1/").inference_replicas == ("http://x:1",)
    assert Settings(inference_urls="http://a:1, http://b:2/").inference_replicas == ("http://a:1", "http://b:2")

    async def build(settings: Settings) -> object:
        backend = await build_inference(settings, None)
        await backend.aclose()
        return backend

    one = asyncio.run(build(Settings(inference_mode="remote", inference_url="http://127.0.0.1:9")))
    assert isinstance(one, ReplicaRouter) and [r.url for r in one.replicas] == ["http://127.0.0.1:9"]
    assert isinstance(one.replicas[0].client, RemoteInference)  # a ring of one
    many = asyncio.run(build(Settings(inference_mode="remote", inference_urls="http://127.0.0.1:9,http://127.0.0.1:10")))
    assert isinstance(many, ReplicaRouter) and [r.url for r in many.replicas] == ["http://127.0.0.1:9",
                                                                                  "http://127.0.0.1:10"]


def test_a_dead_replica_is_ejected_and_its_requests_served_by_the_next(tiny_checkpoint):
    """One real inference service and one address where nothing listens (a replica that died):
    every request succeeds, the dead replica leaves the ring at its first refusal, probes keep it
    out, and the live one serves its share."""
    core = InferenceCore(LLM(str(tiny_checkpoint), pool_bytes=16 << 20))
    (dead_port,) = free_ports(1)
    dead = f"http://127.0.0.1:{dead_port}"
    try:
        with serve_app(create_inference_app(core, SECRET)) as live:
            async def scenario() -> None:
                router = ReplicaRouter.from_urls([live, dead], SECRET, 30.0, probe_interval_s=0.2)
                try:
                    request = GenerateRequest(messages=[ChatTurn(role="user", content="hi")], max_tokens=2,
                                              temperature=0.0)
                    for _ in range(6):  # base-model requests: ties rotate, so the dead replica is tried first once
                        ended = await router.generate(request)
                        assert ended.completion_tokens >= 1
                    sample = router.metrics.registry.get_sample_value
                    assert sample("tailor_router_ejections_total", {"replica": dead}) == 1
                    assert sample("tailor_router_retries_total", {"replica": dead}) == 1
                    assert sample("tailor_router_decisions_total", {"replica": live, "decision": "least_loaded"}) == 6
                    assert sample("tailor_router_replica_in_flight", {"replica": live}) == 0
                    # a 503 the replica sent (here: an adapter it cannot fetch) is no reason to eject it
                    missing = AdapterSpec(id="missing", config_key="nowhere/adapter_config.json",
                                          weights_key="nowhere/adapter_model.safetensors", sha256="0" * 64)
                    with pytest.raises(InferenceError) as refused:
                        await router.generate(request.model_copy(update={"adapter": missing}))
                    assert refused.value.status == 503  # the last refusal: the dead replica, tried last
                    assert sample("tailor_router_retries_total", {"replica": live}) == 1  # live refused it first
                    assert sample("tailor_router_ejections_total", {"replica": live}) == 0
                    router.start_probing()
                    await asyncio.sleep(0.6)
                    assert [r.healthy for r in router.replicas] == [True, False]
                    assert await router.is_ready()
                finally:
                    await router.aclose()

            asyncio.run(scenario())
    finally:
        core.close()


def test_settings_reach_the_router():
    settings = Settings(inference_mode="remote", inference_urls="http://127.0.0.1:9,http://127.0.0.1:10",
                        router_load_factor=2.0, inference_probe_interval_s=0.5, inference_secret=SecretStr(SECRET))

    async def build() -> ReplicaRouter:
        router = await build_inference(settings, None)
        await router.aclose()
        return router

    router = asyncio.run(build())
    assert router.load_factor == 2.0 and router.probe_interval_s == 0.5
    with pytest.raises(ValidationError, match="router_load_factor"):
        Settings(router_load_factor=1.0)
    assert Settings.model_fields["router_load_factor"].default == DEFAULT_LOAD_FACTOR  # one default, two places


def test_the_workers_prefetch_goes_to_the_home_replica_or_the_next(tmp_path, tiny_checkpoint):
    """``remote_prefetch_hook`` (the Celery worker's ready hook) with two replicas, one real and one
    where nothing listens: an adapter whose home is the real one is loaded there; one whose home is
    the dead one is loaded on the next replica in its order, the real one."""
    store = LocalFolderStore(tmp_path / "store")
    config = ModelConfig.from_checkpoint(tiny_checkpoint)
    folder = synthetic_adapter(tmp_path / "adapter", config, r=4, targets=("q_proj", "v_proj"), alpha=8.0, seed=1)
    stored = put_adapter(store, folder, "stored", "a")
    core = InferenceCore(LLM(str(tiny_checkpoint), pool_bytes=16 << 20, adapter_store=store))
    (dead_port,) = free_ports(1)
    dead = f"http://127.0.0.1:{dead_port}"
    try:
        with serve_app(create_inference_app(core, SECRET)) as live:
            replicas = [live, dead]
            ids = _adapter_ids(64)
            homed_live = next(i for i in ids if rendezvous_order(i, replicas)[0] == live)
            homed_dead = next(i for i in ids if rendezvous_order(i, replicas)[0] == dead)
            hook = remote_prefetch_hook(Settings(inference_urls=",".join(replicas),
                                                 inference_secret=SecretStr(SECRET)))
            registry = core.engine.adapters.registry
            for adapter_id in (homed_live, homed_dead):
                hook(stored.model_copy(update={"id": adapter_id}))
                assert registry.get(adapter_id) is not None, adapter_id
    finally:
        core.close()


def test_delete_drops_the_adapter_on_every_replica(tmp_path, tiny_checkpoint):
    """A spill or failover may have loaded an adapter anywhere: ``drop_adapter`` asks every
    replica, and one that does not answer does not stop the others."""
    store = LocalFolderStore(tmp_path / "store")
    config = ModelConfig.from_checkpoint(tiny_checkpoint)
    folder = synthetic_adapter(tmp_path / "adapter", config, r=4, targets=("q_proj",), alpha=8.0, seed=2)
    cores = [InferenceCore(LLM(str(tiny_checkpoint), pool_bytes=16 << 20, adapter_store=store)) for _ in range(2)]
    (dead_port,) = free_ports(1)
    try:
        for core in cores:
            core.llm.register_adapter("shared", folder)
        with serve_app(create_inference_app(cores[0], SECRET)) as one, \
                serve_app(create_inference_app(cores[1], SECRET)) as two:
            async def drop() -> tuple[bool, bool]:
                router = ReplicaRouter.from_urls([one, two, f"http://127.0.0.1:{dead_port}"], SECRET, 30.0)
                try:
                    return await router.drop_adapter("shared", 30.0), await router.drop_adapter("shared", 30.0)
                finally:
                    await router.aclose()

            assert asyncio.run(drop()) == (True, False)  # dropped where held; the second time nowhere
            assert all(core.engine.adapters.registry.get("shared") is None for core in cores)
    finally:
        for core in cores:
            core.close()
