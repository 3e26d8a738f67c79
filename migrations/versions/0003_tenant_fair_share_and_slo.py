"""Tenants get a fair-share weight and a default first-token SLO.

Revision ID: 0003_tenant_share_slo
Revises: 0002_idempotency_key
Create Date: 2026-12-04

``tenants.fair_share_weight`` (a float, NOT NULL, default 1, CHECK > 0): the tenant's weight in the
engine's fair scheduler, set by the operator only. ``tenants.ttft_slo_s`` (a float, NULL = none,
CHECK > 0): the default first-token deadline of the tenant's chats in seconds. Existing tenants get
weight 1 (the server default fills the column) and no SLO. SQLite cannot add a CHECK constraint to
an existing table, so the change runs in batch mode there (a table copy; ``migrations/env.py``
leaves foreign keys off during migrations, so the copy does not cascade into the tenants' rows);
on PostgreSQL it is plain ALTERs.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_tenant_share_slo"
down_revision: str | Sequence[str] | None = "0002_idempotency_key"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WEIGHT_CHECK = "ck_tenants_fair_share_weight_positive"
SLO_CHECK = "ck_tenants_ttft_slo_positive"


def upgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("fair_share_weight", sa.Float(), nullable=False, server_default=sa.text("1")))
        batch.add_column(sa.Column("ttft_slo_s", sa.Float(), nullable=True))
        batch.create_check_constraint(op.f(WEIGHT_CHECK), "fair_share_weight > 0")
        batch.create_check_constraint(op.f(SLO_CHECK), "ttft_slo_s IS NULL OR ttft_slo_s > 0")


def downgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        batch.drop_constraint(op.f(SLO_CHECK), type_="check")
        batch.drop_constraint(op.f(WEIGHT_CHECK), type_="check")
        batch.drop_column("ttft_slo_s")
        batch.drop_column("fair_share_weight")
