"""Engine and session factory for the metadata database (embedded SQLite or PostgreSQL).

URLs: ``sqlite:///path/to/tailor.db`` or ``postgresql+psycopg://user:pw@host/db``. A bare
``postgresql://`` URL (what most tools, pgserver included, hand out) is mapped to the psycopg 3
driver. On SQLite every connection gets ``PRAGMA foreign_keys=ON`` so that the schema's
``ON DELETE`` rules hold there too. The schema is made by the migrations (``tenants.migrate``),
never here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

DATABASE_URL_ENV = "TAILOR_DATABASE_URL"


def normalize_url(database_url: str | URL) -> URL:
    """Parse a URL, choosing the psycopg 3 driver for a bare ``postgresql://`` one."""
    url = make_url(database_url)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    return url


def _enable_sqlite_foreign_keys(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(database_url: str | URL, *, sqlite_foreign_keys: bool = True, **kwargs) -> Engine:
    """An engine for ``database_url``; SQLite connections get foreign keys ON (unless told not to)."""
    url = normalize_url(database_url)
    if url.get_backend_name() == "sqlite":
        kwargs.setdefault("connect_args", {}).setdefault("check_same_thread", False)
        engine = create_engine(url, **kwargs)
        if sqlite_foreign_keys:
            event.listen(engine, "connect", _enable_sqlite_foreign_keys)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def make_session_factory(engine_or_url: Engine | str | URL) -> sessionmaker[Session]:
    """A session factory bound to an engine (or to a new engine for a URL)."""
    engine = engine_or_url if isinstance(engine_or_url, Engine) else make_engine(engine_or_url)
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(session_factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits when the block ends normally and rolls back if it raises."""
    session = session_factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
