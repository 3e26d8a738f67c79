"""Prometheus metrics of adapter validation (in the process's default registry).

Two kinds of process do validations and export these families: the Celery worker (``tailor
worker``, served by its own HTTP server) and, in the embedded default, the api process, whose
in-process task queue does the same work (served at the api's ``/metrics``, which includes the
default registry). Both record through the helpers below, so a dashboard reads the same series
whichever runs the work.

Kept apart from ``tenants.worker`` so that the task module imports them without importing the
worker's entry point, and so that ``python -m tenants.worker`` (which runs that module as
``__main__``) cannot register them twice. It is imported only where validations run: an api
that hands its work to Celery never shows empty ``tailor_worker_*`` series.

Outcomes of an attempt: ``ready``, ``failed`` (invalid files), ``skipped`` (not pending or
unknown), ``retry`` (a transient error; another attempt is scheduled) and ``error`` (the attempt
raised and no attempt follows: the adapter was marked failed, or is left to the clean-up job).
``error`` therefore counts adapters lost to the platform, never retried attempts.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

OUTCOMES = ("ready", "failed", "skipped", "retry", "error")

VALIDATIONS = Counter(
    "tailor_worker_validations",
    "Adapter validation attempts by outcome: ready, failed (invalid files), skipped (not pending or "
    "unknown), retry (transient error, another attempt is scheduled), error (the attempt raised and "
    "no retry follows).",
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
    "Validation tasks waiting to start: LLEN of the Celery queue in Redis (sampled every few "
    "seconds), or the in-process queue's backlog in the embedded default.",
)

for _outcome in OUTCOMES:  # export every outcome from the start, so that rate() sees the first one
    VALIDATIONS.labels(outcome=_outcome)


def observe_attempt(outcome: str, seconds: float) -> None:
    """Count one validation attempt by ``outcome`` (one of OUTCOMES) and record its duration."""
    VALIDATIONS.labels(outcome=outcome).inc()
    VALIDATION_DURATION.observe(seconds)


def observe_queue_lag(seconds: float) -> None:
    """Record enqueue -> start of a task's first attempt."""
    QUEUE_LAG.observe(max(0.0, seconds))
