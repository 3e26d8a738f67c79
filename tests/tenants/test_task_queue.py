"""InProcessTaskQueue runs jobs on a thread pool and never lets a job's exception reach the caller."""

from __future__ import annotations

import logging
import threading

from tenants.settings import Settings
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
