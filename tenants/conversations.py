"""A user's chat history: what a chat request needs from the database, and storing an exchange.

Each user has one running conversation (created on the first chat). The history sent to inference
is a stepped window of at most ``history_max_messages`` messages (:func:`history_window`), so that
it does not shift by one exchange every turn (which would defeat the prefix cache); inference then
keeps the newest ones that fit the token budget. Both messages of an exchange are stored together
after the reply is complete, so a failed or abandoned generation leaves no half-exchange behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import case, delete, func, select
from sqlalchemy.orm import Session

from inference.service.protocol import AdapterSpec, ChatTurn
from tenants import repositories as repo
from tenants.models import Adapter, AdapterStatus, Conversation, Message, User, utcnow
from tenants.platform import adapter_spec


@dataclass
class ChatContext:
    user_id: str
    system_prompt: str | None
    history: list[ChatTurn]
    adapter: AdapterSpec | None
    adapter_status: AdapterStatus | None  # status of the user's assigned adapter (None: none assigned)
    adapter_version: int | None = None  # the version number of ``adapter`` (None: the base model)


def load_chat_context(session: Session, tenant_id: str, user: User, max_messages: int,
                      step_messages: int = 1) -> ChatContext:
    """What a chat request needs: the tenant's system prompt, the user's history window
    (:func:`history_window` of ``max_messages`` messages moving by ``step_messages``) and their
    adapter (its spec only when it is ready)."""
    tenant = repo.get_tenant(session, tenant_id)
    spec, status, version = None, None, None
    if user.current_adapter_id is not None:
        adapter = session.get(Adapter, user.current_adapter_id)
        if adapter is not None and adapter.tenant_id == tenant_id:
            status = adapter.status
            if adapter.status == AdapterStatus.READY:
                spec, version = adapter_spec(adapter), adapter.version
    history = [ChatTurn(role=m.role, content=m.content)
               for m in history_window(session, tenant_id, user.id, max_messages, step_messages)]
    return ChatContext(user.id, tenant.system_prompt if tenant else None, history, spec, status, version)


def history_window(
    session: Session, tenant_id: str, user_id: str, max_messages: int, step_messages: int = 1
) -> list[Message]:
    """The user's newest messages for a chat's history, oldest first, in one query.

    Messages are numbered 0, 1, ... from the user's first in ``(created_at, id)`` order; the window
    starts at the smallest multiple of ``step_messages`` that leaves at most ``max_messages``, so it
    holds between ``max_messages - step_messages + 1`` and ``max_messages`` messages (all of them
    while there are fewer) and its start only moves every ``step_messages`` messages, by that many,
    instead of one exchange every turn. An even step starts it at a user message, as exchanges are
    stored in pairs. ``step_messages=1`` is the newest ``max_messages`` messages.
    """
    if max_messages < 1 or step_messages < 1:
        raise ValueError(f"max_messages and step_messages must be at least 1, got {max_messages} and {step_messages}")
    numbered = (
        select(
            Message.id.label("id"),
            (func.row_number().over(order_by=(Message.created_at, Message.id)) - 1).label("position"),
            func.count().over().label("total"),
        )
        .where(Message.tenant_id == tenant_id, Message.user_id == user_id)
        .subquery()
    )
    excess = numbered.c.total - max_messages  # messages beyond the window; the start rounds it up to a step
    start = case((excess > 0, (excess + (step_messages - 1)) // step_messages * step_messages), else_=0)
    query = (
        select(Message)
        .join(numbered, Message.id == numbered.c.id)
        .where(Message.tenant_id == tenant_id, numbered.c.position >= start)
        .order_by(numbered.c.position)
    )
    return list(session.scalars(query).all())


def current_conversation(session: Session, tenant_id: str, user_id: str) -> Conversation:
    conversation = session.scalar(
        select(Conversation)
        .where(Conversation.tenant_id == tenant_id, Conversation.user_id == user_id)
        .order_by(Conversation.created_at.desc(), Conversation.id.desc())
        .limit(1)
    )
    return conversation or repo.create_conversation(session, tenant_id, user_id)


def record_exchange(
    session: Session,
    tenant_id: str,
    user_id: str,
    user_text: str,
    reply_text: str,
    completion_tokens: int | None,
    asked_at: datetime | None = None,
    adapter_id: str | None = None,
) -> tuple[Message, Message]:
    """Store the user's message (at ``asked_at``, when the request arrived) and the reply
    (strictly later, so the order is stable), which records the adapter version that wrote it
    (``adapter_id``; None: the base model)."""
    conversation = current_conversation(session, tenant_id, user_id)
    asked_at = asked_at or utcnow()
    answered_at = max(utcnow(), asked_at + timedelta(microseconds=1))
    question = repo.add_message(session, tenant_id, conversation.id, "user", user_text,
                                token_count=None, created_at=asked_at)
    answer = repo.add_message(session, tenant_id, conversation.id, "assistant", reply_text,
                              token_count=completion_tokens, created_at=answered_at, adapter_id=adapter_id)
    return question, answer


def message_page(
    session: Session, tenant_id: str, user_id: str, limit: int, before_id: str | None
) -> tuple[list[Message], str | None] | None:
    """Up to ``limit`` messages older than message ``before_id`` (newest page when None), oldest
    first, and the cursor of the previous page. None when ``before_id`` is not this user's."""
    before: datetime | None = None
    if before_id is not None:
        anchor = session.scalar(
            select(Message).where(Message.tenant_id == tenant_id, Message.user_id == user_id, Message.id == before_id)
        )
        if anchor is None:
            return None
        before = anchor.created_at
    page = repo.recent_messages(session, tenant_id, user_id, limit + 1, before=before)
    has_more = len(page) > limit
    page = page[-limit:]
    return page, (page[0].id if has_more and page else None)


def erase_history(session: Session, tenant_id: str, user_id: str) -> int:
    """Delete every message and conversation of the user; returns how many messages went."""
    count = len(session.scalars(select(Message.id).where(Message.tenant_id == tenant_id, Message.user_id == user_id)).all())
    session.execute(delete(Message).where(Message.tenant_id == tenant_id, Message.user_id == user_id))
    session.execute(delete(Conversation).where(Conversation.tenant_id == tenant_id, Conversation.user_id == user_id))
    return count
