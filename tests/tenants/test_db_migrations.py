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

TABLES = {"tenants", "api_keys", "users", "adapters", "conversations", "messages", "training_examples",
          "message_feedback", "training_jobs"}


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
            # the tenants table of 0001 (the model has later columns): plain SQL
            s.execute(text("INSERT INTO tenants (id, name, created_at) VALUES ('t-idem', 'idem-migration', "
                           "CURRENT_TIMESTAMP)"))
            user = User(tenant_id="t-idem", external_id="u")
            s.add(user)
            s.flush()
            s.execute(text("INSERT INTO adapters (id, tenant_id, name, version, status, target_modules, created_at) "
                           "VALUES ('a1', :t, 'old', 1, 'ready', '[]', CURRENT_TIMESTAMP)"), {"t": "t-idem"})
            s.execute(text("UPDATE users SET current_adapter_id = 'a1' WHERE id = :u"), {"u": user.id})
            tenant_id, user_id = "t-idem", user.id
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


def test_tenant_share_and_slo_migration_keeps_data_and_constraints(empty_database_url):
    """0002 -> 0003 on a database with rows: existing tenants get weight 1 and no SLO, the rows
    that point at them survive (SQLite rebuilds the tenants table) and still cascade, a weight or
    SLO that is not > 0 is refused by the CHECK constraints; and 0003 -> 0002 drops both columns
    without losing a row."""
    url = empty_database_url
    migrate.upgrade(url, "0002_idempotency_key")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:  # the 0002 schema: no ORM (the models have the new columns)
            conn.execute(text("INSERT INTO tenants (id, name, created_at) VALUES ('t1', 'old', CURRENT_TIMESTAMP)"))
            conn.execute(text("INSERT INTO users (id, tenant_id, external_id, created_at) "
                              "VALUES ('u1', 't1', 'x', CURRENT_TIMESTAMP)"))
    finally:
        engine.dispose()

    migrate.upgrade(url)
    assert {"fair_share_weight", "ttft_slo_s"} <= _columns(url, "tenants") and _schema_diff(url) == []
    engine = make_engine(url)
    factory = make_session_factory(engine)
    try:
        with session_scope(factory) as s:
            old = s.get(Tenant, "t1")
            assert (old.name, old.fair_share_weight, old.ttft_slo_s) == ("old", 1.0, None)
            assert s.get(User, "u1").tenant_id == "t1"
            fresh = Tenant(name="fresh")
            s.add(fresh)
            s.flush()
            assert (fresh.fair_share_weight, fresh.ttft_slo_s) == (1.0, None)
            old.fair_share_weight, old.ttft_slo_s = 2.5, 0.75
        with session_scope(factory) as s:
            assert (s.get(Tenant, "t1").fair_share_weight, s.get(Tenant, "t1").ttft_slo_s) == (2.5, 0.75)
        for column, value in (("fair_share_weight", 0.0), ("fair_share_weight", -1.0), ("ttft_slo_s", 0.0),
                              ("ttft_slo_s", -0.5)):
            with pytest.raises(IntegrityError), session_scope(factory) as s:
                s.execute(text(f"UPDATE tenants SET {column} = :v WHERE id = 't1'"), {"v": value})
        with pytest.raises(IntegrityError), session_scope(factory) as s:
            s.execute(text("UPDATE tenants SET fair_share_weight = NULL WHERE id = 't1'"))
        with session_scope(factory) as s:  # ON DELETE CASCADE into users survived the rebuild
            s.execute(text("DELETE FROM tenants WHERE id = :id"), {"id": fresh.id})
            s.add(User(tenant_id="t1", external_id="y"))
    finally:
        engine.dispose()

    migrate.downgrade(url, "0002_idempotency_key")
    assert not {"fair_share_weight", "ttft_slo_s"} & _columns(url, "tenants")
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT name FROM tenants")).scalars().all() == ["old"]
            assert conn.execute(text("SELECT count(*) FROM users WHERE tenant_id = 't1'")).scalar() == 2
            conn.execute(text("DELETE FROM tenants WHERE id = 't1'"))
            if engine.dialect.name == "sqlite":
                assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
            assert conn.execute(text("SELECT count(*) FROM users")).scalar() == 0  # still cascades
            conn.rollback()
    finally:
        engine.dispose()
