"""InProcessTaskQueue runs jobs on a thread pool, never lets a job's exception reach the caller,
retries transient errors within a time budget and records the validation metrics."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from tenants.retry_policy import RetryPolicy
from tenants.settings import Settings
from tenants.storage import StoreUnavailableError
from tenants.task_queue import CeleryTaskQueue, InProcessTaskQueue, make_task_queue


def test_runs_submitted_jobs():
    done = []
    queue = InProcessTaskQueue(done.append)
    for adapter_id in ("a", "b", "c"):
        queue.submit_validation(adapter_id)
    assert queue.wait_idle(10)
    assert done == ["a", "b", "c"]  # one worker: in submission order
    queue.close()


def test_survives_a_job_that_raises(caplog):
    done = []

    def run(adapter_id: str) -> str:
        if adapter_id == "bad":
            raise RuntimeError("boom")
        done.append(adapter_id)
        return "ready"

    queue = InProcessTaskQueue(run)
    with caplog.at_level(logging.ERROR, logger="tenants.task_queue"):
        queue.submit_validation("bad")  # does not raise here ...
        queue.submit_validation("good")
        assert queue.wait_idle(10)
    assert done == ["good"]  # ... and the pool still runs later jobs
    assert "bad" in caplog.text and "boom" in caplog.text
    queue.close()


def test_wait_idle_times_out_while_a_job_runs():
    release = threading.Event()
    queue = InProcessTaskQueue(lambda _id: release.wait(10), max_workers=2)
    queue.submit_validation("slow")
    assert not queue.wait_idle(0.1)
    release.set()
    assert queue.wait_idle(10)
    queue.close()


def test_close_waits_for_queued_jobs_and_refuses_new_ones(caplog):
    done = []
    queue = InProcessTaskQueue(done.append)
    queue.submit_validation("a")
    queue.close(wait=True)
    assert done == ["a"]
    with caplog.at_level(logging.WARNING, logger="tenants.task_queue"):
        queue.submit_validation("late")  # dropped with a warning, not an exception
    assert done == ["a"] and "late" in caplog.text


def test_close_without_wait_drops_jobs_not_started():
    started, release = threading.Event(), threading.Event()
    done = []

    def run(adapter_id: str) -> None:
        started.set()
        release.wait(10)
        done.append(adapter_id)

    queue = InProcessTaskQueue(run)
    queue.submit_validation("first")
    queue.submit_validation("second")
    assert started.wait(10)
    queue.close(wait=False)  # "second" is still queued behind the running "first"
    release.set()
    assert queue.wait_idle(10)
    assert done == ["first"]


def test_make_task_queue_follows_the_settings():
    inprocess = make_task_queue(Settings(), platform=object())
    assert isinstance(inprocess, InProcessTaskQueue)
    inprocess.close()
    celery = make_task_queue(Settings(task_mode="celery", redis_url="redis://127.0.0.1:1/0"), platform=object())
    assert isinstance(celery, CeleryTaskQueue)
    assert "tailor.validate_adapter" in celery.app.tasks
    celery.close()


# --- retries and metrics (the same policy and metric families as the Celery task) ---------------

def _counts() -> dict[str, float]:
    from tenants.worker_metrics import OUTCOMES, VALIDATIONS

    return {outcome: VALIDATIONS.labels(outcome=outcome)._value.get() for outcome in OUTCOMES}


def _delta(before: dict[str, float]) -> dict[str, float]:
    return {k: v - before[k] for k, v in _counts().items() if v != before[k]}


FAST = RetryPolicy(budget_s=5.0, initial_s=0.05, max_s=0.2)


def test_a_transient_error_is_retried_with_backoff_until_it_succeeds():
    attempts: list[float] = []

    def flaky(adapter_id: str) -> str:
        attempts.append(time.monotonic())
        if len(attempts) < 4:
            raise StoreUnavailableError("S3 is down")
        return "ready"

    given_up = []
    queue = InProcessTaskQueue(flaky, retry=FAST, give_up=lambda *args: given_up.append(args))
    before = _counts()
    queue.submit_validation("a1")
    assert queue.wait_idle(10)  # idle only once the retries are done
    assert len(attempts) == 4 and given_up == []
    assert _delta(before) == {"retry": 3, "ready": 1}
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    assert gaps[0] >= 0.025 and gaps[2] >= 0.1  # d/2 .. d with d = 0.05, 0.1, 0.2
    queue.close()


def test_when_the_budget_is_spent_the_adapter_is_given_up():
    attempts = []

    def down(adapter_id: str) -> str:
        attempts.append(adapter_id)
        raise StoreUnavailableError("S3 is down")

    given_up = []
    queue = InProcessTaskQueue(down, retry=RetryPolicy(budget_s=0.5, initial_s=0.05, max_s=0.1),
                               give_up=lambda adapter_id, reason: given_up.append((adapter_id, reason)))
    before = _counts()
    queue.submit_validation("a1")
    assert queue.wait_idle(10)
    assert len(attempts) >= 5  # 0.5 s of attempts 0.05-0.1 s apart
    assert given_up and given_up[0][0] == "a1" and "S3 is down" in given_up[0][1]
    delta = _delta(before)
    assert delta["error"] == 1 and delta["retry"] == len(attempts) - 1
    queue.close()


def test_a_bug_is_not_retried_and_the_adapter_is_given_up():
    given_up = []
    queue = InProcessTaskQueue(lambda _id: {}["missing"], retry=FAST,
                               give_up=lambda adapter_id, reason: given_up.append(adapter_id))
    before = _counts()
    queue.submit_validation("a1")
    assert queue.wait_idle(10)
    assert given_up == ["a1"] and _delta(before) == {"error": 1}
    queue.close()


def test_close_cancels_scheduled_retries_without_giving_up():
    given_up = []
    queue = InProcessTaskQueue(lambda _id: (_ for _ in ()).throw(StoreUnavailableError("down")),
                               retry=RetryPolicy(budget_s=60, initial_s=30, max_s=30),
                               give_up=lambda *args: given_up.append(args))
    queue.submit_validation("a1")
    deadline = time.monotonic() + 10
    while not queue._timers and time.monotonic() < deadline:  # the first attempt failed, a retry waits
        time.sleep(0.01)
    assert not queue.wait_idle(0.1)
    started = time.monotonic()
    queue.close()
    assert time.monotonic() - started < 5 and queue.wait_idle(1)
    assert given_up == []  # the adapter stays pending: the clean-up job queues it again


def test_queue_lag_and_length_are_recorded():
    from tenants.worker_metrics import QUEUE_LAG, QUEUE_LENGTH

    release = threading.Event()
    lags_before = sum(b.get() for b in QUEUE_LAG._buckets)
    queue = InProcessTaskQueue(lambda _id: release.wait(10) and "ready")
    for adapter_id in ("a", "b", "c"):
        queue.submit_validation(adapter_id)
    deadline = time.monotonic() + 5
    while QUEUE_LENGTH._value.get() != 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert QUEUE_LENGTH._value.get() == 2  # one runs, two wait
    release.set()
    assert queue.wait_idle(10)
    assert QUEUE_LENGTH._value.get() == 0
    assert sum(b.get() for b in QUEUE_LAG._buckets) == lags_before + 3
    queue.close()


def test_trainings_run_one_at_a_time_on_their_own_thread_and_stop_at_close():
    """A training never holds up a validation; ``close`` stops the running training (its ``stop``
    event) and hands the ones not started to ``drop_training`` (which fails them)."""
    started, dropped, validated = [], [], []
    running = threading.Event()

    def train(job_id: str, stop: threading.Event) -> None:
        started.append((job_id, threading.current_thread().name))
        running.set()
        assert stop.wait(30), "close() never set the stop event"

    queue = InProcessTaskQueue(validated.append, train=train, drop_training=dropped.append)
    queue.submit_training("job-1")
    queue.submit_training("job-2")
    assert running.wait(10)
    queue.submit_validation("adapter-1")  # not behind the running training
    assert queue.wait_idle(10) and validated == ["adapter-1"]
    queue.close()
    assert [job for job, _ in started] == ["job-1"] and started[0][1].startswith("tailor-training")
    assert dropped == ["job-2"]


def test_a_queue_without_training_refuses_it_and_a_closed_one_too():
    queue = InProcessTaskQueue(lambda _adapter_id: None)
    with pytest.raises(RuntimeError, match="runs no training"):
        queue.submit_training("job")
    queue.close()
    trainer = InProcessTaskQueue(lambda _adapter_id: None, train=lambda _job, _stop: None)
    trainer.close()
    with pytest.raises(RuntimeError, match="closed"):
        trainer.submit_training("job")
