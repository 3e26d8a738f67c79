"""The Celery application of the worker service and its tasks, ``tailor.validate_adapter``,
``tailor.train_adapter`` and ``tailor.cleanup``.

Following Celery's own advice the validation task is thin and idempotent: it calls
``tenants.adapter_validation.validate_adapter_job``, which acts only on a pending adapter and flips
its status with a conditional UPDATE. Because of that the task may run twice, so it is
acknowledged late (``task_acks_late``: a worker that dies mid-task leaves the message to be
redelivered) and rejected back to the queue if its worker process is lost. The worker takes one
message at a time (``worker_prefetch_multiplier=1``): validations are long, and prefetched
messages would wait behind them. Messages are JSON only (no pickle from the broker).

Redelivery after a crash takes seconds, not an hour: the broker's ``visibility_timeout`` is short
(``TAILOR_WORKER_VISIBILITY_TIMEOUT_S``) and live workers renew the messages they hold, so that a
long validation is never redelivered while it runs (``tenants.worker_leases``).

Transient errors (the database or the object store unreachable) are retried inside a time budget
with capped exponential backoff and jitter (``tenants.retry_policy``); the adapter stays pending
meanwhile. The budget runs from the chain's first attempt, whose time every retry message carries
(``first_attempt_at``). Invalid adapter files are never retried: the job marks them failed itself.
"""

from __future__ import annotations

import logging
import threading
import time

from celery import Celery, Task

from tenants.retry_policy import RetryPolicy, transient_errors
from tenants.settings import Settings

log = logging.getLogger(__name__)

VALIDATE_TASK = "tailor.validate_adapter"
TRAIN_TASK = "tailor.train_adapter"
CLEANUP_TASK = "tailor.cleanup"
QUEUE = "tailor"  # the Redis list the worker consumes (and the queue-length gauge reads)
ENQUEUED_AT_HEADER = "tailor_enqueued_at"  # unix time at which the task was sent

__all__ = ["CLEANUP_TASK", "QUEUE", "TRAIN_TASK", "VALIDATE_TASK", "get_platform", "make_celery", "reset_platform",
           "send_training", "send_validation", "transient_errors"]


def send_validation(app: Celery, adapter_id: str) -> None:
    """Publish one validation message, stamped with the enqueue time (a message header) so that
    the worker can measure queue lag. Broker errors are raised (kombu retries the publish a few
    times on its own)."""
    app.send_task(VALIDATE_TASK, args=[adapter_id], headers={ENQUEUED_AT_HEADER: time.time()})


def send_training(app: Celery, job_id: str) -> None:
    """Publish one training message (broker errors are raised)."""
    app.send_task(TRAIN_TASK, args=[job_id], headers={ENQUEUED_AT_HEADER: time.time()})


def make_celery(settings: Settings) -> Celery:
    """A Celery app on ``settings.redis_url`` (broker and result backend) with the three tasks.

    The clean-up is not on a Celery beat schedule: each worker's ``CleanupScheduler`` sends it
    (one worker per interval, see ``tenants.worker_leases``)."""
    from tenants.worker_leases import transport_options

    app = Celery("tailor", broker=settings.redis_url, backend=settings.redis_url)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        result_expires=3600,
        task_default_queue=QUEUE,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        broker_transport_options=transport_options(settings.worker_visibility_timeout_s),
        task_publish_retry=True,
        worker_hijack_root_logger=False,
        enable_utc=True,
    )
    app.tailor_settings = settings  # what the tasks build their Platform from
    app.tailor_retry = RetryPolicy.from_settings(settings)
    app.task(name=VALIDATE_TASK, bind=True, acks_late=True, reject_on_worker_lost=True,
             max_retries=None)(validate_adapter)
    app.task(name=TRAIN_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=0)(train_adapter)
    app.task(name=CLEANUP_TASK, bind=True, ignore_result=True)(cleanup)
    return app


def train_adapter(task: Task, job_id: str) -> str:
    """Run the training job ``job_id`` (``tenants.training.jobs.run_training_job``); returns its
    outcome. Never retried: the job records its own failure. Acknowledged late like a validation:
    a message whose worker died is redelivered, finds the job no longer queued and is skipped
    (the clean-up fails the job once its heartbeat is stale)."""
    from tenants.training.jobs import run_training_job

    return run_training_job(get_platform(task.app.tailor_settings), job_id, stop=_stop_trainings)


_stop_trainings = threading.Event()


def stop_trainings() -> None:
    """The worker is shutting down: a running training ends (failed, saying so) at its next step
    instead of outlasting the drain timeout."""
    _stop_trainings.set()


def cleanup(task: Task) -> dict:
    """The periodic clean-up (``tenants.cleanup.cleanup_job``); re-queued validations go through
    the broker like any other."""
    from tenants.cleanup import cleanup_job

    settings = task.app.tailor_settings
    report = cleanup_job(get_platform(settings), lambda adapter_id: send_validation(task.app, adapter_id),
                         requeue_after_s=settings.pending_requeue_s, give_up_after_s=settings.pending_timeout_s)
    return {"requeued": len(report.requeued), "timed_out": len(report.timed_out),
            "files_removed": report.files_removed, "orphans_removed": report.orphans_removed}


# --- the validation task ----------------------------------------------------------------------

_platform = None
_platform_lock = threading.Lock()


def get_platform(settings: Settings):
    """This process's ``Platform`` (database engine, object store, model config), built on first use."""
    global _platform
    with _platform_lock:
        if _platform is None:
            from tenants.platform import Platform

            _platform = Platform.from_settings(settings)
            if settings.inference_mode == "remote":
                from tenants.platform import remote_prefetch_hook

                _platform.ready_hooks.append(remote_prefetch_hook(settings))
        return _platform


def reset_platform() -> None:
    """Forget (and close) this process's Platform; the next task builds a new one."""
    global _platform
    with _platform_lock:
        if _platform is not None:
            _platform.close()
        _platform = None


def _observe_queue_lag(task: Task) -> None:
    """Record enqueue -> start for the first attempt of a task that carries the enqueue time."""
    from tenants.worker_metrics import observe_queue_lag

    enqueued_at = getattr(task.request, ENQUEUED_AT_HEADER, None)
    if enqueued_at is None and isinstance(task.request.headers, dict):
        enqueued_at = task.request.headers.get(ENQUEUED_AT_HEADER)
    if enqueued_at is not None and not task.request.retries:
        try:
            observe_queue_lag(time.time() - float(enqueued_at))
        except (TypeError, ValueError):
            log.warning("task %s: bad %s header %r", task.request.id, ENQUEUED_AT_HEADER, enqueued_at)


def validate_adapter(task: Task, adapter_id: str, first_attempt_at: float | None = None) -> str:
    """Validate the pending adapter ``adapter_id``; returns ready, failed or skipped.

    Every attempt is counted and timed, whatever raises, from the first line on. A transient
    error schedules a retry (``task.retry`` raises ``Retry``; outcome ``retry``) while the retry
    budget lasts; otherwise the adapter is marked failed and the error propagates (``error``).
    """
    from tenants.adapter_validation import validate_adapter_job
    from tenants.worker_metrics import observe_attempt

    started = time.perf_counter()
    first_attempt_at = first_attempt_at or time.time()
    try:
        _observe_queue_lag(task)
        platform = get_platform(task.app.tailor_settings)
        outcome = validate_adapter_job(platform, adapter_id)
    except Exception as exc:
        _after_failure(task, adapter_id, exc, first_attempt_at, time.perf_counter() - started)
        raise
    observe_attempt(outcome, time.perf_counter() - started)
    log.info("adapter %s: %s", adapter_id, outcome)
    return outcome


def _after_failure(task: Task, adapter_id: str, exc: Exception, first_attempt_at: float, seconds: float) -> None:
    """Retry ``exc`` (raises celery's ``Retry``) or give the adapter up; count the attempt."""
    from tenants.worker_metrics import observe_attempt

    policy: RetryPolicy = task.app.tailor_retry
    failures = task.request.retries
    elapsed = time.time() - first_attempt_at
    delay = policy.retry_after(exc, failures, elapsed)
    if delay is not None:
        observe_attempt("retry", seconds)
        log.warning("validating adapter %s failed (attempt %d, %.0f s into the %.0f s retry budget), "
                    "retrying in %.1f s: %s", adapter_id, failures + 1, elapsed, policy.budget_s, delay, exc)
        raise task.retry(args=[adapter_id], kwargs={"first_attempt_at": first_attempt_at}, countdown=delay,
                         exc=exc, max_retries=None)
    observe_attempt("error", seconds)
    log.error("validating adapter %s failed for good (attempt %d, %.0f s after the first)", adapter_id,
              failures + 1, elapsed, exc_info=exc)
    _give_up_quietly(task, adapter_id, policy.give_up_reason(exc, elapsed))


def _give_up_quietly(task: Task, adapter_id: str, reason: str) -> None:
    """Mark the adapter failed (no retry follows: never leave it pending for ever); an outage that
    prevents even that leaves it to the clean-up job's timeout."""
    from tenants.adapter_validation import give_up

    try:
        give_up(get_platform(task.app.tailor_settings), adapter_id, reason)
    except Exception:
        log.exception("marking adapter %s failed after the last attempt failed", adapter_id)
