"""Adapters remember the Idempotency-Key of the upload that created them.

Revision ID: 0002_idempotency_key
Revises: 0001_initial
Create Date: 2026-11-29

A nullable ``adapters.idempotency_key`` (at most 255 printable ASCII characters, checked by the
api) and a unique constraint on ``(tenant_id, idempotency_key)``: a retried upload with the same
key finds the first upload's row, two concurrent ones cannot both insert, and keys of different
tenants never meet. NULLs are distinct in a unique constraint on both SQLite and PostgreSQL, so
uploads without a key are unaffected. SQLite cannot add a constraint to an existing table, so the
change runs in batch mode there (a table copy; ``migrations/env.py`` leaves foreign keys off during
migrations, as that procedure requires); on PostgreSQL it is two plain ALTERs.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_idempotency_key"
down_revision: str | Sequence[str] | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CONSTRAINT = "uq_adapters_tenant_id_idempotency_key"


def upgrade() -> None:
    with op.batch_alter_table("adapters") as batch:
        batch.add_column(sa.Column("idempotency_key", sa.String(length=255), nullable=True))
        batch.create_unique_constraint(CONSTRAINT, ["tenant_id", "idempotency_key"])


def downgrade() -> None:
    with op.batch_alter_table("adapters") as batch:
        batch.drop_constraint(CONSTRAINT, type_="unique")
        batch.drop_column("idempotency_key")
