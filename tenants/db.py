"""Engine and session factory for the metadata database (embedded SQLite or PostgreSQL).

URLs: ``sqlite:///path/to/tailor.db`` or ``postgresql+psycopg://user:pw@host/db``. A bare
``postgresql://`` URL (what most tools, pgserver included, hand out) is mapped to the psycopg 3
driver. On SQLite every connection gets ``PRAGMA foreign_keys=ON`` so that the schema's
``ON DELETE`` rules hold there too, a write-ahead log (readers never wait for a writer) and a
busy timeout (a writer waits for another instead of failing at once). The schema is made by the
migrations (``tenants.migrate``), never here.

The pool is bounded (``pool_size`` + ``max_overflow`` connections, ``pool_timeout`` seconds of
waiting for one); a request that cannot get a connection in time fails with SQLAlchemy's
``TimeoutError``, which the api answers with 503 and ``Retry-After``. No request may hold a
connection while tokens are generated (see ``api.deps``).
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


SQLITE_BUSY_TIMEOUT_MS = 10_000


def _sqlite_pragmas(foreign_keys: bool):
    def on_connect(dbapi_connection, _record) -> None:
        cursor = dbapi_connection.cursor()
        if foreign_keys:
            cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode=WAL")  # a no-op answer ('memory') for in-memory databases
        cursor.close()

    return on_connect


def make_engine(database_url: str | URL, *, sqlite_foreign_keys: bool = True,
                connect_timeout_s: float | None = None, **kwargs) -> Engine:
    """An engine for ``database_url`` with the pool options in ``kwargs`` (``pool_size``,
    ``max_overflow``, ``pool_timeout``, ...). SQLite connections get foreign keys ON (unless told
    not to), WAL and a busy timeout; PostgreSQL connections are pinged before use and give up
    connecting after ``connect_timeout_s``."""
    url = normalize_url(database_url)
    if url.get_backend_name() == "sqlite":
        kwargs.setdefault("connect_args", {}).setdefault("check_same_thread", False)
        if url.database in (None, "", ":memory:"):  # one shared in-memory database: no pool bounds apply
            for option in ("pool_size", "max_overflow", "pool_timeout"):
                kwargs.pop(option, None)
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas(sqlite_foreign_keys))
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    if connect_timeout_s is not None:
        kwargs.setdefault("connect_args", {}).setdefault("connect_timeout", max(1, round(connect_timeout_s)))
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
