"""The Celery application of the worker service and its one task, ``tailor.validate_adapter``.

Following Celery's own advice the task is thin and idempotent: it calls
``tenants.adapter_validation.validate_adapter_job``, which acts only on a pending adapter and flips
its status with a conditional UPDATE. Because of that the task may run twice, so it is
acknowledged late (``task_acks_late``: a worker that dies mid-task leaves the message to be
redelivered) and rejected back to the queue if its worker process is lost. The worker takes one
message at a time (``worker_prefetch_multiplier=1``): validations are long, and prefetched
messages would wait behind them. Messages are JSON only (no pickle from the broker).

Transient errors (the database or the object store unreachable) are retried with exponential
backoff and jitter; invalid adapter files are never retried: the job marks them failed itself.
"""

from __future__ import annotations

import logging
import threading
import time

from celery import Celery, Task

from tenants.settings import Settings

log = logging.getLogger(__name__)

VALIDATE_TASK = "tailor.validate_adapter"
QUEUE = "tailor"  # the Redis list the worker consumes (and the queue-length gauge reads)
ENQUEUED_AT_HEADER = "tailor_enqueued_at"  # unix time at which the task was sent
MAX_RETRIES = 5
RETRY_BACKOFF_MAX_S = 120


def transient_errors() -> tuple[type[BaseException], ...]:
    """Exceptions worth retrying: the store or the database unreachable, or a timeout."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError
    from sqlalchemy.exc import InterfaceError, OperationalError

    from tenants.storage import StoreUnavailableError

    return (
        StoreUnavailableError,
        OperationalError,  # the DBAPI's connection errors (psycopg, sqlite "database is locked")
        InterfaceError,
        BotoConnectionError,
        HTTPClientError,
        ConnectionError,
        TimeoutError,
    )


def make_celery(settings: Settings) -> Celery:
    """A Celery app on ``settings.redis_url`` (broker and result backend) with the validation task."""
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
        # With acks_late, Redis redelivers a message whose worker has not acknowledged it after
        # the visibility timeout; keep it well above the longest validation.
        broker_transport_options={"visibility_timeout": 3600},
        task_publish_retry=True,
        worker_hijack_root_logger=False,
        enable_utc=True,
    )
    if settings.cleanup_interval_s > 0:
        app.conf.beat_schedule = {
            "tailor-cleanup": {"task": CLEANUP_TASK, "schedule": settings.cleanup_interval_s},
        }
    app.tailor_settings = settings  # what the task builds its Platform from
    _register_validate_task(app)
    app.task(name=CLEANUP_TASK, bind=True, ignore_result=True)(cleanup)
    return app


CLEANUP_TASK = "tailor.cleanup"


def cleanup(task: Task) -> dict:
    """The periodic clean-up (``tenants.cleanup.cleanup_job``); re-queued validations go through
    the broker like any other."""
    from tenants.cleanup import cleanup_job
    from tenants.task_queue import CeleryTaskQueue

    settings = task.app.tailor_settings
    queue = CeleryTaskQueue(task.app)
    report = cleanup_job(get_platform(settings), queue.submit_validation,
                         requeue_after_s=settings.pending_requeue_s, give_up_after_s=settings.pending_timeout_s)
    return {"requeued": len(report.requeued), "timed_out": len(report.timed_out),
            "files_removed": report.files_removed, "orphans_removed": report.orphans_removed}


def _register_validate_task(app: Celery) -> None:
    app.task(
        name=VALIDATE_TASK,
        bind=True,
        autoretry_for=transient_errors(),
        retry_backoff=True,
        retry_backoff_max=RETRY_BACKOFF_MAX_S,
        retry_jitter=True,
        max_retries=MAX_RETRIES,
        acks_late=True,
        reject_on_worker_lost=True,
    )(validate_adapter)


# --- the task -----------------------------------------------------------------------------------

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
    from tenants.worker_metrics import QUEUE_LAG

    enqueued_at = getattr(task.request, ENQUEUED_AT_HEADER, None)
    if enqueued_at is None and isinstance(task.request.headers, dict):
        enqueued_at = task.request.headers.get(ENQUEUED_AT_HEADER)
    if enqueued_at is not None and not task.request.retries:
        try:
            QUEUE_LAG.observe(max(0.0, time.time() - float(enqueued_at)))
        except (TypeError, ValueError):
            log.warning("task %s: bad %s header %r", task.request.id, ENQUEUED_AT_HEADER, enqueued_at)


def validate_adapter(task: Task, adapter_id: str) -> str:
    """Validate the pending adapter ``adapter_id``; returns ready, failed or skipped.

    Counts the outcome (``error`` when the attempt raises) and times the attempt. Exceptions
    propagate so that Celery retries the transient ones (``autoretry_for``).
    """
    from tenants.adapter_validation import give_up, validate_adapter_job
    from tenants.worker_metrics import VALIDATION_DURATION, VALIDATIONS

    _observe_queue_lag(task)
    platform = get_platform(task.app.tailor_settings)
    started = time.perf_counter()
    try:
        outcome = validate_adapter_job(platform, adapter_id)
    except Exception as exc:
        VALIDATIONS.labels(outcome="error").inc()
        log.warning("validating adapter %s failed (attempt %d)", adapter_id, task.request.retries + 1, exc_info=True)
        if not isinstance(exc, transient_errors()) or task.request.retries >= MAX_RETRIES:
            # no retry follows: never leave the adapter pending forever
            try:
                give_up(platform, adapter_id, f"validation could not complete: {exc}")
            except Exception:
                log.exception("marking adapter %s failed after the last attempt failed", adapter_id)
        raise
    finally:
        VALIDATION_DURATION.observe(time.perf_counter() - started)
    VALIDATIONS.labels(outcome=outcome).inc()
    log.info("adapter %s: %s", adapter_id, outcome)
    return outcome
