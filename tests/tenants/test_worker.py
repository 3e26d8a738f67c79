"""The worker service end to end: a real Celery worker subprocess (``python -m tenants.worker``)
over Redis, PostgreSQL and SeaweedFS validates adapters submitted through ``CeleryTaskQueue``."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from benchmarks.synthetic_adapters import synthetic_adapter
from inference.model_config import ModelConfig
from tenants import migrate
from tenants.celery_app import make_celery
from tenants.db import make_engine, make_session_factory, session_scope
from tenants.models import Adapter
from tenants.platform import WEIGHTS_FILE
from tenants.settings import Settings
from tenants.storage import S3Store
from tenants.task_queue import CeleryTaskQueue

from support.worker_flows import metric, pending_adapter

WAIT_S = 90  # the worker validates in well under a second; leave room for a loaded CI machine


@pytest.fixture(scope="module")
def worker_db(postgres_url):
    migrate.upgrade(postgres_url)
    engine = make_engine(postgres_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def bucket(seaweedfs):
    from support.service_fixtures import empty_bucket

    name = f"tailor-worker-{uuid.uuid4().hex[:8]}"
    seaweedfs.client().create_bucket(Bucket=name)
    yield name
    empty_bucket(seaweedfs.client(), name)


@pytest.fixture(scope="module")
def store(seaweedfs, bucket) -> S3Store:
    return S3Store(seaweedfs.endpoint_url, bucket, seaweedfs.region, seaweedfs.access_key_id,
                   seaweedfs.secret_access_key)


@pytest.fixture(scope="module")
def worker(start_worker, postgres_url, worker_db, redis_url, seaweedfs, bucket, tiny_checkpoint, tmp_path_factory):
    env = {
        "TAILOR_DATA_DIR": str(tmp_path_factory.mktemp("worker-data")),
        "TAILOR_DATABASE_URL": postgres_url,
        "TAILOR_REDIS_URL": redis_url,
        "TAILOR_OBJECT_STORE": "s3",
        "TAILOR_S3_ENDPOINT_URL": seaweedfs.endpoint_url,
        "TAILOR_S3_BUCKET": bucket,
        "TAILOR_S3_REGION": seaweedfs.region,
        "TAILOR_S3_ACCESS_KEY_ID": seaweedfs.access_key_id,
        "TAILOR_S3_SECRET_ACCESS_KEY": seaweedfs.secret_access_key,
        "TAILOR_MODEL": str(tiny_checkpoint),
    }
    with start_worker(env) as running:
        yield running


@pytest.fixture(scope="module")
def queue(redis_url):
    tasks = CeleryTaskQueue(make_celery(Settings(task_mode="celery", redis_url=redis_url)))
    yield tasks
    tasks.close()


@pytest.fixture(scope="module")
def adapter_files(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """Adapter folders for the tiny model: ``valid`` and ``nan`` (one tensor holds a NaN)."""
    model = ModelConfig.from_checkpoint(tiny_checkpoint)
    root = tmp_path_factory.mktemp("adapters")
    valid = synthetic_adapter(root / "valid", model, r=4, targets=("q_proj", "v_proj"), alpha=8, seed=1)
    nan = synthetic_adapter(root / "nan", model, r=4, targets=("q_proj", "v_proj"), alpha=8, seed=2)
    tensors = load_file(str(nan / WEIGHTS_FILE))
    poisoned = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[poisoned][0, 0] = float("nan")
    save_file(tensors, str(nan / WEIGHTS_FILE))
    return {"valid": valid, "nan": nan}


def wait_for_status(session_factory, adapter_id: str, worker, timeout: float = WAIT_S) -> Adapter:
    """Poll the database until the adapter is no longer pending."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope(session_factory) as session:
            adapter = session.get(Adapter, adapter_id)
            if adapter.status != "pending":
                session.expunge(adapter)
                return adapter
        assert worker.process.poll() is None, f"the worker died:\n{worker.log()}"
        time.sleep(0.2)
    raise AssertionError(f"adapter {adapter_id} still pending after {timeout} s:\n{worker.log()}")


def wait_for_metric(worker, name: str, at_least: float, timeout: float = WAIT_S, **labels: str) -> float:
    deadline = time.monotonic() + timeout
    while True:
        value = metric(worker.metrics(), name, **labels)
        if value >= at_least or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def test_valid_adapter_becomes_ready(worker, queue, worker_db, store, adapter_files):
    adapter_id, prefix = pending_adapter(worker_db, store, adapter_files["valid"])
    queue.submit_validation(adapter_id)
    adapter = wait_for_status(worker_db, adapter_id, worker)
    assert adapter.status == "ready", adapter.failure_reason
    assert adapter.rank == 4 and sorted(adapter.target_modules) == ["q_proj", "v_proj"]
    assert adapter.failure_reason is None
    assert len(store.list_keys(prefix)) == 2  # a ready adapter keeps its files

    text = worker.metrics()
    assert metric(text, "tailor_worker_validations_total", outcome="ready") >= 1
    assert metric(text, "tailor_worker_validation_duration_seconds_count") >= 1
    assert metric(text, "tailor_worker_queue_lag_seconds_count") >= 1
    assert "tailor_worker_queue_length" in text


def test_adapter_with_nan_weights_fails_and_its_files_are_deleted(worker, queue, worker_db, store, adapter_files):
    adapter_id, prefix = pending_adapter(worker_db, store, adapter_files["nan"])
    assert len(store.list_keys(prefix)) == 2
    queue.submit_validation(adapter_id)
    adapter = wait_for_status(worker_db, adapter_id, worker)
    assert adapter.status == "failed"
    assert "NaN" in adapter.failure_reason and "layers.1.self_attn.v_proj.lora_B" in adapter.failure_reason
    assert store.list_keys(prefix) == []
    assert wait_for_metric(worker, "tailor_worker_validations_total", 1, outcome="failed") >= 1


def test_submitting_the_same_adapter_twice_is_harmless(worker, queue, worker_db, store, adapter_files):
    skipped_before = metric(worker.metrics(), "tailor_worker_validations_total", outcome="skipped")
    adapter_id, prefix = pending_adapter(worker_db, store, adapter_files["valid"])
    queue.submit_validation(adapter_id)
    queue.submit_validation(adapter_id)
    adapter = wait_for_status(worker_db, adapter_id, worker)
    assert adapter.status == "ready"
    # the second message finds the adapter no longer pending and does nothing
    assert wait_for_metric(worker, "tailor_worker_validations_total", skipped_before + 1, outcome="skipped") \
        == skipped_before + 1
    with session_scope(worker_db) as session:
        assert session.get(Adapter, adapter_id).status == "ready"
    assert len(store.list_keys(prefix)) == 2
    assert metric(worker.metrics(), "tailor_worker_validations_total", outcome="error") == 0


def test_unknown_adapter_id_is_skipped(worker, queue):
    skipped_before = metric(worker.metrics(), "tailor_worker_validations_total", outcome="skipped")
    queue.submit_validation(uuid.uuid4().hex)
    assert wait_for_metric(worker, "tailor_worker_validations_total", skipped_before + 1, outcome="skipped") \
        >= skipped_before + 1


def test_the_queue_length_gauge_reads_redis(worker, redis_url):
    import redis

    from tenants.celery_app import QUEUE
    from tenants.worker import QueueLengthSampler

    deadline = time.monotonic() + 20  # the worker samples every 5 s; the queue is drained by now
    while metric(worker.metrics(), "tailor_worker_queue_length") != 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert metric(worker.metrics(), "tailor_worker_queue_length") == 0

    client = redis.Redis.from_url(redis_url)
    probe = f"probe-{uuid.uuid4().hex[:8]}"  # not the worker's queue: nothing consumes it
    client.rpush(probe, "a", "b", "c")
    sampler = QueueLengthSampler(redis_url, probe)
    assert sampler.sample() == 3
    assert client.llen(QUEUE) == 0
    client.delete(probe)
    client.close()


def test_nan_adapter_files_are_what_the_test_thinks(adapter_files):
    """Guard for the failure test: the poisoned tensor really holds a NaN, the valid one none."""
    assert torch.isnan(load_file(str(adapter_files["nan"] / WEIGHTS_FILE))[
        "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]).any()
    assert all(torch.isfinite(t).all() for t in load_file(str(adapter_files["valid"] / WEIGHTS_FILE)).values())


def test_worker_refuses_settings_without_celery():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("TAILOR_")}
    result = subprocess.run([sys.executable, "-m", "tenants.worker"], env=env, capture_output=True, text=True,
                            timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 2
    assert "TAILOR_TASK_MODE=celery" in result.stderr
