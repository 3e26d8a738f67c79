"""Prometheus metrics of the background worker (in the default registry of the worker process).

Kept apart from ``tenants.worker`` so that the task module imports them without importing the
worker's entry point, and so that ``python -m tenants.worker`` (which runs that module as
``__main__``) cannot register them twice. Only the worker process imports this module: the api
never shows empty ``tailor_worker_*`` series.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

OUTCOMES = ("ready", "failed", "skipped", "error")

VALIDATIONS = Counter(
    "tailor_worker_validations",
    "Adapter validation attempts by outcome: ready, failed (invalid files), skipped (not pending or "
    "unknown), error (the attempt raised; transient errors are retried and counted again).",
    ["outcome"],
)
VALIDATION_DURATION = Histogram(
    "tailor_worker_validation_duration_seconds",
    "Wall time of one adapter validation attempt (download, checks, status update).",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
QUEUE_LAG = Histogram(
    "tailor_worker_queue_lag_seconds",
    "Time from enqueueing a validation task to the start of its first attempt.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
QUEUE_LENGTH = Gauge(
    "tailor_worker_queue_length",
    "Messages waiting in the Celery queue in Redis (LLEN), sampled every few seconds.",
)

for _outcome in OUTCOMES:  # export every outcome from the start, so that rate() sees the first one
    VALIDATIONS.labels(outcome=_outcome)
