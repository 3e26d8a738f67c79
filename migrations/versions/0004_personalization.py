"""The personalization loop: training examples, message feedback, training jobs; trained adapters'
provenance and the adapter version of each answer.

Revision ID: 0004_personalization
Revises: 0003_tenant_share_slo
Create Date: 2026-12-05

Three new tables (``training_examples``, ``message_feedback``, ``training_jobs``) and two nullable
columns without constraints (``adapters.provenance``, ``messages.adapter_id``), which SQLite adds
with a plain ALTER, so no table is rebuilt. ``training_jobs`` has a partial unique index on
``user_id`` over the queued and running jobs: at most one active job per user, on both dialects.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_personalization"
down_revision: str | Sequence[str] | None = "0003_tenant_share_slo"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.String(length=32)
ACTIVE = "status IN ('queued', 'running')"


def _id() -> sa.Column:
    return sa.Column("id", ID, nullable=False)


def _owner_columns() -> list[sa.Column]:
    return [sa.Column("tenant_id", ID, nullable=False), sa.Column("user_id", ID, nullable=False)]


def _owner_fks(table: str) -> list[sa.ForeignKeyConstraint]:
    return [
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f(f"fk_{table}_tenant_id_tenants"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f(f"fk_{table}_user_id_users"), ondelete="CASCADE"),
    ]


def _owner_indexes(table: str) -> None:
    op.create_index(op.f(f"ix_{table}_tenant_id"), table, ["tenant_id"])
    op.create_index(op.f(f"ix_{table}_user_id"), table, ["user_id"])


def _created_at() -> sa.Column:
    return sa.Column("created_at", sa.DateTime(timezone=True), nullable=False)


def upgrade() -> None:
    op.add_column("adapters", sa.Column("provenance", sa.JSON(), nullable=True))
    op.add_column("messages", sa.Column("adapter_id", ID, nullable=True))

    op.create_table(
        "training_examples",
        _id(),
        *_owner_columns(),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("message_id", ID, nullable=True),
        sa.Column("messages", sa.JSON(), nullable=False),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_training_examples")),
        *_owner_fks("training_examples"),
        sa.ForeignKeyConstraint(["message_id"], ["messages.id"], name=op.f("fk_training_examples_message_id_messages"),
                                ondelete="SET NULL"),
        sa.CheckConstraint("source IN ('api', 'feedback')", name=op.f("ck_training_examples_source")),
    )
    _owner_indexes("training_examples")
    op.create_index(op.f("ix_training_examples_message_id"), "training_examples", ["message_id"])
    op.create_index("ix_training_examples_tenant_user_created", "training_examples",
                    ["tenant_id", "user_id", "created_at"])

    op.create_table(
        "message_feedback",
        _id(),
        *_owner_columns(),
        sa.Column("message_id", ID, nullable=False),
        sa.Column("rating", sa.Integer(), nullable=False),
        sa.Column("correction", sa.Text(), nullable=True),
        sa.Column("example_id", ID, nullable=True),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_message_feedback")),
        *_owner_fks("message_feedback"),
        sa.ForeignKeyConstraint(["message_id"], ["messages.id"], name=op.f("fk_message_feedback_message_id_messages"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["example_id"], ["training_examples.id"],
                                name=op.f("fk_message_feedback_example_id_training_examples"), ondelete="SET NULL"),
        sa.UniqueConstraint("message_id", name=op.f("uq_message_feedback_message_id")),
        sa.CheckConstraint("rating IN (1, -1)", name=op.f("ck_message_feedback_rating")),
    )
    _owner_indexes("message_feedback")

    op.create_table(
        "training_jobs",
        _id(),
        *_owner_columns(),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("parameters", sa.JSON(), nullable=False),
        sa.Column("example_count", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("total_steps", sa.Integer(), nullable=False),
        sa.Column("train_loss", sa.Float(), nullable=True),
        sa.Column("eval_loss_before", sa.Float(), nullable=True),
        sa.Column("eval_loss_after", sa.Float(), nullable=True),
        sa.Column("adapter_id", ID, nullable=True),
        sa.Column("promoted", sa.Boolean(), nullable=False, server_default=sa.text("false")),
        sa.Column("result", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False, server_default=sa.text("false")),
        sa.Column("worker", sa.String(length=255), nullable=True),
        _created_at(),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_training_jobs")),
        *_owner_fks("training_jobs"),
        sa.ForeignKeyConstraint(["adapter_id"], ["adapters.id"], name=op.f("fk_training_jobs_adapter_id_adapters"),
                                ondelete="SET NULL"),
        sa.CheckConstraint("status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')",
                           name=op.f("ck_training_jobs_status")),
        sa.CheckConstraint("step >= 0 AND total_steps >= 0", name=op.f("ck_training_jobs_steps_nonnegative")),
        sa.CheckConstraint("example_count >= 0", name=op.f("ck_training_jobs_example_count_nonnegative")),
    )
    _owner_indexes("training_jobs")
    op.create_index("ix_training_jobs_tenant_user_created", "training_jobs", ["tenant_id", "user_id", "created_at"])
    op.create_index("uq_training_jobs_active_user", "training_jobs", ["user_id"], unique=True,
                    sqlite_where=sa.text(ACTIVE), postgresql_where=sa.text(ACTIVE))


def downgrade() -> None:
    op.drop_table("training_jobs")
    op.drop_table("message_feedback")
    op.drop_table("training_examples")
    op.drop_column("messages", "adapter_id")
    op.drop_column("adapters", "provenance")
