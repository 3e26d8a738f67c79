"""The worker service: a Celery worker that validates uploaded adapters and trains users' adapters,
with Prometheus metrics.

Run it as ``tailor worker`` or ``python -m tenants.worker`` (settings from ``TAILOR_*``).

The Celery worker runs inside this process, with the ``solo`` pool (one task at a time) or, when
``TAILOR_WORKER_CONCURRENCY`` > 1, the ``threads`` pool. Either way every task runs in this
process, so the metrics it records land in this process's default Prometheus registry, which the
worker's HTTP server serves at ``/metrics``. Celery's default ``prefork`` pool would run tasks in
child processes, each with its own registry; exporting those needs prometheus_client's
multiprocess mode, which is not worth it for a job that spends its time in I/O and in torch
(which releases the GIL). Scale out with more worker containers instead.

Besides the Celery worker, the process runs four daemon threads and no child process (a SIGKILL
leaves nothing behind): the HTTP server (``/metrics``, ``/healthz``, ``/readyz``), the queue-length
sampler, the ``LeaseKeeper`` (renews the messages this worker holds, so that the broker's short
visibility timeout only redelivers those of dead workers) and the ``CleanupScheduler`` (sends the
periodic clean-up; one worker per interval among all of them). See ``tenants.worker_leases``.

SIGTERM: ``/readyz`` answers 503 at once, the worker stops consuming, the running task finishes
(a training stops at its next step and fails, saying so) and the process exits with status 0 (held retry messages go back to the queue). If the task is
still running after ``TAILOR_WORKER_DRAIN_TIMEOUT_S`` the process exits with status 1; its message
is redelivered to another worker after the visibility timeout.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading

from celery import Celery
from celery.signals import task_received, worker_ready, worker_shutting_down

from tenants.settings import Settings
from tenants.worker_http import Readiness, start_http_server

log = logging.getLogger("tenants.worker")

READY_MESSAGE = "tailor worker ready"  # logged once the worker consumes; tests wait for it
DRAIN_TIMEOUT_EXIT = 1  # exit status when SIGTERM's drain timeout ran out
QUEUE_LENGTH_INTERVAL_S = 5.0


class QueueLengthSampler:
    """A daemon thread that sets ``tailor_worker_queue_length`` to the LLEN of the Celery queue
    every ``interval`` seconds (a Redis error keeps the last value and is logged once per streak)."""

    def __init__(self, redis_url: str, queue: str, interval: float = QUEUE_LENGTH_INTERVAL_S):
        import redis

        self._client = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
        self._queue = queue
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tailor-queue-length", daemon=True)

    def start(self) -> QueueLengthSampler:
        self._thread.start()
        return self

    def sample(self) -> int:
        """Read the queue length once and publish it."""
        from tenants.worker_metrics import QUEUE_LENGTH

        length = int(self._client.llen(self._queue))
        QUEUE_LENGTH.set(length)
        return length

    def _loop(self) -> None:
        import redis

        failing = False
        while not self._stop.is_set():
            try:
                self.sample()
                failing = False
            except redis.RedisError as exc:
                if not failing:
                    log.warning("cannot read the length of queue %s: %s", self._queue, exc)
                failing = True
            self._stop.wait(self._interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self._interval + 1)
        self._client.close()


class ShutdownWatch:
    """Celery signal receivers: readiness on ``worker_ready``; on ``worker_shutting_down``
    readiness off at once and a drain timer that ends the process if the running task outlasts
    ``drain_timeout_s``."""

    def __init__(self, readiness: Readiness, drain_timeout_s: float):
        self.readiness = readiness
        self.drain_timeout_s = drain_timeout_s
        self._timer: threading.Timer | None = None

    def on_ready(self, **_kwargs) -> None:
        self.readiness.set(True)
        log.info(READY_MESSAGE)

    def on_shutting_down(self, sig=None, how=None, **_kwargs) -> None:
        from tenants.celery_app import stop_trainings

        self.readiness.set(False)
        stop_trainings()
        log.info("%s (%s shutdown): not ready; the running task may finish within %.0f s",
                 sig, how, self.drain_timeout_s)
        if self._timer is None:
            self._timer = threading.Timer(self.drain_timeout_s, self._expired)
            self._timer.daemon = True
            self._timer.start()

    def _expired(self) -> None:
        log.error("the running task did not finish within the drain timeout (%.0f s): exiting; its "
                  "message is redelivered after the visibility timeout", self.drain_timeout_s)
        logging.shutdown()
        os._exit(DRAIN_TIMEOUT_EXIT)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


def make_worker(app: Celery, settings: Settings):
    """A Celery ``WorkController`` for ``app``: solo pool, or threads when concurrency > 1.

    Gossip, mingle and heartbeats are off: workers need not know each other for this queue. No
    embedded beat: the ``CleanupScheduler`` thread replaces it."""
    threads = settings.worker_concurrency > 1
    return app.Worker(
        pool_cls="threads" if threads else "solo",
        concurrency=settings.worker_concurrency,
        hostname=worker_name(),
        loglevel="INFO",
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=True,
        beat=False,
    )


def worker_name() -> str:
    return f"tailor-worker-{os.getpid()}@{socket.gethostname()}"


def _start_threads(app: Celery, settings: Settings) -> list:
    """The lease keeper, the queue-length sampler and (unless the interval is 0) the clean-up
    scheduler, started; in the order to stop them."""
    from tenants.celery_app import CLEANUP_TASK, QUEUE
    from tenants.worker_leases import CleanupScheduler, LeaseKeeper

    leases = LeaseKeeper(settings.redis_url, settings.worker_visibility_timeout_s)
    task_received.connect(leases.track, weak=False)
    started = [leases.start(), QueueLengthSampler(settings.redis_url, QUEUE).start()]
    if settings.cleanup_interval_s > 0:
        started.append(CleanupScheduler(settings.redis_url, settings.cleanup_interval_s,
                                        lambda: app.send_task(CLEANUP_TASK), worker_name()).start())
    return started[::-1]


def run_worker(settings: Settings) -> int:
    """Run the worker service until it is stopped (SIGTERM: finish the running task, then exit 0).

    Checks the settings, starts the HTTP server and the helper threads, then runs the Celery
    worker in this process. Returns the worker's exit code.
    """
    from tenants.celery_app import make_celery, reset_platform

    settings.check_for("worker")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    readiness = Readiness()
    server = start_http_server(settings.worker_metrics_host, settings.worker_metrics_port, readiness)
    log.info("metrics on http://%s:%d/metrics", settings.worker_metrics_host, settings.worker_metrics_port)
    app = make_celery(settings)
    watch = ShutdownWatch(readiness, settings.worker_drain_timeout_s)
    worker_ready.connect(watch.on_ready, weak=False)
    worker_shutting_down.connect(watch.on_shutting_down, weak=False)
    import tenants.adapter_validation  # noqa: F401  (torch and the engine's checks: imported before
    import tenants.cleanup  # noqa: F401  the worker says it is ready, not inside its first task)
    import tenants.training.jobs  # noqa: F401

    threads = _start_threads(app, settings)
    try:
        worker = make_worker(app, settings)
        worker.start()
        return int(worker.exitcode or 0)
    finally:
        readiness.set(False)
        for thread in threads:
            thread.stop()
        watch.cancel()
        server.shutdown()
        reset_platform()


def main() -> None:
    """``python -m tenants.worker``: run the worker with settings from the environment; a
    configuration problem exits with status 2 and a one-line message."""
    try:
        settings = Settings()
        settings.check_for("worker")
    except ValueError as exc:
        print(f"tailor worker: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(run_worker(settings))


if __name__ == "__main__":
    main()
