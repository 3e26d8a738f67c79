"""Training jobs in ``tailor worker``: real Celery worker subprocesses over the session's Redis, a
PostgreSQL database of this module and SeaweedFS, on the tiny test model.

* A job sent through ``CeleryTaskQueue`` is trained by the worker, stored in S3 through the upload's
  path and promoted; the worker's /metrics count it.
* A worker SIGKILLed in the middle of a job leaves it ``running`` with a heartbeat that stops; once
  the heartbeat is older than ``TAILOR_TRAINING_STALE_AFTER_S`` the clean-up fails the job with a
  clear error, and no adapter exists.
"""

from __future__ import annotations

import signal
import time
import uuid

import pytest
import redis

from tenants import migrate
from tenants import repositories as repo
from tenants.celery_app import QUEUE, make_celery
from tenants.cleanup import cleanup_job
from tenants.db import session_scope
from tenants.models import Adapter, TrainingJob
from tenants.platform import Platform
from tenants.settings import Settings
from tenants.task_queue import CeleryTaskQueue
from tenants.training.repository import add_example, create_job
from tenants.worker_leases import UNACKED_INDEX_KEY

from support.postgres import new_pg_database
from support.service_fixtures import empty_bucket
from support.training_flows import style_example
from support.worker_flows import metric

WAIT_S = 120
HEARTBEAT_S = 0.2
STALE_AFTER_S = 1.0


@pytest.fixture(scope="module")
def db_url(pg_server):
    url, drop = new_pg_database(pg_server)
    migrate.upgrade(url)
    yield url
    drop()


@pytest.fixture(scope="module")
def bucket(seaweedfs):
    name = f"tailor-training-{uuid.uuid4().hex[:8]}"
    seaweedfs.client().create_bucket(Bucket=name)
    yield name
    empty_bucket(seaweedfs.client(), name)


@pytest.fixture(scope="module")
def env(db_url, redis_url, seaweedfs, bucket, tiny_checkpoint, tmp_path_factory) -> dict[str, str]:
    values = {
        "TAILOR_DATA_DIR": tmp_path_factory.mktemp("training-worker"), "TAILOR_DATABASE_URL": db_url,
        "TAILOR_TASK_MODE": "celery", "TAILOR_REDIS_URL": redis_url, "TAILOR_OBJECT_STORE": "s3",
        "TAILOR_S3_ENDPOINT_URL": seaweedfs.endpoint_url, "TAILOR_S3_BUCKET": bucket,
        "TAILOR_S3_REGION": seaweedfs.region, "TAILOR_S3_ACCESS_KEY_ID": seaweedfs.access_key_id,
        "TAILOR_S3_SECRET_ACCESS_KEY": seaweedfs.secret_access_key, "TAILOR_S3_CREATE_BUCKET": "false",
        "TAILOR_MODEL": tiny_checkpoint, "TAILOR_CLEANUP_INTERVAL_S": 0, "TAILOR_WORKER_VISIBILITY_TIMEOUT_S": 5,
        "TAILOR_TRAINING_HEARTBEAT_S": HEARTBEAT_S, "TAILOR_TRAINING_STALE_AFTER_S": STALE_AFTER_S,
        "TAILOR_TRAINING_MAX_LENGTH": 64,
    }
    return {k: str(v) for k, v in values.items()}


@pytest.fixture(scope="module")
def platform(env):
    settings = Settings(**{k.removeprefix("TAILOR_").lower(): v for k, v in env.items()})
    built = Platform.from_settings(settings)
    yield built
    built.close()


@pytest.fixture(scope="module")
def queue(redis_url):
    tasks = CeleryTaskQueue(make_celery(Settings(task_mode="celery", redis_url=redis_url)))
    yield tasks
    tasks.close()


@pytest.fixture(autouse=True)
def clean_broker(redis_url):
    yield
    client = redis.Redis.from_url(redis_url)
    client.delete(QUEUE, "unacked", UNACKED_INDEX_KEY)
    client.close()


def queued_job(platform: Platform, examples: int, **parameters) -> tuple[str, str]:
    """A new tenant and user with ``examples`` style examples and a queued job: (job id, user id)."""
    with session_scope(platform.session_factory) as session:
        tenant = repo.create_tenant(session, f"training-{uuid.uuid4().hex[:8]}")
        user = repo.create_user(session, tenant.id, "u")
        for i in range(examples):
            add_example(session, tenant.id, user.id, style_example(i)["messages"])
        job = create_job(session, tenant.id, user.id, {"start_from": "fresh", **parameters}, examples)
        return job.id, user.id


def job_row(platform: Platform, job_id: str) -> TrainingJob:
    with session_scope(platform.session_factory) as session:
        job = session.get(TrainingJob, job_id)
        session.expunge(job)
        return job


def wait_for(platform: Platform, job_id: str, until, worker=None, timeout: float = WAIT_S) -> TrainingJob:
    deadline = time.monotonic() + timeout
    while True:
        job = job_row(platform, job_id)
        if until(job):
            return job
        if worker is not None:
            assert worker.process.poll() is None, f"the worker died:\n{worker.log()}"
        assert time.monotonic() < deadline, f"job {job_id} stuck at {job.status} step {job.step}"
        time.sleep(0.05)


def user_adapters(platform: Platform, user_id: str) -> list[Adapter]:
    with session_scope(platform.session_factory) as session:
        rows = session.query(Adapter).filter(Adapter.owner_user_id == user_id).all()
        session.expunge_all()
        return rows


def test_the_worker_trains_stores_and_promotes(start_worker, env, platform, queue):
    job_id, user_id = queued_job(platform, 6, epochs=3, learning_rate=0.01)
    with start_worker(env) as worker:
        queue.submit_training(job_id)
        job = wait_for(platform, job_id, lambda j: j.status not in ("queued", "running"), worker)
        assert (job.status, job.promoted, job.error) == ("succeeded", True, None), (job.error, worker.log())
        assert job.eval_loss_after < job.eval_loss_before and job.step == job.total_steps == 9
        (adapter,) = user_adapters(platform, user_id)
        assert adapter.id == job.adapter_id and adapter.status == "ready" and adapter.version == 1
        assert adapter.provenance["training_job_id"] == job_id
        with session_scope(platform.session_factory) as session:
            assert repo.get_user(session, adapter.tenant_id, user_id).current_adapter_id == adapter.id
        assert platform.store.list_keys(adapter.storage_key)  # the files are in S3
        page = worker.metrics()
        assert metric(page, "tailor_training_jobs_total", status="succeeded") == 1
        assert metric(page, "tailor_training_adapters_total", outcome="promoted") == 1
        assert metric(page, "tailor_training_examples_count") == 1
        assert metric(page, "tailor_training_duration_seconds_count", status="succeeded") == 1


def test_a_worker_killed_mid_job_leaves_a_failed_job_and_no_adapter(start_worker, env, platform, queue):
    job_id, user_id = queued_job(platform, 40, epochs=20)
    with start_worker(env) as worker:
        queue.submit_training(job_id)
        running = wait_for(platform, job_id, lambda j: j.status == "running" and j.step >= 1, worker)
        worker.process.send_signal(signal.SIGKILL)
        worker.process.wait(10)
    assert running.total_steps == 320  # 32 of the 40 examples train (8 held out), 16 steps an epoch
    time.sleep(STALE_AFTER_S + 0.5)
    assert job_row(platform, job_id).status == "running"  # nothing ends it but the clean-up
    report = cleanup_job(platform, lambda _adapter_id: None)
    assert job_id in report.trainings_failed
    job = job_row(platform, job_id)
    assert job.status == "failed" and job.finished_at is not None and job.adapter_id is None
    assert "stopped: no heartbeat for more than 1 s; no adapter was stored" in job.error, job.error
    assert user_adapters(platform, user_id) == []
    assert cleanup_job(platform, lambda _adapter_id: None).trainings_failed == []  # once
