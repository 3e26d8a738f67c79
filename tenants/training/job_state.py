"""A training job's row while it runs: claim, heartbeat, progress, the end, and the reaping of jobs
whose process died. Keyed by the job id the queue carries (like ``tenants.adapter_validation``).

Every change after the claim is conditional on the job still being ``running`` under this
process's ``worker`` name, so a process that lost its job (reaped after a stall) can no longer
write to it: its heartbeat tells it to stop, and its end changes nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select, update

from tenants.db import session_scope
from tenants.models import TrainingJob, TrainingStatus, utcnow
from tenants.platform import Platform

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 4000


def _clip(text: str | None) -> str | None:
    if text is None or len(text) <= MAX_ERROR_CHARS:
        return text
    return text[: MAX_ERROR_CHARS - 3] + "..."


def _owned(job_id: str, worker: str):
    return (TrainingJob.id == job_id, TrainingJob.status == TrainingStatus.RUNNING, TrainingJob.worker == worker)


def claim(platform: Platform, job_id: str, worker: str) -> TrainingJob | None:
    """queued -> running under ``worker`` (None when the job is unknown, no longer queued, or its
    cancellation was asked for); the returned row is detached."""
    now = utcnow()
    with session_scope(platform.session_factory) as session:
        result = session.execute(
            update(TrainingJob)
            .where(TrainingJob.id == job_id, TrainingJob.status == TrainingStatus.QUEUED,
                   TrainingJob.cancel_requested.is_(False))
            .values(status=TrainingStatus.RUNNING, worker=worker, started_at=now, heartbeat_at=now)
        )
        if result.rowcount != 1:
            return None
        job = session.get(TrainingJob, job_id)
        session.expunge(job)
        return job


@dataclass(frozen=True)
class Beat:
    """What a heartbeat learnt: whether this process still owns the job, and whether its
    cancellation was asked for."""

    owned: bool
    cancel_requested: bool


def heartbeat(platform: Platform, job_id: str, worker: str) -> Beat:
    """Renew the job's heartbeat and read its cancel flag."""
    with session_scope(platform.session_factory) as session:
        result = session.execute(update(TrainingJob).where(*_owned(job_id, worker)).values(heartbeat_at=utcnow()))
        if result.rowcount != 1:
            return Beat(owned=False, cancel_requested=False)
        cancel = session.scalar(select(TrainingJob.cancel_requested).where(TrainingJob.id == job_id))
        return Beat(owned=True, cancel_requested=bool(cancel))


def update_running(platform: Platform, job_id: str, worker: str, **values) -> bool:
    """Set fields of the running job (progress, losses, example count, its adapter); False when
    this process no longer owns it."""
    with session_scope(platform.session_factory) as session:
        result = session.execute(update(TrainingJob).where(*_owned(job_id, worker))
                                 .values(heartbeat_at=utcnow(), **values))
        return result.rowcount == 1


def finish(platform: Platform, job_id: str, worker: str, status: TrainingStatus, *, error: str | None = None,
           result: str | None = None, **values) -> bool:
    """running -> ``status`` (succeeded, failed, cancelled) with the final fields; False when this
    process no longer owns the job (nothing is written then)."""
    with session_scope(platform.session_factory) as session:
        changed = session.execute(
            update(TrainingJob).where(*_owned(job_id, worker))
            .values(status=status, error=_clip(error), result=_clip(result), finished_at=utcnow(), **values)
        )
        return changed.rowcount == 1


def fail_queued(platform: Platform, job_id: str | None, reason: str, *, older_than_s: float | None = None) -> list[str]:
    """queued -> failed with ``reason``: the job ``job_id`` (a process that will not start it), or
    with ``job_id`` None every job queued more than ``older_than_s`` ago (its message was lost).
    Returns the ids of the jobs this call failed."""
    conditions = [TrainingJob.status == TrainingStatus.QUEUED]
    if job_id is not None:
        conditions.append(TrainingJob.id == job_id)
    if older_than_s is not None:
        conditions.append(TrainingJob.created_at < utcnow() - timedelta(seconds=older_than_s))
    with session_scope(platform.session_factory) as session:
        ids = list(session.scalars(select(TrainingJob.id).where(*conditions)).all())
        if ids:
            session.execute(update(TrainingJob).where(TrainingJob.id.in_(ids), *conditions)
                            .values(status=TrainingStatus.FAILED, error=reason, finished_at=utcnow()))
    for failed in ids:
        log.warning("training job %s failed: %s", failed, reason)
    return ids


def reap_stale(platform: Platform, stale_after_s: float) -> list[tuple[str, str | None]]:
    """Fail every running job whose heartbeat is older than ``stale_after_s`` (its process died or
    hangs): ``[(job id, the adapter it had begun to store or None)]`` of the jobs this call failed.
    The caller gives up those adapters (they are still pending: the job never finished)."""
    cutoff = utcnow() - timedelta(seconds=stale_after_s)
    reaped = []
    with session_scope(platform.session_factory) as session:
        stale = session.execute(
            select(TrainingJob.id, TrainingJob.adapter_id, TrainingJob.worker)
            .where(TrainingJob.status == TrainingStatus.RUNNING, TrainingJob.heartbeat_at < cutoff)
        ).all()
    for job_id, adapter_id, worker in stale:
        message = (f"the process running this job ({worker}) stopped: no heartbeat for more than "
                   f"{stale_after_s:.0f} s; no adapter was stored and the user's adapter is unchanged")
        with session_scope(platform.session_factory) as session:
            changed = session.execute(
                update(TrainingJob)
                .where(TrainingJob.id == job_id, TrainingJob.status == TrainingStatus.RUNNING,
                       TrainingJob.heartbeat_at < cutoff)
                .values(status=TrainingStatus.FAILED, error=message, finished_at=utcnow())
            )
        if changed.rowcount == 1:
            log.warning("training job %s failed: %s", job_id, message)
            reaped.append((job_id, adapter_id))
    return reaped
