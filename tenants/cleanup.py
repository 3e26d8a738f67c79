"""The clean-up job (a periodic Celery task in production, a thread in the embedded default).

It repairs what a crash or an outage can leave behind; every step is idempotent:

* a ``pending`` adapter whose validation was lost (a worker died, the broker was flushed) is
  queued again after ``requeue_after_s``, and marked ``failed`` after ``give_up_after_s``;
* ``failed`` and ``deleted`` adapters whose files are still in the store lose them;
* objects under ``tenants/`` that belong to no adapter row are deleted (uploads insert the row
  before storing files, so an object without a row is garbage, never an upload in progress: it is
  what an upload left when the store failed and was still down when the upload tried to remove it);
* a ``running`` training job whose process died (no heartbeat for ``TAILOR_TRAINING_STALE_AFTER_S``)
  is failed, saying so, and the adapter it had begun to store is given up; a job still ``queued``
  after ``give_up_after_s`` (its message was lost) is failed (``tenants.training.jobs``);
* unfinished uploads under ``tenants/`` begun more than ``stale_upload_after_s`` ago are removed:
  S3 multipart uploads whose abort could not reach the server (they hold their parts' bytes, and
  are invisible to listings of objects), and temporary files of the local folder store.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select, update

from inference.adapters.storage_keys import TENANTS_ROOT, tenant_adapter_of
from tenants.adapter_validation import ValidationOutcome, give_up
from tenants.db import session_scope
from tenants.models import Adapter, AdapterStatus, utcnow
from tenants.platform import Platform
from tenants.training.jobs import reap_stale_jobs

log = logging.getLogger(__name__)

STORAGE_ROOT = TENANTS_ROOT  # every adapter prefix is under it (inference.adapters.storage_keys)
GONE = (AdapterStatus.FAILED, AdapterStatus.DELETED)  # their files are no longer needed
STALE_UPLOAD_AFTER_S = 1800.0  # far longer than any upload takes (256 MiB at 1 MB/s: 4.5 minutes)


@dataclass
class CleanupReport:
    requeued: list[str] = field(default_factory=list)
    timed_out: list[str] = field(default_factory=list)
    files_removed: int = 0
    orphans_removed: int = 0
    uploads_aborted: int = 0
    trainings_failed: list[str] = field(default_factory=list)


def _aware(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; every timestamp here is UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=utcnow().tzinfo)


def _stale_pending(platform: Platform, report: CleanupReport, submit: Callable[[str], None], now: datetime,
                   requeue_after_s: float, give_up_after_s: float) -> None:
    with session_scope(platform.session_factory) as session:
        pending = session.execute(select(Adapter.id, Adapter.created_at).where(Adapter.status == AdapterStatus.PENDING)).all()
    for adapter_id, created_at in pending:
        age = (now - _aware(created_at)).total_seconds()
        if age > give_up_after_s:
            if give_up(platform, adapter_id, f"validation did not finish within {int(give_up_after_s)} s") == ValidationOutcome.FAILED:
                report.timed_out.append(adapter_id)
        elif age > requeue_after_s:
            submit(adapter_id)
            report.requeued.append(adapter_id)


def _leftover_files(platform: Platform, report: CleanupReport) -> None:
    with session_scope(platform.session_factory) as session:
        rows = session.execute(
            select(Adapter.id, Adapter.storage_key)
            .where(Adapter.status.in_(GONE), Adapter.storage_key.is_not(None))
        ).all()
    for adapter_id, prefix in rows:
        report.files_removed += platform.store.delete_prefix(prefix)
        with session_scope(platform.session_factory) as session:
            session.execute(
                update(Adapter)
                .where(Adapter.id == adapter_id, Adapter.status.in_(GONE))
                .values(storage_key=None)
            )


def _orphans(platform: Platform, report: CleanupReport) -> None:
    owners: dict[str, str] = {}  # prefix -> adapter id
    for key in platform.store.list_keys(STORAGE_ROOT):
        found = tenant_adapter_of(key)
        if found is not None:
            owners[found[0]] = found[1]
    if not owners:
        return
    with session_scope(platform.session_factory) as session:
        known = set(session.scalars(select(Adapter.id).where(Adapter.id.in_(set(owners.values())))).all())
    for prefix in sorted(owners):
        if owners[prefix] not in known:
            report.orphans_removed += platform.store.delete_prefix(prefix)


def _stale_uploads(platform: Platform, report: CleanupReport, now: datetime, stale_upload_after_s: float) -> None:
    abort_stale = getattr(platform.store, "abort_stale_uploads", None)
    if abort_stale is not None:  # a BlobStore has it; a bare ObjectStore keeps no unfinished uploads
        report.uploads_aborted += abort_stale(STORAGE_ROOT, now - timedelta(seconds=stale_upload_after_s))


def cleanup_job(
    platform: Platform,
    submit_validation: Callable[[str], None],
    *,
    requeue_after_s: float = 300.0,
    give_up_after_s: float = 3600.0,
    stale_upload_after_s: float = STALE_UPLOAD_AFTER_S,
    now: datetime | None = None,
) -> CleanupReport:
    """One clean-up pass (see the module docstring); returns what it did."""
    report = CleanupReport()
    now = now or utcnow()
    _stale_pending(platform, report, submit_validation, now, requeue_after_s, give_up_after_s)
    report.trainings_failed = reap_stale_jobs(platform, queued_timeout_s=give_up_after_s)
    _leftover_files(platform, report)
    _orphans(platform, report)
    _stale_uploads(platform, report, now, stale_upload_after_s)
    if (report.requeued or report.timed_out or report.files_removed or report.orphans_removed or report.uploads_aborted
            or report.trainings_failed):
        log.info("clean-up: %s", report)
    return report


class PeriodicCleanup:
    """Runs ``job()`` every ``interval_s`` seconds on a daemon thread (the embedded default)."""

    def __init__(self, job: Callable[[], object], interval_s: float):
        self._job = job
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tailor-cleanup", daemon=True)

    def start(self) -> PeriodicCleanup:
        if self._interval_s > 0:
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._job()
            except Exception:  # an outage: try again next time
                log.exception("clean-up pass failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
