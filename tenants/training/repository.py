"""Data access of the personalization loop for the API: training examples, feedback on chat
messages, training jobs. Every query filters by ``tenant_id`` (and the user where the row belongs
to one), in the style of ``tenants.repositories``: functions take an open ``Session``, do not
commit, and flush where the caller needs the new row at once.

The job's own state changes while it runs (claim, progress, finish, reaping a dead one) are keyed by
the job id the queue carries and live with the job, in ``tenants.training.job_state``.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from tenants.models import (
    ACTIVE_TRAINING_STATUSES,
    ExampleSource,
    Message,
    MessageFeedback,
    TrainingExample,
    TrainingJob,
    TrainingStatus,
    utcnow,
)

# --- examples -----------------------------------------------------------------------------------


def add_example(session: Session, tenant_id: str, user_id: str, messages: list[dict[str, str]], *,
                source: ExampleSource = ExampleSource.API, message_id: str | None = None) -> TrainingExample:
    """A new example of the user (the caller has checked that the user is the tenant's and that
    ``messages`` are a valid example)."""
    example = TrainingExample(tenant_id=tenant_id, user_id=user_id, source=source, message_id=message_id,
                              messages=[{"role": m["role"], "content": m["content"]} for m in messages])
    session.add(example)
    session.flush()
    return example


def list_examples(session: Session, tenant_id: str, user_id: str, *, limit: int = 100,
                  offset: int = 0) -> Sequence[TrainingExample]:
    """The user's examples, oldest first."""
    query = (select(TrainingExample)
             .where(TrainingExample.tenant_id == tenant_id, TrainingExample.user_id == user_id)
             .order_by(TrainingExample.created_at, TrainingExample.id).limit(limit).offset(offset))
    return session.scalars(query).all()


def count_examples(session: Session, tenant_id: str, user_id: str) -> int:
    return session.scalar(select(func.count()).select_from(TrainingExample).where(
        TrainingExample.tenant_id == tenant_id, TrainingExample.user_id == user_id)) or 0


def delete_example(session: Session, tenant_id: str, user_id: str, example_id: str) -> bool:
    """Remove one of the user's examples; False when the user has no such example."""
    result = session.execute(delete(TrainingExample).where(
        TrainingExample.tenant_id == tenant_id, TrainingExample.user_id == user_id, TrainingExample.id == example_id))
    return result.rowcount == 1


# --- feedback -------------------------------------------------------------------------------------


def get_message(session: Session, tenant_id: str, user_id: str, message_id: str) -> Message | None:
    """One of the user's stored chat messages."""
    return session.scalar(select(Message).where(
        Message.tenant_id == tenant_id, Message.user_id == user_id, Message.id == message_id))


def conversation_until(session: Session, tenant_id: str, message: Message, limit: int) -> list[Message]:
    """The newest ``limit`` messages of ``message``'s conversation up to and including it, oldest
    first (the order chat stores them in: ``(created_at, id)``)."""
    query = (select(Message)
             .where(Message.tenant_id == tenant_id, Message.conversation_id == message.conversation_id,
                    (Message.created_at < message.created_at)
                    | ((Message.created_at == message.created_at) & (Message.id <= message.id)))
             .order_by(Message.created_at.desc(), Message.id.desc()).limit(limit))
    return list(reversed(session.scalars(query).all()))


def feedback_of(session: Session, tenant_id: str, message_id: str) -> MessageFeedback | None:
    """The rating of one of the tenant's messages, if it has one."""
    return session.scalar(select(MessageFeedback).where(
        MessageFeedback.tenant_id == tenant_id, MessageFeedback.message_id == message_id))


def record_feedback(session: Session, tenant_id: str, message: Message, rating: int, correction: str | None,
                    example_messages: list[dict[str, str]] | None) -> tuple[MessageFeedback, TrainingExample | None]:
    """Store the rating of ``message`` (replacing an earlier one, and the example that one made) and,
    with ``example_messages``, the example it makes."""
    earlier = feedback_of(session, tenant_id, message.id)
    if earlier is not None:
        if earlier.example_id is not None:
            session.execute(delete(TrainingExample).where(
                TrainingExample.tenant_id == tenant_id, TrainingExample.id == earlier.example_id))
        session.delete(earlier)
        session.flush()
    example = None
    if example_messages is not None:
        example = add_example(session, tenant_id, message.user_id, example_messages, source=ExampleSource.FEEDBACK,
                              message_id=message.id)
    feedback = MessageFeedback(tenant_id=tenant_id, user_id=message.user_id, message_id=message.id, rating=rating,
                               correction=correction, example_id=example.id if example is not None else None)
    session.add(feedback)
    session.flush()
    return feedback, example


# --- jobs -----------------------------------------------------------------------------------------


def create_job(session: Session, tenant_id: str, user_id: str, parameters: dict, example_count: int) -> TrainingJob:
    """A new queued job; ``IntegrityError`` on flush when the user already has a queued or running
    one (the partial unique index)."""
    job = TrainingJob(tenant_id=tenant_id, user_id=user_id, status=TrainingStatus.QUEUED, parameters=parameters,
                      example_count=example_count, step=0, total_steps=0, promoted=False, cancel_requested=False)
    session.add(job)
    session.flush()
    return job


def get_job(session: Session, tenant_id: str, job_id: str) -> TrainingJob | None:
    return session.scalar(select(TrainingJob).where(TrainingJob.tenant_id == tenant_id, TrainingJob.id == job_id))


def list_jobs(session: Session, tenant_id: str, user_id: str, *, limit: int = 100,
              offset: int = 0) -> Sequence[TrainingJob]:
    """The user's jobs, newest first."""
    query = (select(TrainingJob).where(TrainingJob.tenant_id == tenant_id, TrainingJob.user_id == user_id)
             .order_by(TrainingJob.created_at.desc(), TrainingJob.id.desc()).limit(limit).offset(offset))
    return session.scalars(query).all()


def active_job(session: Session, tenant_id: str, user_id: str) -> TrainingJob | None:
    """The user's queued or running job, if any."""
    return session.scalar(select(TrainingJob).where(
        TrainingJob.tenant_id == tenant_id, TrainingJob.user_id == user_id,
        TrainingJob.status.in_(ACTIVE_TRAINING_STATUSES)))


def active_job_count(session: Session, tenant_id: str) -> int:
    """Queued and running jobs of the tenant (all its users)."""
    return session.scalar(select(func.count()).select_from(TrainingJob).where(
        TrainingJob.tenant_id == tenant_id, TrainingJob.status.in_(ACTIVE_TRAINING_STATUSES))) or 0


def request_cancel(session: Session, tenant_id: str, job_id: str) -> TrainingJob | None:
    """Ask the tenant's job to stop: a queued job is cancelled at once, a running one is flagged
    (its process stops at the next step). Finished jobs are returned unchanged. None when the
    tenant has no such job."""
    now = utcnow()
    session.execute(update(TrainingJob)
                    .where(TrainingJob.tenant_id == tenant_id, TrainingJob.id == job_id,
                           TrainingJob.status == TrainingStatus.QUEUED)
                    .values(status=TrainingStatus.CANCELLED, cancel_requested=True, finished_at=now,
                            result="cancelled before it started"))
    session.execute(update(TrainingJob)
                    .where(TrainingJob.tenant_id == tenant_id, TrainingJob.id == job_id,
                           TrainingJob.status == TrainingStatus.RUNNING)
                    .values(cancel_requested=True))
    session.expire_all()
    return get_job(session, tenant_id, job_id)
