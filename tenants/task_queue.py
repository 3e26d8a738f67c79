"""Where background jobs go: a thread in this process (the embedded default) or Celery (production).

The api only calls ``submit_validation(adapter_id)``; ``make_task_queue`` picks the
implementation from ``settings.task_mode``. Both run the same idempotent job,
``tenants.adapter_validation.validate_adapter_job``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from celery import Celery

    from tenants.platform import Platform
    from tenants.settings import Settings

log = logging.getLogger(__name__)


class TaskQueue(Protocol):
    """Runs adapter validations in the background."""

    def submit_validation(self, adapter_id: str) -> None:
        """Queue the validation of the pending adapter ``adapter_id``; returns at once."""
        ...

    def close(self) -> None:
        """Stop accepting work and release resources."""
        ...


class InProcessTaskQueue:
    """Jobs on a thread pool in this process. A job's exception is logged, never raised into the
    caller; jobs submitted after ``close`` are dropped with a warning (the adapter stays pending)."""

    def __init__(self, run: Callable[[str], object], max_workers: int = 1):
        self._run = run
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="tailor-task")
        self._pending: set[Future] = set()
        self._idle = threading.Condition()
        self._closed = False

    def submit_validation(self, adapter_id: str) -> None:
        """Run ``run(adapter_id)`` on the pool."""
        with self._idle:
            if self._closed:
                log.warning("task queue closed: validation of adapter %s not run", adapter_id)
                return
            future = self._executor.submit(self._run_logged, adapter_id)
            self._pending.add(future)
        future.add_done_callback(self._done)

    def _run_logged(self, adapter_id: str) -> object:
        try:
            return self._run(adapter_id)
        except Exception:
            log.exception("background validation of adapter %s failed", adapter_id)
            return None

    def _done(self, future: Future) -> None:
        with self._idle:
            self._pending.discard(future)
            self._idle.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every submitted job has finished; False if ``timeout`` seconds ran out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._pending:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def close(self, wait: bool = True) -> None:
        """Stop accepting jobs; with ``wait`` finish the queued ones, else drop those not started."""
        with self._idle:
            self._closed = True
        self._executor.shutdown(wait=wait, cancel_futures=not wait)


class CeleryTaskQueue:
    """Sends ``tailor.validate_adapter`` to the Celery broker, stamped with the enqueue time (a
    message header) so that the worker can measure queue lag. Broker errors are raised."""

    def __init__(self, app: Celery):
        self.app = app

    def submit_validation(self, adapter_id: str) -> None:
        """Publish one validation message (kombu retries the publish a few times on its own)."""
        from tenants.celery_app import ENQUEUED_AT_HEADER, VALIDATE_TASK

        self.app.send_task(VALIDATE_TASK, args=[adapter_id], headers={ENQUEUED_AT_HEADER: time.time()})

    def close(self) -> None:
        """Release the app's broker connections."""
        self.app.close()


def make_task_queue(settings: Settings, platform: Platform) -> TaskQueue:
    """A Celery queue when ``settings.task_mode`` is celery, else an in-process one on ``platform``."""
    if settings.task_mode == "celery":
        from tenants.celery_app import make_celery

        return CeleryTaskQueue(make_celery(settings))

    from tenants.adapter_validation import validate_adapter_job

    return InProcessTaskQueue(lambda adapter_id: validate_adapter_job(platform, adapter_id))
