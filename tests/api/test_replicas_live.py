"""Two real ``tailor serve inference`` processes behind the api in remote mode, on loopback, over
real PostgreSQL and S3 (SeaweedFS):

* each adapter is prefetched and paged in on its home replica only (read from each replica's
  ``vllm:lora_requests_info``, the gauge Kubernetes' inference gateway reads too);
* a replica killed (SIGKILL) mid-stream: the stream in flight on it ends with an SSE ``error``
  event, the replica leaves the ring, and every later request, its adapters' included, is served
  by the other replica;
* restarted on the same address it is probed back into the ring and serves its adapters again.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from inference.service.client import rendezvous_order
from support.live_server import CliService, serve_app, start_cli_service, stop_cli_service
from support.platform_flows import (
    OPERATOR_TOKEN,
    adapter_files,
    bearer,
    chat,
    create_key,
    create_tenant,
    create_user,
    upload_adapter,
    wait_for_status,
    write_adapter,
)
from support.service_fixtures import free_ports
from tenants import migrate
from tenants.settings import Settings

SECRET = "replicas-live-inference-secret-0123"
ADAPTERS_PER_REPLICA = 2


def _lora_info(url: str) -> dict[str, str]:
    """The labels of a replica's ``vllm:lora_requests_info``."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name == "vllm:lora_requests_info":
            (sample,) = family.samples
            return sample.labels
    raise AssertionError(f"{url}/metrics has no vllm:lora_requests_info")


def _running(url: str) -> set[str]:
    return {a for a in _lora_info(url)["running_lora_adapters"].split(",") if a}


def _api_sample(api: httpx.Client, name: str, labels: dict[str, str]) -> float | None:
    for family in text_string_to_metric_families(api.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def _wait(check, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _stream_until_first_delta(api: httpx.Client, key: str, user_id: str):
    """Open a long streamed chat; return the open response and its line iterator once a
    ``delta`` arrived (the generation is then in flight on its replica)."""
    body = {"message": "Tell me a very long story", "max_tokens": 1000, "temperature": 1.0, "stream": True}
    response = api.send(api.build_request("POST", f"/v1/users/{user_id}/chat", json=body, headers=bearer(key)),
                        stream=True)
    assert response.status_code == 200
    lines = response.iter_lines()
    event = None
    for line in lines:
        if line.startswith("event:"):
            event = line[len("event:"):].strip()
            if event == "delta":
                return response, lines
            assert event == "start", event
    raise AssertionError("the stream ended before its first delta")


@pytest.mark.timeout(900)
def test_two_replicas_affinity_failover_and_return(tmp_path: Path, tiny_checkpoint, tiny_model_config, postgres_url,
                                                   seaweedfs, s3_bucket):
    ports = free_ports(2)
    env = {
        "TAILOR_MODE": "development",
        "TAILOR_DATABASE_URL": postgres_url,
        **seaweedfs.tailor_env(s3_bucket),
        "TAILOR_INFERENCE_SECRET": SECRET,
        "TAILOR_MODEL": str(tiny_checkpoint),
        "TAILOR_POOL_BYTES": str(32 << 20),
        "TAILOR_DATA_DIR": str(tmp_path / "var"),
    }
    migrate.upgrade(postgres_url)
    replicas: dict[str, CliService] = {}

    def start_replica(port: int) -> CliService:
        service = start_cli_service(["serve", "inference"], env, tmp_path / f"inference-{port}.log", port=port)
        replicas[service.url] = service
        return service

    try:
        for port in ports:
            start_replica(port)
        urls = list(replicas)
        settings = Settings(**{k[len("TAILOR_"):].lower(): v for k, v in env.items()},
                            inference_mode="remote", inference_urls=",".join(urls), inference_probe_interval_s=0.3,
                            operator_token=OPERATOR_TOKEN, default_max_tokens=8, max_tokens_limit=1024,
                            history_token_budget=256, rate_limit_per_minute=0)
        settings.check_for("api")
        with serve_app(create_app(settings)) as base_url, httpx.Client(base_url=base_url, timeout=120) as api:
            _tenant, admin = create_tenant(api, OPERATOR_TOKEN, "replicas-live")
            key = create_key(api, admin, "chat")

            # adapters until each replica is home to a few (ids are made by the server)
            users: dict[str, str] = {}  # adapter id -> user id
            homes: dict[str, list[str]] = {url: [] for url in urls}
            seed = 0
            while min(len(v) for v in homes.values()) < ADAPTERS_PER_REPLICA:
                seed += 1
                assert seed <= 20, f"rendezvous hashing put 20 adapters on one side: {homes}"
                user = create_user(api, admin, f"user-{seed}")
                files = adapter_files(write_adapter(tmp_path / f"adapter-{seed}", tiny_model_config, seed=seed))
                r = upload_adapter(api, admin, f"style-{seed}", files, user_id=user["id"])
                assert r.status_code == 202, r.text
                adapter = wait_for_status(api, admin, r.json()["id"], timeout_s=120)
                assert adapter["status"] == "ready", adapter
                users[adapter["id"]] = user["id"]
                homes[rendezvous_order(adapter["id"], urls)[0]].append(adapter["id"])

            # affinity: prefetched and paged in on the home replica only
            for adapter_id, user_id in users.items():
                r = chat(api, key, user_id, "hello")
                assert r.status_code == 200 and r.json()["adapter_id"] == adapter_id, r.text
            for url in urls:
                assert _running(url) == set(homes[url]), (url, _lora_info(url), homes)
                assert _api_sample(api, "tailor_router_decisions_total",
                                   {"replica": url, "decision": "home"}) == len(homes[url])
                assert _api_sample(api, "tailor_router_decisions_total", {"replica": url, "decision": "spill"}) == 0

            # kill one replica while a stream runs on it: that stream ends with an error event
            survivor, victim = urls
            victim_user = users[homes[victim][0]]
            response, lines = _stream_until_first_delta(api, key, victim_user)
            replicas[victim].process.kill()
            replicas[victim].process.wait(10)
            events = []
            started = time.monotonic()
            for line in lines:
                if line.startswith("event:"):
                    events.append(line[len("event:"):].strip())
            response.close()
            assert events and events[-1] == "error", events
            assert time.monotonic() - started < 30  # a clean end, not a hang until a timeout
            assert _api_sample(api, "tailor_router_replica_up", {"replica": victim}) == 0

            # after the ejection: no failed request; the victim's adapters are served by the survivor
            for _round in range(2):
                for adapter_id, user_id in users.items():
                    r = chat(api, key, user_id, "still there?")
                    assert r.status_code == 200 and r.json()["adapter_id"] == adapter_id, r.text
                assert chat(api, key, create_user(api, admin, f"base-{_round}")["id"], "hi").status_code == 200
            assert _running(survivor) == set(users)
            assert _api_sample(api, "tailor_router_decisions_total",
                               {"replica": survivor, "decision": "failover"}) == 2 * len(homes[victim])
            ready = api.get("/readyz")  # one replica is enough to be ready
            assert ready.status_code == 200, ready.text
            assert ready.json()["inference_replicas"] == {survivor: "ok", victim: "unavailable"}

            # restarted on the same address: probed back into the ring, it serves its adapters again
            start_replica(int(victim.rsplit(":", 1)[1]))
            _wait(lambda: _api_sample(api, "tailor_router_replica_up", {"replica": victim}) == 1, 30,
                  "the restarted replica to rejoin the ring")
            home_before = _api_sample(api, "tailor_router_decisions_total", {"replica": victim, "decision": "home"})
            for adapter_id in homes[victim]:
                r = chat(api, key, users[adapter_id], "welcome back")
                assert r.status_code == 200 and r.json()["adapter_id"] == adapter_id, r.text
            assert _running(victim) == set(homes[victim])
            assert _api_sample(api, "tailor_router_decisions_total",
                               {"replica": victim, "decision": "home"}) == home_before + len(homes[victim])
    except BaseException:
        for service in replicas.values():
            print(f"--- {service.url} log ---\n{service.log()[-5000:]}")
        raise
    finally:
        for service in replicas.values():
            stop_cli_service(service)

