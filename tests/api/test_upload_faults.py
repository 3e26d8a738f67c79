"""Adapter uploads under hostile input, retries and store faults, through the api.

* Every malformed upload answers 422 with a JSON list of problems and stores nothing (no row, no
  object); a corrupted archive is never accepted.
* ``Idempotency-Key``: a retry answers 200 with the first upload's adapter and stores nothing new;
  concurrent uploads with one key make one row (on SQLite and PostgreSQL); another payload under
  the key is 422; keys are scoped per tenant.
* A real SeaweedFS killed in the middle of a multipart upload: 503 JSON with Retry-After, no row;
  after a restart, the clean-up job leaves no object and no unfinished multipart upload.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.routers.adapters import REPLAYED_HEADER, _insert_pending
from support.hostile_archives import CONFIG, WEIGHTS, flipped_weight_bit, patch_zip, safetensors_with_header, zip_of
from support.platform_flows import (
    OPERATOR_TOKEN,
    adapter_files,
    bearer,
    create_tenant,
    create_user,
    wait_for_status,
    write_adapter,
)
from support.s3_faults import killable_seaweedfs
from tenants import migrate
from tenants import repositories as repo
from tenants.adapter_uploads import StagedAdapter
from tenants.cleanup import cleanup_job
from tenants.db import make_engine, make_session_factory, session_scope
from tenants.models import Adapter
from tenants.platform import Platform
from tenants.settings import Settings
from tenants.storage import S3Store

from .conftest import embedded_settings

SEED = 4242
KiB = 1 << 10


@pytest.fixture(scope="module")
def admin(client) -> str:
    return create_tenant(client, OPERATOR_TOKEN, "upload-faults")[1]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_config) -> Path:
    print(f"adapter seed {SEED}")
    return write_adapter(tmp_path_factory.mktemp("adapter"), tiny_model_config, seed=SEED)


def store_keys(client) -> list[str]:
    return client.app.state.tailor.platform.store.list_keys("tenants")


def rows(client, admin: str, **params) -> list[dict]:
    r = client.get("/v1/adapters", params={"limit": 1000, **params}, headers=bearer(admin))
    assert r.status_code == 200, r.text
    return r.json()["data"]


def post(client, admin: str, name: str, files, key: str | bytes | None = None, user_id: str | None = None):
    headers = bearer(admin)
    if key is not None:
        headers["Idempotency-Key"] = key
    data = {"name": name} if user_id is None else {"name": name, "user_id": user_id}
    return client.post("/v1/adapters", data=data, files=files, headers=headers)


# --- hostile uploads ------------------------------------------------------------------------------------


def _archive(name: str, blob: bytes) -> list:
    return [("files", (name, blob, "application/octet-stream"))]


def _two(config: bytes, weights: bytes) -> list:
    return [("files", (CONFIG, config, "application/json")), ("files", (WEIGHTS, weights, "application/octet-stream"))]


def _hostile(adapter_dir: Path) -> dict[str, tuple[list, str]]:
    config, weights = (adapter_dir / CONFIG).read_bytes(), (adapter_dir / WEIGHTS).read_bytes()
    members = {CONFIG: config, WEIGHTS: weights}
    deflated = zip_of(members)
    n = 1024
    tensor = {"dtype": "F32", "shape": [4, 64]}
    return {
        "zip crc": (_archive("a.zip", patch_zip(deflated, WEIGHTS, crc=lambda c: c ^ 1)), "crc"),
        "zip size": (_archive("a.zip", patch_zip(deflated, WEIGHTS, usize=lambda s: s + 1)), "size"),
        "zip encrypted": (_archive("a.zip", patch_zip(deflated, WEIGHTS, flags=lambda f: f | 1)), "encrypted"),
        "zip method 99": (_archive("a.zip", patch_zip(deflated, WEIGHTS, method=99)), "compression method"),
        "tar.gz flipped bit": (_archive("a.tar.gz", flipped_weight_bit(config, weights)), "crc"),
        "config nested": (_two(b"[" * 100_000 + b"]" * 100_000, weights), "nested"),
        "header nested": (_two(config, safetensors_with_header("[" * 100_000, b"")), "nested"),
        "offsets overflow": (_two(config, safetensors_with_header({"t": {**tensor, "data_offsets": [0, 2**70]}},
                                                                   b"\0" * n)), "byte range"),
        "offsets infinite": (_two(config, safetensors_with_header(
            '{"t": {"dtype": "F32", "shape": [4, 64], "data_offsets": [0, Infinity]}}', b"\0" * n)), "json"),
        "offsets negative": (_two(config, safetensors_with_header({"t": {**tensor, "data_offsets": [-n, 0]}},
                                                                   b"\0" * n)), "byte range"),
        "header surrogate": (_two(config, safetensors_with_header(
            '{"\\ud800": {"dtype": "F32", "shape": [4, 64], "data_offsets": [0, 1024]}}', b"\0" * n)), "utf-8"),
        "config wrong types": (_two(json.dumps({**json.loads(config), "target_modules": {"q": 1}}).encode(), weights),
                               "target_modules"),
    }


HOSTILE = ["zip crc", "zip size", "zip encrypted", "zip method 99", "tar.gz flipped bit", "config nested",
           "header nested", "offsets overflow", "offsets infinite", "offsets negative", "header surrogate",
           "config wrong types"]


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_upload_is_422_and_stores_nothing(client, admin, adapter_dir, case):
    files, fragment = _hostile(adapter_dir)[case]
    keys_before, rows_before = store_keys(client), rows(client, admin)
    r = post(client, admin, "hostile", files)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, list) and detail and all(isinstance(p, str) for p in detail), detail
    assert fragment in " ".join(detail).lower(), detail
    assert store_keys(client) == keys_before
    assert rows(client, admin) == rows_before


# --- Idempotency-Key ----------------------------------------------------------------------------------


def test_a_retried_upload_returns_the_first_adapter(client, admin, adapter_dir):
    first = post(client, admin, "idem-retry", adapter_files(adapter_dir), key="retry-key-1")
    assert first.status_code == 202, first.text
    keys_after_first = store_keys(client)
    again = post(client, admin, "idem-retry", adapter_files(adapter_dir), key="retry-key-1")
    assert again.status_code == 200, again.text
    assert again.headers[REPLAYED_HEADER] == "true"
    assert again.json()["id"] == first.json()["id"] and again.json()["version"] == 1
    assert [a["id"] for a in rows(client, admin, name="idem-retry")] == [first.json()["id"]]
    assert store_keys(client) == keys_after_first
    assert wait_for_status(client, admin, first.json()["id"])["status"] == "ready"
    later = post(client, admin, "idem-retry", adapter_files(adapter_dir), key="retry-key-1")
    assert later.status_code == 200 and later.json()["status"] == "ready"
    fresh = post(client, admin, "idem-retry", adapter_files(adapter_dir))  # no key: a new version
    assert fresh.status_code == 202 and fresh.json()["version"] == 2


@pytest.mark.timeout(120)
def test_concurrent_uploads_with_one_key_make_one_adapter(client, admin, adapter_dir):
    barrier = threading.Barrier(4)

    def upload(_i: int):
        barrier.wait(10)
        return post(client, admin, "idem-race", adapter_files(adapter_dir), key="race-key")

    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(upload, range(4)))
    assert sorted(r.status_code for r in responses) == [200, 200, 200, 202], [r.text for r in responses]
    ids = {r.json()["id"] for r in responses}
    listed = rows(client, admin, name="idem-race")
    assert len(ids) == 1 and [a["id"] for a in listed] == list(ids)
    assert len([k for k in store_keys(client) if listed[0]["id"] in k]) == 2


def test_the_same_key_with_another_payload_is_422(client, admin, adapter_dir, tmp_path, tiny_model_config):
    first = post(client, admin, "idem-payload", adapter_files(adapter_dir), key="payload-key")
    assert first.status_code == 202, first.text
    other = write_adapter(tmp_path / "other", tiny_model_config, seed=SEED + 1)
    user = create_user(client, admin, "idem-payload-user")
    cases = [("idem-payload", adapter_files(other), None, "sha256"),
             ("idem-payload-renamed", adapter_files(adapter_dir), None, "name"),
             ("idem-payload", adapter_files(adapter_dir), user["id"], "user_id")]
    for name, files, user_id, field in cases:
        r = post(client, admin, name, files, key="payload-key", user_id=user_id)
        assert r.status_code == 422, r.text
        detail = " ".join(r.json()["detail"])
        assert field in detail and "payload-key" in detail and first.json()["id"] in detail, detail
    assert [a["id"] for a in rows(client, admin, name="idem-payload")] == [first.json()["id"]]
    assert rows(client, admin, name="idem-payload-renamed") == []


def test_keys_are_scoped_per_tenant(client, admin, adapter_dir):
    admin_b = create_tenant(client, OPERATOR_TOKEN, "upload-faults-b")[1]
    a = post(client, admin, "idem-scoped", adapter_files(adapter_dir), key="shared-key")
    b = post(client, admin_b, "idem-scoped", adapter_files(adapter_dir), key="shared-key")
    assert (a.status_code, b.status_code) == (202, 202), (a.text, b.text)
    assert a.json()["id"] != b.json()["id"]
    assert [x["id"] for x in rows(client, admin_b, name="idem-scoped")] == [b.json()["id"]]
    assert [x["id"] for x in rows(client, admin, name="idem-scoped")] == [a.json()["id"]]


@pytest.mark.parametrize("key", ["", "k" * 256, b"caf\xe9", b"a\x01b", "tab\tin"])
def test_invalid_idempotency_keys_are_422(client, admin, adapter_dir, key):
    before = rows(client, admin)
    r = post(client, admin, "idem-invalid", adapter_files(adapter_dir), key=key)
    assert r.status_code == 422, r.text
    assert any("Idempotency-Key" in str(p.get("loc")) for p in r.json()["detail"]), r.json()
    assert rows(client, admin) == before


def test_a_255_character_printable_key_is_accepted(client, admin, adapter_dir):
    key = ("~ !" * 100)[:255]
    assert post(client, admin, "idem-long", adapter_files(adapter_dir), key=key).status_code == 202
    assert post(client, admin, "idem-long", adapter_files(adapter_dir), key=key).status_code == 200


# --- the insert race on each database -------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def session_factory(request, tmp_path):
    if request.param == "sqlite":
        url, drop = f"sqlite:///{tmp_path / 'race.db'}", (lambda: None)
    else:
        from support.postgres import new_pg_database

        url, drop = new_pg_database(request.getfixturevalue("pg_server"))
    migrate.upgrade(url)
    engine = make_engine(url)
    yield make_session_factory(engine)
    engine.dispose()
    drop()


@pytest.mark.timeout(60)
def test_concurrent_inserts_with_one_key_make_one_row(session_factory, tmp_path):
    """Eight threads insert the same upload with one key at once: the unique constraint lets one
    win, every other gets the winner's row; another tenant's same key makes its own row."""
    state = SimpleNamespace(platform=SimpleNamespace(session_factory=session_factory))
    with session_scope(session_factory) as session:
        tenant_a, tenant_b = repo.create_tenant(session, "race-a").id, repo.create_tenant(session, "race-b").id
    staged = StagedAdapter(tmp_path / CONFIG, tmp_path / WEIGHTS, "ab" * 32, 100, 4, ("q_proj",))
    barrier = threading.Barrier(8)

    def insert(tenant_id: str):
        barrier.wait(10)
        return _insert_pending(state, tenant_id, "raced", None, staged, "race-key")

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(insert, [tenant_a] * 7 + [tenant_b]))
    created_a = [created for (row, created), t in zip(results, [tenant_a] * 7 + [tenant_b]) if t == tenant_a]
    assert sorted(created_a) == [False] * 6 + [True]
    assert len({row.id for row, _ in results[:7]}) == 1 and results[7][1] and results[7][0].id != results[0][0].id
    with session_scope(session_factory) as session:
        keys = session.query(Adapter.tenant_id, Adapter.idempotency_key).all()
    assert sorted(keys) == sorted([(tenant_a, "race-key"), (tenant_b, "race-key")])


# --- the object store killed during an upload -----------------------------------------------------------


@pytest.fixture
def weed():
    with killable_seaweedfs() as server:
        yield server


@pytest.mark.timeout(180)
def test_store_killed_during_a_multipart_upload_leaves_nothing(tmp_path, tiny_checkpoint, tiny_model_config, weed):
    """SIGKILL SeaweedFS after the first part of the weights' multipart upload: 503 JSON with
    Retry-After and no row. After a restart on the same data and ports, the clean-up job removes
    what the upload could not (the config object, the unfinished multipart upload); then the
    same upload succeeds and makes exactly one adapter."""
    bucket = "tailor-faults"
    settings = Settings(data_dir=tmp_path / "data", model=str(tiny_checkpoint), operator_token=OPERATOR_TOKEN,
                        pool_bytes=32 << 20, max_upload_bytes=4 << 20, rate_limit_per_minute=0, cleanup_interval_s=0,
                        object_store="s3", s3_endpoint_url=weed.server.endpoint_url, s3_bucket=bucket,
                        s3_access_key_id=weed.server.access_key_id,
                        s3_secret_access_key=weed.server.secret_access_key)
    settings.data_dir.mkdir(parents=True)
    migrate.upgrade(settings.resolved_database_url)
    # small parts (SeaweedFS only refuses parts under 5 MiB when the upload is completed, which this
    # one never is), two tries a request: the fault answers in seconds
    store = S3Store(weed.server.endpoint_url, bucket, weed.server.region, weed.server.access_key_id,
                    weed.server.secret_access_key, create_bucket=True, multipart_threshold=64 * KiB,
                    multipart_chunksize=64 * KiB, max_attempts=2)
    big = write_adapter(tmp_path / "big", tiny_model_config, seed=SEED + 2, r=32,
                        targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    assert (big / WEIGHTS).stat().st_size > 3 * 64 * KiB
    real_upload_part = store._client.upload_part
    parts_sent: list[int] = []

    def kill_after_the_first_part(**kwargs):
        response = real_upload_part(**kwargs)
        parts_sent.append(kwargs["PartNumber"])
        if len(parts_sent) == 1:
            weed.kill()
        return response

    store._client.upload_part = kill_after_the_first_part
    platform = Platform.from_settings(settings, store=store)
    try:
        with TestClient(create_app(settings, platform=platform)) as client:
            admin = create_tenant(client, OPERATOR_TOKEN, "store-faults")[1]
            r = post(client, admin, "killed", adapter_files(big))
            assert r.status_code == 503, r.text
            assert r.headers["content-type"].startswith("application/json")
            assert "nothing was stored" in r.json()["detail"]
            assert int(r.headers["Retry-After"]) > 0
            assert parts_sent and rows(client, admin) == []

            weed.restart()
            print(f"left after the kill: objects {weed.object_keys(bucket)}, "
                  f"unfinished uploads {weed.unfinished_uploads(bucket)}")
            report = cleanup_job(platform, lambda _id: None, stale_upload_after_s=0)
            print(f"clean-up: {report}")
            assert weed.object_keys(bucket) == [] and weed.unfinished_uploads(bucket) == []

            store._client.upload_part = real_upload_part
            store.multipart_threshold = store.multipart_chunksize = 5 << 20  # what SeaweedFS completes
            r = post(client, admin, "killed", adapter_files(big), key="after-restart")
            assert r.status_code == 202, r.text
            assert wait_for_status(client, admin, r.json()["id"])["status"] == "ready"
            assert [a["id"] for a in rows(client, admin)] == [r.json()["id"]]
            assert len(weed.object_keys(bucket)) == 2 and weed.unfinished_uploads(bucket) == []
    finally:
        platform.close()


def test_an_unreachable_broker_still_stores_the_upload_pending(tmp_path, tiny_checkpoint, adapter_dir):
    """Redis down in Celery mode: the upload answers 202 ``pending`` at once (no 500, no blocked
    event loop); the clean-up queues the validation once the broker is back."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    settings = embedded_settings(tmp_path / "data", tiny_checkpoint, task_mode="celery",
                                 redis_url=f"redis://127.0.0.1:{dead_port}/0")
    settings.data_dir.mkdir(parents=True)
    migrate.upgrade(settings.resolved_database_url)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        _tenant, admin_key = create_tenant(client, OPERATOR_TOKEN, "brokerless")
        started = time.monotonic()
        r = post(client, admin_key, "while-redis-is-down", adapter_files(adapter_dir))
        assert r.status_code == 202, r.text
        assert time.monotonic() - started < 15
        assert client.get("/healthz").status_code == 200
        assert [a["status"] for a in rows(client, admin_key)] == ["pending"]
