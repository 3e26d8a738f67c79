"""The worker service: a Celery worker that validates uploaded adapters, with Prometheus metrics.

Run it as ``tailor worker`` or ``python -m tenants.worker`` (settings from ``TAILOR_*``).

The Celery worker runs inside this process, with the ``solo`` pool (one task at a time) or, when
``TAILOR_WORKER_CONCURRENCY`` > 1, the ``threads`` pool. Either way every task runs in this
process, so the metrics it records land in this process's default Prometheus registry, which
``start_http_server`` serves at ``/metrics``. Celery's default ``prefork`` pool would run tasks in
child processes, each with its own registry; exporting those needs prometheus_client's
multiprocess mode (a shared directory of mmap files, ``PROMETHEUS_MULTIPROC_DIR``, cleaned on
every child's exit), which is not worth it for a job that spends its time in I/O and in torch
(which releases the GIL). Scale out with more worker containers instead.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
import threading
from pathlib import Path

from celery import Celery
from celery.signals import worker_ready

from tenants.settings import Settings

log = logging.getLogger("tenants.worker")

READY_MESSAGE = "tailor worker ready"  # logged once the worker consumes; tests wait for it
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


def start_metrics_server(settings: Settings) -> None:
    """Serve this process's Prometheus registry on ``worker_metrics_host:worker_metrics_port``."""
    from prometheus_client import start_http_server

    import tenants.worker_metrics  # noqa: F401  (registers the worker's metrics)

    start_http_server(settings.worker_metrics_port, addr=settings.worker_metrics_host)
    log.info("metrics on http://%s:%d/metrics", settings.worker_metrics_host, settings.worker_metrics_port)


def _log_ready(**_kwargs) -> None:
    log.info(READY_MESSAGE)


def make_worker(app: Celery, settings: Settings):
    """A Celery ``WorkController`` for ``app``: solo pool, or threads when concurrency > 1.

    Gossip, mingle and heartbeats are off: workers need not know each other for this queue.
    """
    threads = settings.worker_concurrency > 1
    return app.Worker(
        pool_cls="threads" if threads else "solo",
        concurrency=settings.worker_concurrency,
        hostname=f"tailor-worker-{os.getpid()}@{socket.gethostname()}",
        loglevel="INFO",
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=True,
        beat=settings.cleanup_interval_s > 0,  # embedded beat: runs the periodic clean-up (idempotent)
        schedule_filename=str(Path(tempfile.gettempdir()) / f"tailor-beat-{os.getpid()}"),
    )


def run_worker(settings: Settings) -> int:
    """Run the worker service until it is stopped (SIGTERM: finish the running task, then exit).

    Checks the settings, starts the metrics server and the queue-length sampler, then runs the
    Celery worker in this process. Returns the worker's exit code.
    """
    from tenants.celery_app import QUEUE, make_celery, reset_platform

    settings.check_for("worker")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start_metrics_server(settings)
    app = make_celery(settings)
    sampler = QueueLengthSampler(settings.redis_url, QUEUE).start()
    worker_ready.connect(_log_ready, weak=False)
    try:
        worker = make_worker(app, settings)
        worker.start()
        return int(worker.exitcode or 0)
    finally:
        sampler.stop()
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
