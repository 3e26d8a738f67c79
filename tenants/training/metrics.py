"""Prometheus metrics of adapter training jobs (in the process's default registry).

Recorded where jobs run: the Celery worker (``tailor worker``, its own ``/metrics``) or, in the
embedded default, the api process (its ``/metrics`` includes the default registry), like the
validation metrics of ``tenants.worker_metrics``. A job cancelled before it started never ran
anywhere: the api process that cancelled it counts it.

- ``tailor_training_jobs_total{status}``: jobs that ended, by final status (succeeded, failed,
  cancelled);
- ``tailor_training_adapters_total{outcome}``: succeeded jobs by what became of their adapter:
  ``promoted`` (the evaluation loss fell: stored, validated, now the user's adapter) or
  ``not_improved`` (nothing stored);
- ``tailor_training_jobs_running``: jobs running in this process now;
- ``tailor_training_duration_seconds{status}``: from the start of a run to its end;
- ``tailor_training_examples``: usable examples per job that ran (trained plus held out).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

FINAL_STATUSES = ("succeeded", "failed", "cancelled")
ADAPTER_OUTCOMES = ("promoted", "not_improved")

JOBS = Counter("tailor_training_jobs", "Adapter training jobs that ended, by final status.", ["status"])
ADAPTERS = Counter("tailor_training_adapters",
                   "Succeeded training jobs by outcome: promoted (now the user's adapter) or not_improved (the "
                   "evaluation loss did not fall; nothing stored).", ["outcome"])
RUNNING = Gauge("tailor_training_jobs_running", "Adapter training jobs running in this process.")
DURATION = Histogram("tailor_training_duration_seconds", "Wall time of a training job's run, by final status.",
                     ["status"], buckets=(1, 5, 10, 20, 30, 60, 120, 180, 300, 600, 1200, 1800, 3600, 7200))
EXAMPLES = Histogram("tailor_training_examples", "Usable examples per training job (trained and held out).",
                     buckets=(4, 8, 12, 16, 24, 32, 64, 128, 256, 512, 1024))

for _status in FINAL_STATUSES:  # every series from the start, so that rate() sees the first increment
    JOBS.labels(status=_status)
    DURATION.labels(status=_status)
for _outcome in ADAPTER_OUTCOMES:
    ADAPTERS.labels(outcome=_outcome)


def observe_end(status: str, seconds: float | None, promoted: bool | None = None) -> None:
    """Count a job that ended with ``status`` after running ``seconds`` (None: it never ran);
    ``promoted`` for a succeeded job."""
    JOBS.labels(status=status).inc()
    if seconds is not None:
        DURATION.labels(status=status).observe(max(0.0, seconds))
    if status == "succeeded" and promoted is not None:
        ADAPTERS.labels(outcome="promoted" if promoted else "not_improved").inc()
