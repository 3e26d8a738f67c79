"""The Alembic migrations build exactly the models' schema, and tear it down, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import IntegrityError

from tenants import migrate
from tenants.db import make_engine, make_session_factory, normalize_url, session_scope
from tenants.models import Adapter, Base, Conversation, Message, Tenant, User

TABLES = {"tenants", "api_keys", "users", "adapters", "conversations", "messages"}


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _schema_diff(url: str) -> list:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()


def test_single_head_revision():
    script = ScriptDirectory.from_config(migrate.alembic_config("sqlite://"))
    assert len(script.get_heads()) == 1
    assert [rev.revision for rev in script.walk_revisions()][-1] == "0001_initial"


def test_upgrade_matches_models_and_downgrade_empties(empty_database_url):
    url = empty_database_url
    assert _tables(url) == set()
    assert migrate.current(url) is None

    migrate.upgrade(url)
    assert _tables(url) - {"alembic_version"} == TABLES
    script = ScriptDirectory.from_config(migrate.alembic_config(url))
    assert migrate.current(url) == script.get_current_head()
    assert _schema_diff(url) == []

    migrate.downgrade(url)
    assert _tables(url) <= {"alembic_version"}
    assert migrate.current(url) is None

    migrate.upgrade(url)  # and back up again from the downgraded state
    assert _schema_diff(url) == []


def test_models_indexes_every_tenant_id():
    for table in Base.metadata.sorted_tables:
        if table.name == "tenants":
            continue
        assert "tenant_id" in table.c, table.name
        assert any(list(ix.columns)[0].name == "tenant_id" for ix in table.indexes), table.name


def test_postgres_url_gets_psycopg_driver():
    assert normalize_url("postgresql://u@/db?host=/tmp/x").drivername == "postgresql+psycopg"
    assert normalize_url("sqlite:///x.db").drivername == "sqlite"


def test_constraints_and_on_delete_rules(migrated_database_url):
    engine = make_engine(migrated_database_url)
    factory = make_session_factory(engine)
    try:
        if engine.dialect.name == "sqlite":
            with engine.connect() as conn:
                assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1

        with session_scope(factory) as s:
            tenant = Tenant(name=f"cascade-{id(s)}-{engine.dialect.name}")
            s.add(tenant)
            s.flush()
            user = User(tenant_id=tenant.id, external_id="u1")
            s.add(user)
            s.flush()
            adapter = Adapter(tenant_id=tenant.id, owner_user_id=None, name="a", version=1, target_modules=["q_proj"])
            s.add(adapter)
            s.flush()
            user.current_adapter_id = adapter.id
            conv = Conversation(tenant_id=tenant.id, user_id=user.id)
            s.add(conv)
            s.flush()
            s.add(Message(tenant_id=tenant.id, conversation_id=conv.id, user_id=user.id, role="user", content="hi"))
            tenant_id, user_id, adapter_id = tenant.id, user.id, adapter.id

        # an unknown enum value is refused by the CHECK constraint
        with pytest.raises(IntegrityError), session_scope(factory) as s:
            s.add(Adapter(tenant_id=tenant_id, name="bad", version=1, status="bogus", target_modules=[]))
        # a foreign key to nowhere is refused (SQLite too: PRAGMA foreign_keys=ON)
        with pytest.raises(IntegrityError), session_scope(factory) as s:
            s.add(User(tenant_id="0" * 32, external_id="orphan"))

        # deleting the adapter clears the user's current adapter (ON DELETE SET NULL)
        with session_scope(factory) as s:
            s.execute(text("DELETE FROM adapters WHERE id = :id"), {"id": adapter_id})
        with session_scope(factory) as s:
            assert s.get(User, user_id).current_adapter_id is None

        # deleting the tenant deletes everything it owns (ON DELETE CASCADE)
        with session_scope(factory) as s:
            s.execute(text("DELETE FROM tenants WHERE id = :id"), {"id": tenant_id})
        with session_scope(factory) as s:
            for model in (User, Adapter, Conversation, Message):
                assert s.scalars(select(model).where(model.tenant_id == tenant_id)).all() == []
    finally:
        engine.dispose()


def test_cli_db_upgrade_and_downgrade(tmp_path, capsys):
    import sqlalchemy as sa

    from api.cli import main as cli_main

    url = f"sqlite:///{tmp_path / 'cli.db'}"
    assert cli_main(["db", "upgrade", "--database-url", url]) == 0
    tables = set(sa.inspect(sa.create_engine(url)).get_table_names())
    assert {"tenants", "api_keys", "users", "adapters", "conversations", "messages"} <= tables
    assert cli_main(["db", "downgrade", "--database-url", url]) == 0
    assert set(sa.inspect(sa.create_engine(url)).get_table_names()) <= {"alembic_version"}
    assert "downgraded" in capsys.readouterr().out


def _columns(url: str, table: str) -> set[str]:
    engine = make_engine(url)
    try:
        return {c["name"] for c in inspect(engine).get_columns(table)}
    finally:
        engine.dispose()


def test_idempotency_key_migration_keeps_data_and_constraints(empty_database_url):
    """0001 -> 0002 on a database with rows: the rows survive (SQLite rebuilds the table), the CHECK
    and foreign-key rules still hold, (tenant_id, idempotency_key) is unique with NULLs allowed
    many times; and 0002 -> 0001 drops the column without losing a row."""
    url = empty_database_url
    migrate.upgrade(url, "0001_initial")
    engine = make_engine(url)
    factory = make_session_factory(engine)
    try:
        with session_scope(factory) as s:
            tenant = Tenant(name="idem-migration")
            s.add(tenant)
            s.flush()
            user = User(tenant_id=tenant.id, external_id="u")
            s.add(user)
            s.flush()
            s.execute(text("INSERT INTO adapters (id, tenant_id, name, version, status, target_modules, created_at) "
                           "VALUES ('a1', :t, 'old', 1, 'ready', '[]', CURRENT_TIMESTAMP)"), {"t": tenant.id})
            s.execute(text("UPDATE users SET current_adapter_id = 'a1' WHERE id = :u"), {"u": user.id})
            tenant_id, user_id = tenant.id, user.id
    finally:
        engine.dispose()

    migrate.upgrade(url)
    assert "idempotency_key" in _columns(url, "adapters") and _schema_diff(url) == []
    engine = make_engine(url)
    factory = make_session_factory(engine)
    try:
        with session_scope(factory) as s:
            assert s.get(Adapter, "a1").name == "old" and s.get(User, user_id).current_adapter_id == "a1"
            for i, key in enumerate(("k1", None, None)):
                s.add(Adapter(tenant_id=tenant_id, name=f"n{i}", version=1, target_modules=[], idempotency_key=key))
        with pytest.raises(IntegrityError), session_scope(factory) as s:
            s.add(Adapter(tenant_id=tenant_id, name="dup", version=1, target_modules=[], idempotency_key="k1"))
        with pytest.raises(IntegrityError), session_scope(factory) as s:  # the CHECK survived the rebuild
            s.add(Adapter(tenant_id=tenant_id, name="bad", version=1, status="bogus", target_modules=[]))
        with session_scope(factory) as s:  # ON DELETE SET NULL from users still points at adapters
            s.execute(text("DELETE FROM adapters WHERE id = 'a1'"))
        with session_scope(factory) as s:
            assert s.get(User, user_id).current_adapter_id is None
    finally:
        engine.dispose()

    migrate.downgrade(url, "0001_initial")
    assert "idempotency_key" not in _columns(url, "adapters")
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            count = conn.execute(text("SELECT count(*) FROM adapters WHERE tenant_id = :t"), {"t": tenant_id}).scalar()
        assert count == 3
    finally:
        engine.dispose()
