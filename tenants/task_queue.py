"""Where background jobs go: a thread in this process (the embedded default) or Celery (production).

The api calls ``submit_validation(adapter_id)`` and ``submit_training(job_id)``; ``make_task_queue`` picks the
implementation from ``settings.task_mode``. Both run the same idempotent job,
``tenants.adapter_validation.validate_adapter_job``, with the same retry policy
(``tenants.retry_policy``: transient errors retried within a time budget, capped exponential
backoff with jitter, the adapter pending meanwhile) and record the same metric families
(``tenants.worker_metrics``): the embedded default does the worker's work, so it shows on the
same dashboards.
Training jobs (``tenants.training.jobs.run_training_job``) are not retried: a job that fails says
why, and the user asks again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

from tenants.retry_policy import RetryPolicy

if TYPE_CHECKING:
    from celery import Celery

    from tenants.platform import Platform
    from tenants.settings import Settings

log = logging.getLogger(__name__)


class TaskQueue(Protocol):
    """Runs adapter validations and training jobs in the background."""

    def submit_validation(self, adapter_id: str) -> None:
        """Queue the validation of the pending adapter ``adapter_id``; returns at once."""
        ...

    def submit_training(self, job_id: str) -> None:
        """Queue the training job ``job_id`` (queued in the database); returns at once."""
        ...

    def close(self) -> None:
        """Stop accepting work and release resources."""
        ...


@dataclass(frozen=True)
class _Job:
    adapter_id: str
    enqueued_at: float  # time.time() of the submission (queue lag)
    first_attempt_at: float | None = None  # time.time() of the chain's first attempt (retry budget)
    failures: int = 0  # failed attempts so far


class InProcessTaskQueue:
    """Jobs on a thread pool in this process, retried like the Celery task.

    ``run(adapter_id)`` returns the outcome (ready, failed, skipped). When it raises, the
    ``retry`` policy decides: a transient error is run again after a backoff (a timer puts the job
    back on the pool) while the budget lasts; otherwise ``give_up(adapter_id, reason)`` marks the
    adapter failed. Nothing is ever raised into the caller. Jobs submitted after ``close`` are
    dropped with a warning (the adapter stays pending; the clean-up job queues it again).

    Training jobs (``submit_training``) run one at a time on a thread of their own, so a training
    never delays a validation: ``train(job_id, stop)``, where ``stop`` is set by ``close`` (the
    running training ends at its next step; a job not started yet is handed to
    ``drop_training(job_id)``, which fails it)."""

    def __init__(self, run: Callable[[str], object], max_workers: int = 1, *, retry: RetryPolicy | None = None,
                 give_up: Callable[[str, str], object] | None = None,
                 train: Callable[[str, threading.Event], object] | None = None,
                 drop_training: Callable[[str], object] | None = None):
        import tenants.worker_metrics as metrics

        self._metrics = metrics
        self._run = run
        self._retry = retry or RetryPolicy()
        self._give_up = give_up
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="tailor-task")
        self._train = train
        self._drop_training = drop_training
        self._stop_training = threading.Event()
        self._trainer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tailor-training")
        self._idle = threading.Condition()
        self._outstanding = 0  # jobs submitted and not finished for good (retries included)
        self._queued = 0  # jobs on the pool that have not started
        self._timers: set[threading.Timer] = set()
        self._closed = False

    def submit_validation(self, adapter_id: str) -> None:
        """Run ``run(adapter_id)`` on the pool."""
        with self._idle:
            if self._closed:
                log.warning("task queue closed: validation of adapter %s not run", adapter_id)
                return
            self._outstanding += 1
            self._enqueue(_Job(adapter_id, time.time()))

    def submit_training(self, job_id: str) -> None:
        """Run ``train(job_id, stop)`` on the training thread (after the trainings before it)."""
        if self._train is None:
            raise RuntimeError("this task queue runs no training")
        with self._idle:
            if self._closed:
                raise RuntimeError("the task queue is closed")
            self._trainer.submit(self._training, job_id)

    def _training(self, job_id: str) -> None:
        try:
            if self._stop_training.is_set():
                if self._drop_training is not None:
                    self._drop_training(job_id)
                return
            self._train(job_id, self._stop_training)
        except Exception:  # the job records its own failures; this is a fault of recording them
            log.exception("training job %s failed", job_id)

    def _enqueue(self, job: _Job) -> None:
        """Put ``job`` on the pool (the caller holds ``_idle``)."""
        self._queued += 1
        self._metrics.QUEUE_LENGTH.set(self._queued)
        self._executor.submit(self._attempt, job).add_done_callback(self._cancelled)

    def _cancelled(self, future: Future) -> None:
        """A job that ``close(wait=False)`` took off the pool before it started."""
        if future.cancelled():
            with self._idle:
                self._queued -= 1
                self._metrics.QUEUE_LENGTH.set(self._queued)
                self._outstanding -= 1
                self._idle.notify_all()

    def _attempt(self, job: _Job) -> None:
        with self._idle:
            self._queued -= 1
            self._metrics.QUEUE_LENGTH.set(self._queued)
        if job.failures == 0:
            self._metrics.observe_queue_lag(time.time() - job.enqueued_at)
        job = job if job.first_attempt_at is not None else replace(job, first_attempt_at=time.time())
        started = time.perf_counter()
        try:
            result = self._run(job.adapter_id)
        except Exception as exc:
            self._after_failure(job, exc, time.perf_counter() - started)
            return
        if result in ("ready", "failed", "skipped"):
            self._metrics.observe_attempt(result, time.perf_counter() - started)
        self._finish()

    def _after_failure(self, job: _Job, exc: Exception, seconds: float) -> None:
        elapsed = time.time() - job.first_attempt_at
        delay = self._retry.retry_after(exc, job.failures, elapsed)
        if delay is not None:
            self._metrics.observe_attempt("retry", seconds)
            log.warning("validating adapter %s failed (attempt %d, %.0f s into the %.0f s retry budget), "
                        "retrying in %.1f s: %s", job.adapter_id, job.failures + 1, elapsed, self._retry.budget_s,
                        delay, exc)
            if not self._schedule(replace(job, failures=job.failures + 1), delay):
                log.warning("task queue closed: retry of adapter %s dropped (it stays pending)", job.adapter_id)
                self._finish()
            return
        self._metrics.observe_attempt("error", seconds)
        log.error("background validation of adapter %s failed for good (attempt %d)", job.adapter_id,
                  job.failures + 1, exc_info=exc)
        if self._give_up is not None:
            try:
                self._give_up(job.adapter_id, self._retry.give_up_reason(exc, elapsed))
            except Exception:
                log.exception("marking adapter %s failed after the last attempt failed", job.adapter_id)
        self._finish()

    def _schedule(self, job: _Job, delay: float) -> bool:
        """Put ``job`` back on the pool after ``delay`` seconds; False once the queue is closed."""
        with self._idle:
            if self._closed:
                return False
            timer = threading.Timer(delay, self._fire, (job,))
            timer.daemon = True
            timer.name = f"tailor-retry-{job.adapter_id[:8]}"
            self._timers.add(timer)
        timer.start()
        return True

    def _fire(self, job: _Job) -> None:
        with self._idle:
            timer = threading.current_thread()
            if timer not in self._timers:  # close() took it (and accounted for it)
                return
            self._timers.discard(timer)
            self._enqueue(job)

    def _finish(self) -> None:
        with self._idle:
            self._outstanding -= 1
            self._idle.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every submitted job has finished for good (scheduled retries included);
        False if ``timeout`` seconds ran out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._outstanding:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def close(self, wait: bool = True) -> None:
        """Stop accepting jobs and cancel scheduled retries (those adapters stay pending; the
        clean-up job queues them again); with ``wait`` finish the queued ones, else drop those
        not started."""
        with self._idle:
            self._closed = True
            timers, self._timers = self._timers, set()
        for timer in timers:
            timer.cancel()
        with self._idle:
            self._outstanding -= len(timers)
            self._idle.notify_all()
        if timers:
            log.warning("task queue closed: %d scheduled retries dropped", len(timers))
        self._stop_training.set()  # the running training stops at its next step; the queued ones are failed
        self._executor.shutdown(wait=wait, cancel_futures=not wait)
        self._trainer.shutdown(wait=wait)


class CeleryTaskQueue:
    """Sends ``tailor.validate_adapter`` to the Celery broker, stamped with the enqueue time (a
    message header) so that the worker can measure queue lag. Broker errors are raised."""

    def __init__(self, app: Celery):
        self.app = app

    def submit_validation(self, adapter_id: str) -> None:
        """Publish one validation message (kombu retries the publish a few times on its own)."""
        from tenants.celery_app import send_validation

        send_validation(self.app, adapter_id)

    def submit_training(self, job_id: str) -> None:
        """Publish one training message."""
        from tenants.celery_app import send_training

        send_training(self.app, job_id)

    def close(self) -> None:
        """Release the app's broker connections."""
        self.app.close()


def make_task_queue(settings: Settings, platform: Platform) -> TaskQueue:
    """A Celery queue when ``settings.task_mode`` is celery, else an in-process one on ``platform``."""
    if settings.task_mode == "celery":
        from tenants.celery_app import make_celery

        return CeleryTaskQueue(make_celery(settings))

    from tenants.adapter_validation import give_up, validate_adapter_job
    from tenants.training.jobs import fail_unstarted, run_training_job

    return InProcessTaskQueue(lambda adapter_id: validate_adapter_job(platform, adapter_id),
                              retry=RetryPolicy.from_settings(settings),
                              give_up=lambda adapter_id, reason: give_up(platform, adapter_id, reason),
                              train=lambda job_id, stop: run_training_job(platform, job_id, stop=stop),
                              drop_training=lambda job_id: fail_unstarted(
                                  platform, job_id, "the server shut down before the job started; no adapter "
                                                    "was stored"))
