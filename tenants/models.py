"""SQLAlchemy 2 models of the tenant platform's metadata (tenants, API keys, users, adapters, chats).

Every id is made by the server (``new_id``: a uuid4 hex string). Every tenant-owned table carries
``tenant_id`` (indexed, ``ON DELETE CASCADE`` from ``tenants``), and the repositories always filter
on it. Enumerations are stored as plain strings guarded by CHECK constraints, so that the schema is
the same on SQLite and PostgreSQL and adding a value is a one-constraint migration; in Python a
status is an ``enum.StrEnum`` (``AdapterStatus``), read back as the enum by ``StrEnumString``.

The schema itself is created only by the Alembic migrations in ``migrations/``; these models are
the migrations' ``target_metadata`` and a test checks that the two agree.
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

# Deterministic constraint names: Alembic needs them to drop/alter constraints (SQLite batch mode
# included), and they keep the migration and the models comparable.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}



class AdapterStatus(enum.StrEnum):
    """An adapter version's life: ``pending`` until validated, then ``ready`` (served) or
    ``failed``; ``deleted`` when the tenant removed it (its files are cleaned up)."""

    PENDING = "pending"
    READY = "ready"
    FAILED = "failed"
    DELETED = "deleted"


class TrainingStatus(enum.StrEnum):
    """A training job's life: ``queued`` until a worker takes it, ``running``, then ``succeeded``,
    ``failed`` or ``cancelled`` (the three final states)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ExampleSource(enum.StrEnum):
    """Where a training example came from: posted through the API, or made from chat feedback."""

    API = "api"
    FEEDBACK = "feedback"


API_KEY_SCOPES = ("admin", "chat")
ADAPTER_STATUSES = tuple(s.value for s in AdapterStatus)
TRAINING_STATUSES = tuple(s.value for s in TrainingStatus)
ACTIVE_TRAINING_STATUSES = (TrainingStatus.QUEUED.value, TrainingStatus.RUNNING.value)
EXAMPLE_SOURCES = tuple(s.value for s in ExampleSource)
MESSAGE_ROLES = ("user", "assistant", "system")
FEEDBACK_RATINGS = (1, -1)

ID_LENGTH = 32
IDEMPOTENCY_KEY_LENGTH = 255


def new_id() -> str:
    """A fresh server-made id (uuid4 as 32 hex characters)."""
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UtcDateTime(TypeDecorator):
    """A timestamp with a time zone that always reads back aware (UTC). PostgreSQL keeps the zone;
    SQLite stores none and hands back naive datetimes, which the API would then send without an
    offset (not an RFC 3339 ``date-time``)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value


class StrEnumString(TypeDecorator):
    """A ``StrEnum`` stored as its value in a ``VARCHAR(length)`` (the column type is unchanged);
    binds enum members (or plain strings, left to the column's CHECK constraint), reads back enum
    members."""

    impl = String
    cache_ok = True

    def __init__(self, enum_type: type[enum.StrEnum], length: int):
        super().__init__(length)
        self.enum_type = enum_type

    def process_bind_param(self, value, dialect) -> str | None:
        return value.value if isinstance(value, self.enum_type) else value

    def process_result_value(self, value, dialect):
        return None if value is None else self.enum_type(value)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _id_column() -> Mapped[str]:
    return mapped_column(String(ID_LENGTH), primary_key=True, default=new_id)


def _created_at() -> Mapped[datetime]:
    return mapped_column(UtcDateTime(), nullable=False, default=utcnow)


def _tenant_fk() -> Mapped[str]:
    return mapped_column(String(ID_LENGTH), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False, index=True)


class Tenant(Base):
    """A company using Tailor.

    ``fair_share_weight`` (> 0, default 1; set by the operator only) is the tenant's weight in the
    engine's fair scheduler: its requests are charged tokens divided by it, so a tenant of weight 2
    is served about twice the tokens of a tenant of weight 1 while both are backlogged
    (docs/design.md "Scheduling"). ``ttft_slo_s`` (> 0 or NULL) is the default first-token deadline
    of the tenant's chats in seconds; a request may bring its own, and without either the service's
    ``TAILOR_TTFT_SLO_S`` applies.
    """

    __tablename__ = "tenants"
    __table_args__ = (
        CheckConstraint("fair_share_weight > 0", name="fair_share_weight_positive"),
        CheckConstraint("ttft_slo_s IS NULL OR ttft_slo_s > 0", name="ttft_slo_positive"),
    )

    id: Mapped[str] = _id_column()
    name: Mapped[str] = mapped_column(String(200), nullable=False, unique=True)
    system_prompt: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = _created_at()
    fair_share_weight: Mapped[float] = mapped_column(Float, nullable=False, default=1.0, server_default=text("1"))
    ttft_slo_s: Mapped[float | None] = mapped_column(Float, nullable=True)

    def __repr__(self) -> str:
        return f"Tenant(id={self.id!r}, name={self.name!r})"


class ApiKey(Base):
    """An API key. Only ``prefix`` (to look the key up) and ``key_hash`` are stored, never the secret."""

    __tablename__ = "api_keys"
    __table_args__ = (CheckConstraint(_in("scope", API_KEY_SCOPES), name="scope"),)

    id: Mapped[str] = _id_column()
    tenant_id: Mapped[str] = _tenant_fk()
    prefix: Mapped[str] = mapped_column(String(32), nullable=False, unique=True)
    key_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    scope: Mapped[str] = mapped_column(String(16), nullable=False)
    created_at: Mapped[datetime] = _created_at()
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)

    tenant: Mapped[Tenant] = relationship()

    def __repr__(self) -> str:
        return f"ApiKey(id={self.id!r}, tenant_id={self.tenant_id!r}, prefix={self.prefix!r}, scope={self.scope!r})"


class User(Base):
    """An end user of a tenant, known by the tenant's own ``external_id``."""

    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("tenant_id", "external_id"),)

    id: Mapped[str] = _id_column()
    tenant_id: Mapped[str] = _tenant_fk()
    external_id: Mapped[str] = mapped_column(String(255), nullable=False)
    # users <-> adapters is a cycle (adapters.owner_user_id): use_alter makes the FK a separate
    # ALTER step, and the migration adds it after both tables exist.
    current_adapter_id: Mapped[str | None] = mapped_column(
        String(ID_LENGTH),
        ForeignKey("adapters.id", ondelete="SET NULL", use_alter=True),
        nullable=True,
    )
    created_at: Mapped[datetime] = _created_at()

    current_adapter: Mapped[Adapter | None] = relationship(foreign_keys=[current_adapter_id], post_update=True)

    def __repr__(self) -> str:
        return f"User(id={self.id!r}, tenant_id={self.tenant_id!r}, external_id={self.external_id!r})"


class Adapter(Base):
    """A LoRA adapter: tenant-wide (no owner) or a user's personal one.

    ``idempotency_key`` is the client's ``Idempotency-Key`` of the upload that created it (unique
    per tenant; NULL when none was sent): a retried upload finds this row instead of making another.
    """

    __tablename__ = "adapters"
    __table_args__ = (
        UniqueConstraint("tenant_id", "name", "version"),
        UniqueConstraint("tenant_id", "idempotency_key"),
        CheckConstraint(_in("status", ADAPTER_STATUSES), name="status"),
        CheckConstraint("version >= 1", name="version_positive"),
        CheckConstraint("rank IS NULL OR rank > 0", name="rank_positive"),
        CheckConstraint("size_bytes IS NULL OR size_bytes >= 0", name="size_nonnegative"),
    )

    id: Mapped[str] = _id_column()
    tenant_id: Mapped[str] = _tenant_fk()
    # Deleting a user deletes their personal adapters' rows (object storage is cleaned separately).
    owner_user_id: Mapped[str | None] = mapped_column(
        String(ID_LENGTH), ForeignKey("users.id", ondelete="CASCADE"), nullable=True, index=True
    )
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    status: Mapped[AdapterStatus] = mapped_column(
        StrEnumString(AdapterStatus, 16), nullable=False, default=AdapterStatus.PENDING
    )
    failure_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    rank: Mapped[int | None] = mapped_column(Integer, nullable=True)
    target_modules: Mapped[list[str]] = mapped_column(JSON, nullable=False, default=list)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    storage_key: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(IDEMPOTENCY_KEY_LENGTH), nullable=True)
    created_at: Mapped[datetime] = _created_at()
    # where a trained version came from: {"training_job_id", "example_count", "train_loss",
    # "eval_loss_before", "eval_loss_after", ...}; NULL for an upload
    provenance: Mapped[dict | None] = mapped_column(JSON, nullable=True)

    owner: Mapped[User | None] = relationship(foreign_keys=[owner_user_id])

    def __repr__(self) -> str:
        return f"Adapter(id={self.id!r}, tenant_id={self.tenant_id!r}, name={self.name!r}, v{self.version}, {self.status})"


class Conversation(Base):
    __tablename__ = "conversations"

    id: Mapped[str] = _id_column()
    tenant_id: Mapped[str] = _tenant_fk()
    user_id: Mapped[str] = mapped_column(
        String(ID_LENGTH), ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True
    )
    title: Mapped[str | None] = mapped_column(String(500), nullable=True)
    created_at: Mapped[datetime] = _created_at()


class Message(Base):
    """One chat message. ``user_id`` is denormalised from the conversation to page a user's history."""

    __tablename__ = "messages"
    __table_args__ = (
        CheckConstraint(_in("role", MESSAGE_ROLES), name="role"),
        CheckConstraint("token_count IS NULL OR token_count >= 0", name="token_count_nonnegative"),
        Index("ix_messages_tenant_user_created", "tenant_id", "user_id", "created_at"),
        Index("ix_messages_conversation_created", "conversation_id", "created_at"),
    )

    id: Mapped[str] = _id_column()
    tenant_id: Mapped[str] = _tenant_fk()
    conversation_id: Mapped[str] = mapped_column(
        String(ID_LENGTH), ForeignKey("conversations.id", ondelete="CASCADE"), nullable=False
    )
    user_id: Mapped[str] = mapped_column(
        String(ID_LENGTH), ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True
    )
    role: Mapped[str] = mapped_column(String(16), nullable=False)
    content: Mapped[str] = mapped_column(Text, nullable=False)
    token_count: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = _created_at()
    # the adapter version that wrote an assistant message (NULL: the base model, or a user message);
    # no foreign key: the answer keeps naming the version it came from whatever happens to the row
    adapter_id: Mapped[str | None] = mapped_column(String(ID_LENGTH), nullable=True)


def _user_fk() -> Mapped[str]:
    return mapped_column(String(ID_LENGTH), ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True)


class TrainingExample(Base):
    """One training example of a user: a conversation ending with the assistant turn to learn.

    ``source`` is ``api`` (posted) or ``feedback`` (made from a rated chat message, ``message_id``;
    the conversation is copied, so erasing the chat history keeps the example: it is the user's
    training data until deleted through its own route)."""

    __tablename__ = "training_examples"
    __table_args__ = (
        CheckConstraint(_in("source", EXAMPLE_SOURCES), name="source"),
        Index("ix_training_examples_tenant_user_created", "tenant_id", "user_id", "created_at"),
    )

    id: Mapped[str] = _id_column()
    tenant_id: Mapped[str] = _tenant_fk()
    user_id: Mapped[str] = _user_fk()
    source: Mapped[ExampleSource] = mapped_column(StrEnumString(ExampleSource, 16), nullable=False)
    message_id: Mapped[str | None] = mapped_column(
        String(ID_LENGTH), ForeignKey("messages.id", ondelete="SET NULL"), nullable=True, index=True
    )
    messages: Mapped[list[dict]] = mapped_column(JSON, nullable=False)
    created_at: Mapped[datetime] = _created_at()


class MessageFeedback(Base):
    """A user's rating of one assistant message (one per message: rating again replaces it).
    ``example_id``: the training example it made (an approval or a correction), NULL for a
    rejection without a correction (recorded, not trained on)."""

    __tablename__ = "message_feedback"
    __table_args__ = (
        UniqueConstraint("message_id"),
        CheckConstraint("rating IN (1, -1)", name="rating"),
    )

    id: Mapped[str] = _id_column()
    tenant_id: Mapped[str] = _tenant_fk()
    user_id: Mapped[str] = _user_fk()
    message_id: Mapped[str] = mapped_column(
        String(ID_LENGTH), ForeignKey("messages.id", ondelete="CASCADE"), nullable=False
    )
    rating: Mapped[int] = mapped_column(Integer, nullable=False)
    correction: Mapped[str | None] = mapped_column(Text, nullable=True)
    example_id: Mapped[str | None] = mapped_column(
        String(ID_LENGTH), ForeignKey("training_examples.id", ondelete="SET NULL"), nullable=True
    )
    created_at: Mapped[datetime] = _created_at()


class TrainingJob(Base):
    """A job that trains a user's adapter from their examples (tenants.training.jobs).

    ``heartbeat_at`` is renewed by the process running the job; a ``running`` job whose heartbeat
    is older than ``TAILOR_TRAINING_STALE_AFTER_S`` lost its process and is failed by the clean-up.
    ``promoted``: the new version became the user's adapter (its evaluation loss fell); a
    succeeded job that did not improve stores no adapter and says so in ``result``. At most one
    queued or running job per user (a partial unique index)."""

    __tablename__ = "training_jobs"
    __table_args__ = (
        CheckConstraint(_in("status", TRAINING_STATUSES), name="status"),
        CheckConstraint("step >= 0 AND total_steps >= 0", name="steps_nonnegative"),
        CheckConstraint("example_count >= 0", name="example_count_nonnegative"),
        Index("ix_training_jobs_tenant_user_created", "tenant_id", "user_id", "created_at"),
        Index("uq_training_jobs_active_user", "user_id", unique=True,
              sqlite_where=text(_in("status", ACTIVE_TRAINING_STATUSES)),
              postgresql_where=text(_in("status", ACTIVE_TRAINING_STATUSES))),
    )

    id: Mapped[str] = _id_column()
    tenant_id: Mapped[str] = _tenant_fk()
    user_id: Mapped[str] = _user_fk()
    status: Mapped[TrainingStatus] = mapped_column(
        StrEnumString(TrainingStatus, 16), nullable=False, default=TrainingStatus.QUEUED
    )
    parameters: Mapped[dict] = mapped_column(JSON, nullable=False, default=dict)
    example_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    step: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    total_steps: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    train_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    eval_loss_before: Mapped[float | None] = mapped_column(Float, nullable=True)
    eval_loss_after: Mapped[float | None] = mapped_column(Float, nullable=True)
    adapter_id: Mapped[str | None] = mapped_column(
        String(ID_LENGTH), ForeignKey("adapters.id", ondelete="SET NULL"), nullable=True
    )
    promoted: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False, server_default=text("false"))
    result: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False,
                                                   server_default=text("false"))
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    created_at: Mapped[datetime] = _created_at()
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
