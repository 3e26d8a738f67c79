"""The worker under faults, end to end: real Celery worker subprocesses over the real Redis and
PostgreSQL of the session, and a throwaway SeaweedFS of this module that the tests stop, restart
and freeze (``support.faults``).

A frozen store (SIGSTOP) is the "slow dependency" that holds a validation in flight: the worker's
first read of the adapter hangs until the store is resumed. Timing knobs are settings
(visibility timeout, retry backoff, drain timeout), set small here.
"""

from __future__ import annotations

import signal
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import redis

from tenants import migrate
from tenants.celery_app import QUEUE, VALIDATE_TASK, make_celery
from tenants.db import make_engine, make_session_factory, session_scope
from tenants.models import Adapter
from tenants.settings import Settings
from tenants.storage import S3Store
from tenants.task_queue import CeleryTaskQueue
from tenants.worker_leases import UNACKED_INDEX_KEY

UNACKED_KEY = "unacked"  # kombu's hash of the messages delivered and not acknowledged

from support.faults import session_processes, wait_for
from support.s3_faults import KillableSeaweedFS
from support.postgres import new_pg_database
from support.worker_flows import metric, pending_adapter, valid_adapter_dir

VISIBILITY_S = 5  # the broker's visibility timeout in these tests (30 s by default)
REDELIVERY_BOUND_S = 30  # a killed worker's task is done this soon (it was 5 min: the clean-up's re-queue)


@pytest.fixture(scope="module")
def weed(tmp_path_factory):
    server = KillableSeaweedFS(tmp_path_factory.mktemp("weed")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def bucket(weed) -> str:
    name = f"tailor-faults-{uuid.uuid4().hex[:8]}"
    weed.server.client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def store(weed, bucket) -> S3Store:
    s = weed.server
    return S3Store(s.endpoint_url, bucket, s.region, s.access_key_id, s.secret_access_key)


@pytest.fixture(scope="module")
def db_url(pg_server):
    url, drop = new_pg_database(pg_server)
    migrate.upgrade(url)
    yield url
    drop()


@pytest.fixture(scope="module")
def db(db_url):
    engine = make_engine(db_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def adapter_dir(tiny_checkpoint, tmp_path_factory) -> Path:
    return valid_adapter_dir(tiny_checkpoint, tmp_path_factory.mktemp("adapter"))


@pytest.fixture(scope="module")
def worker_env(db_url, redis_url, weed, bucket, tiny_checkpoint, tmp_path_factory):
    """``worker_env(**overrides)``: the environment of a worker on this module's services."""
    data_dir = tmp_path_factory.mktemp("worker-data")

    def env(**overrides: object) -> dict[str, str]:
        values = {
            "TAILOR_DATA_DIR": data_dir, "TAILOR_DATABASE_URL": db_url, "TAILOR_REDIS_URL": redis_url,
            "TAILOR_OBJECT_STORE": "s3", "TAILOR_S3_ENDPOINT_URL": weed.server.endpoint_url,
            "TAILOR_S3_BUCKET": bucket, "TAILOR_S3_REGION": weed.server.region,
            "TAILOR_S3_ACCESS_KEY_ID": weed.server.access_key_id,
            "TAILOR_S3_SECRET_ACCESS_KEY": weed.server.secret_access_key,
            "TAILOR_S3_CREATE_BUCKET": "false", "TAILOR_MODEL": tiny_checkpoint,
            "TAILOR_WORKER_VISIBILITY_TIMEOUT_S": VISIBILITY_S, "TAILOR_CLEANUP_INTERVAL_S": 0,
            "TAILOR_VALIDATION_RETRY_INITIAL_S": 0.5, "TAILOR_VALIDATION_RETRY_MAX_S": 2,
            "TAILOR_VALIDATION_RETRY_BUDGET_S": 300, "TAILOR_WORKER_DRAIN_TIMEOUT_S": 30,
        }
        values.update({f"TAILOR_{k.upper()}": v for k, v in overrides.items()})
        return {k: str(v) for k, v in values.items()}

    return env


@pytest.fixture(scope="module")
def queue(redis_url):
    tasks = CeleryTaskQueue(make_celery(Settings(task_mode="celery", redis_url=redis_url)))
    yield tasks
    tasks.close()


@pytest.fixture(scope="module")
def broker(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(autouse=True)
def clean_slate(weed, broker):
    """Every test ends with the store up and no message left in Redis (a failed test may leave the
    store frozen or down, and messages that the next test's worker would receive)."""
    yield
    weed.resume()
    if weed.process.poll() is not None:
        weed.start()
    broker.delete(QUEUE, UNACKED_KEY, UNACKED_INDEX_KEY)


def status(db, adapter_id: str) -> str:
    with session_scope(db) as session:
        return session.get(Adapter, adapter_id).status


def wait_for_ready(db, adapter_id: str, timeout: float, worker=None) -> list[str]:
    """Poll the adapter until it is ready; returns every status seen (fails on ``failed``)."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while not seen or seen[-1] != "ready":
        seen.append(status(db, adapter_id))
        assert seen[-1] in ("pending", "ready"), f"adapter became {seen[-1]}: {worker and worker.log()}"
        assert time.monotonic() < deadline, f"adapter still {seen[-1]} after {timeout} s: {worker and worker.log()}"
        time.sleep(0.2)
    return seen


def received(worker) -> int:
    """How many validation messages the worker has received (Celery's log line)."""
    return sum(1 for line in worker.log().splitlines() if f"{VALIDATE_TASK}[" in line and "received" in line)


def cleanups(log: str) -> int:
    """How many clean-up tasks finished in this piece of a worker's log."""
    return sum(1 for line in log.splitlines() if "tailor.cleanup[" in line and "succeeded" in line)


def readyz(worker) -> int:
    url = worker.metrics_url.replace("/metrics", "/readyz")
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_killed_worker_leaves_no_process_behind(start_worker, worker_env):
    """The clean-up scheduler is a thread: no embedded beat process survives its parent (each crash
    used to leave one more scheduler running)."""
    with start_worker(worker_env(cleanup_interval_s=300)) as worker:
        worker.process.send_signal(signal.SIGKILL)
        worker.process.wait(10)
        assert session_processes(worker.process.pid) == []


def test_a_killed_workers_task_is_redelivered_in_seconds(
        start_worker, worker_env, queue, db, store, adapter_dir, weed):
    adapter_id, _ = pending_adapter(db, store, adapter_dir)
    weed.pause()  # the validation will hang on its first read: the worker holds the task
    with start_worker(worker_env()) as first:
        queue.submit_validation(adapter_id)
        wait_for(lambda: received(first) == 1, 30, what="the task received")
        time.sleep(0.5)
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(10)
        killed_at = time.monotonic()
    weed.resume()
    assert status(db, adapter_id) == "pending"
    with start_worker(worker_env()) as second:
        wait_for_ready(db, adapter_id, REDELIVERY_BOUND_S, second)
        assert time.monotonic() - killed_at < REDELIVERY_BOUND_S
        assert received(second) == 1


def test_a_long_validation_on_a_live_worker_is_not_redelivered(
        start_worker, worker_env, queue, db, store, adapter_dir, weed, broker):
    """The visibility timeout is short, but a live worker renews the messages it holds: a task that
    runs for three timeouts stays with its worker, although an idle second worker sweeps for
    expired messages all along (a busy solo worker does not sweep)."""
    adapter_id, _ = pending_adapter(db, store, adapter_dir)
    weed.pause()
    with start_worker(worker_env()) as one, start_worker(worker_env()) as two:
        queue.submit_validation(adapter_id)
        wait_for(lambda: received(one) + received(two) == 1, 30, what="the task received")
        held = wait_for(lambda: broker.zrange(UNACKED_INDEX_KEY, 0, -1, withscores=True), 5,
                        what="the unacked entry")
        (tag,) = [tag for tag, score in held if time.time() - score < VISIBILITY_S]
        deadline = time.monotonic() + 3 * VISIBILITY_S + 2
        while time.monotonic() < deadline:
            assert received(one) + received(two) == 1, "the running task was delivered again"
            assert broker.zscore(UNACKED_INDEX_KEY, tag) is not None, "the running task was restored"
            time.sleep(0.5)
        weed.resume()
        wait_for_ready(db, adapter_id, 60, one)
        assert received(one) + received(two) == 1


def test_a_store_outage_during_validation_keeps_the_adapter_pending_and_it_ends_ready(
        start_worker, worker_env, queue, db, store, adapter_dir, weed):
    adapter_id, _ = pending_adapter(db, store, adapter_dir)
    weed.stop()
    with start_worker(worker_env()) as worker:
        before = {o: metric(worker.metrics(), "tailor_worker_validations_total", outcome=o) for o in ("retry", "error")}
        queue.submit_validation(adapter_id)
        wait_for(lambda: metric(worker.metrics(), "tailor_worker_validations_total", outcome="retry")
                 >= before["retry"] + 1, 40, interval=0.3, what="a retried attempt")
        assert status(db, adapter_id) == "pending"
        weed.start()
        seen = wait_for_ready(db, adapter_id, 40, worker)
        assert set(seen) <= {"pending", "ready"}
        text = worker.metrics()
        assert metric(text, "tailor_worker_validations_total", outcome="error") == before["error"]
        assert metric(text, "tailor_worker_validations_total", outcome="ready") >= 1


def test_two_workers_send_the_cleanup_once_per_interval(start_worker, worker_env):
    interval, window = 2, 10
    env = worker_env(cleanup_interval_s=interval)
    with start_worker(env) as one, start_worker(env) as two:
        wait_for(lambda: cleanups(one.log()) + cleanups(two.log()), 30, what="a first clean-up")
        marks = [len(one.log()), len(two.log())]
        time.sleep(window)
        runs = cleanups(one.log()[marks[0]:]) + cleanups(two.log()[marks[1]:])
    assert window / interval - 2 <= runs <= window / interval + 1, f"{runs} clean-ups in {window} s"


def test_sigterm_drops_readiness_at_once_finishes_the_task_and_exits_0(
        start_worker, worker_env, queue, db, store, adapter_dir, weed):
    adapter_id, _ = pending_adapter(db, store, adapter_dir)
    with start_worker(worker_env()) as worker:
        assert readyz(worker) == 200
        weed.pause()
        queue.submit_validation(adapter_id)
        wait_for(lambda: received(worker) == 1, 30, what="the task received")
        worker.process.send_signal(signal.SIGTERM)
        wait_for(lambda: readyz(worker) == 503, 2, what="readiness gone")
        time.sleep(1)
        assert worker.process.poll() is None  # draining: the task still runs
        weed.resume()
        assert worker.process.wait(30) == 0
        assert status(db, adapter_id) == "ready"


def test_sigterm_exits_1_when_the_task_outlasts_the_drain_timeout(
        start_worker, worker_env, queue, db, store, adapter_dir, weed):
    adapter_id, _ = pending_adapter(db, store, adapter_dir)
    with start_worker(worker_env(worker_drain_timeout_s=2)) as worker:
        weed.pause()
        queue.submit_validation(adapter_id)
        wait_for(lambda: received(worker) == 1, 30, what="the task received")
        worker.process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert worker.process.wait(15) == 1
        assert time.monotonic() - started < 10
        assert "drain timeout" in worker.log()
    weed.resume()
    with start_worker(worker_env()) as successor:  # the message comes back after the visibility timeout
        wait_for_ready(db, adapter_id, REDELIVERY_BOUND_S, successor)



def test_the_in_process_queue_rides_out_a_store_outage_too(weed, bucket, adapter_dir, tiny_checkpoint, tmp_path):
    """The embedded default's queue (a thread in the api) retries like the worker: the adapter
    stays pending during the outage and ends ready, and the validation metrics show it."""
    from tenants.platform import Platform
    from tenants.task_queue import make_task_queue
    from tenants.worker_metrics import VALIDATIONS

    s = weed.server
    settings = Settings(data_dir=tmp_path, model=str(tiny_checkpoint), object_store="s3", s3_endpoint_url=s.endpoint_url,
                        s3_bucket=bucket, s3_region=s.region, s3_access_key_id=s.access_key_id,
                        s3_secret_access_key=s.secret_access_key, s3_create_bucket=False,
                        validation_retry_initial_s=0.5, validation_retry_max_s=2, validation_retry_budget_s=300)
    migrate.upgrade(settings.resolved_database_url)
    platform = Platform.from_settings(settings)
    tasks = make_task_queue(settings, platform)
    retries = VALIDATIONS.labels(outcome="retry")._value.get()
    try:
        adapter_id, _ = pending_adapter(platform.session_factory, platform.store, adapter_dir)
        weed.stop()
        tasks.submit_validation(adapter_id)
        wait_for(lambda: VALIDATIONS.labels(outcome="retry")._value.get() > retries, 40, what="a retried attempt")
        assert status(platform.session_factory, adapter_id) == "pending"
        weed.start()
        seen = wait_for_ready(platform.session_factory, adapter_id, 40)
        assert set(seen) <= {"pending", "ready"}
        assert tasks.wait_idle(10)
    finally:
        tasks.close()
        platform.close()
