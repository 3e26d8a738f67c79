"""The metadata database's connection pool is bounded by settings, and SQLite runs in WAL mode
with a busy timeout (concurrent chats store their exchanges without 'database is locked')."""

from __future__ import annotations

from sqlalchemy import event, text

from tenants.platform import Platform
from tenants.settings import Settings


def test_pool_bounds_come_from_settings(tmp_path):
    settings = Settings(data_dir=tmp_path, db_pool_size=3, db_max_overflow=2, db_pool_timeout_s=1.5)
    platform = Platform.from_settings(settings)
    try:
        pool = platform.session_factory.kw["bind"].pool
        assert (pool.size(), pool._max_overflow, pool._timeout) == (3, 2, 1.5)
        with platform.session_factory() as session:
            assert session.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert session.execute(text("PRAGMA busy_timeout")).scalar() >= 1000
            assert session.execute(text("PRAGMA foreign_keys")).scalar() == 1
    finally:
        platform.close()


def test_postgres_pool_bounds_and_connect_timeout(postgres_url):
    settings = Settings(database_url=postgres_url, db_pool_size=4, db_max_overflow=0, db_pool_timeout_s=2.0,
                        db_connect_timeout_s=3.0)
    platform = Platform.from_settings(settings)
    try:
        engine = platform.session_factory.kw["bind"]
        assert (engine.pool.size(), engine.pool._max_overflow, engine.pool._timeout) == (4, 0, 2.0)
        seen = {}
        event.listen(engine, "do_connect", lambda _dialect, _record, _args, kwargs: seen.update(kwargs))
        with engine.connect() as connection:
            assert connection.execute(text("SELECT 1")).scalar() == 1
        assert seen["connect_timeout"] == 3
    finally:
        platform.close()
