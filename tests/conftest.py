"""Shared fixtures: a real SQLite file per test, and sessions that count their lives."""

from __future__ import annotations

import itertools
import os
import secrets
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import Engine, create_engine, event, func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import scoped_session, sessionmaker
from sqlalchemy.pool import NullPool

import sessionmw
import sessionmw.unit
from tests.models import Base, Note, User
from tests.pgbouncer import PgBouncer, start_pgbouncer
from tests.postgres import REQUIRE_ENV, PostgresServer, start_server, stop_server
from tests.replication import ReplicatedDatabase, ReplicationPair, start_pair, stop_pair

pytest_plugins = ["pytester", "tests.faults.plugin"]

T = TypeVar("T")


class Tracker:
    """Every Session a factory made, and how often each was closed."""

    def __init__(self) -> None:
        self.created: list[OrmSession] = []
        self.closes: Counter[int] = Counter()

    def session_class(self) -> type[OrmSession]:
        tracker = self

        class TrackedSession(OrmSession):
            def __init__(self, *args: Any, **kw: Any) -> None:
                super().__init__(*args, **kw)
                tracker.created.append(self)

            def close(self) -> None:
                tracker.closes[id(self)] += 1
                super().close()

        return TrackedSession

    def closed_once(self) -> bool:
        return all(self.closes[id(s)] == 1 for s in self.created)


def sqlite_pragmas(engine: Engine, busy_timeout_ms: int = 10_000) -> None:
    """Foreign keys on (SQLite has them off by default), and wait for locks, not fail."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.close()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL server for the whole run."""
    server = _started(start_server())
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def pg_replication() -> Iterator[ReplicationPair]:
    """A PostgreSQL primary and a streaming hot-standby replica of it, for the whole run."""
    pair = _started(start_pair())
    yield pair
    stop_pair(pair)


@pytest.fixture
def replicated_database(pg_replication: ReplicationPair) -> Iterator[ReplicatedDatabase]:
    """A fresh database on the primary, already on the replica; replication left running."""
    name = pg_replication.create_database()
    yield ReplicatedDatabase(pg_replication, name)
    if not pg_replication.replica_running():
        pg_replication.start_replica()
    pg_replication.resume_replay()
    pg_replication.drop_database(name)


@pytest.fixture(scope="session")
def pgbouncer(postgres: PostgresServer) -> Iterator[PgBouncer]:
    """PgBouncer in transaction pooling mode in front of the ``postgres`` server."""
    bouncer = _started(start_pgbouncer(postgres))
    yield bouncer
    bouncer.stop()


def _started(found: T | str) -> T:
    """The started thing, or skip with why not (fail instead when CI requires PostgreSQL)."""
    if isinstance(found, str):
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(f"{REQUIRE_ENV} is set but {found}")
        pytest.skip(found)
    return found


_databases = itertools.count()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A real database per test: a SQLite file, or a fresh database on the PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'app.db'}"
        return
    yield from _fresh_database(request.getfixturevalue("postgres"))


@pytest.fixture
def pg_url(postgres: PostgresServer) -> Iterator[str]:
    """A fresh database on the PostgreSQL server, for the tests that are about PostgreSQL."""
    yield from _fresh_database(postgres)


@pytest.fixture
def second_pg_url(postgres: PostgresServer) -> Iterator[str]:
    """Another fresh database on the same server, for requests that use two databases."""
    yield from _fresh_database(postgres)


def _fresh_database(server: PostgresServer) -> Iterator[str]:
    name = f"test_{os.getpid()}_{next(_databases)}_{secrets.token_hex(3)}"
    admin = create_engine(server.url(), isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    yield server.url(database=name)
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE {name} WITH (FORCE)"))
    admin.dispose()


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def async_url(url: str) -> str:
    if is_sqlite(url):
        return url.replace("sqlite://", "sqlite+aiosqlite://", 1)
    return url.replace("+psycopg://", "+asyncpg://", 1)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = create_engine(db_url, pool_size=5, max_overflow=10, pool_timeout=5)
    if is_sqlite(db_url):
        sqlite_pragmas(engine)
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def tracker() -> Tracker:
    return Tracker()


@pytest.fixture
def Session(engine: Engine, tracker: Tracker) -> scoped_session[OrmSession]:
    factory = sessionmaker(bind=engine, class_=tracker.session_class())
    return sessionmw.request_scoped(factory)  # type: ignore[return-value]


@pytest.fixture
async def async_engine(db_url: str, engine: Engine) -> Any:
    aengine = create_async_engine(async_url(db_url), pool_size=5, max_overflow=10, pool_timeout=5)
    if is_sqlite(db_url):
        sqlite_pragmas(aengine.sync_engine)
    yield aengine
    await aengine.dispose()


@pytest.fixture
def AsyncSession(async_engine: AsyncEngine, tracker: Tracker) -> Any:
    factory = async_sessionmaker(async_engine, sync_session_class=tracker.session_class())
    return sessionmw.request_scoped(factory)


def count_rows(engine: Engine, model: type[Any]) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(model)) or 0)


def user_names(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.scalars(select(User.name)))


def assert_clean(session: Any, engine: Engine, tracker: Tracker | None = None) -> None:
    """No Session left in the registry, no connection out of the pool, each Session closed once."""
    assert session.registry.registry == {}
    assert engine.pool.checkedout() == 0
    if tracker is not None:
        assert tracker.closed_once(), tracker.closes
    with pytest.raises(sessionmw.NoRequestScopeError):
        sessionmw.current_request()


@pytest.fixture(params=["sync", "async"])
def db(request: pytest.FixtureRequest, engine: Engine, tracker: Tracker) -> Any:
    """The same operations (``tests.asgi_helpers.Db``) on a sync and on an async session."""
    from tests.asgi_helpers import Db  # it imports this module: not at the top

    if request.param == "sync":
        return Db("sync", request.getfixturevalue("Session"), engine, tracker)
    pool_engine = request.getfixturevalue("async_engine").sync_engine
    return Db("async", request.getfixturevalue("AsyncSession"), engine, tracker, pool_engine)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


__all__ = ["Note", "Tracker", "User", "assert_clean", "count_rows", "user_names"]


@pytest.fixture
def worker_hops(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every worker-thread hop the middleware takes, by the function it hands over."""
    taken: list[Any] = []
    real_hop = sessionmw.unit.run_in_worker

    async def counted_hop(func: Any, *args: Any) -> Any:
        taken.append(func)
        return await real_hop(func, *args)

    monkeypatch.setattr(sessionmw.unit, "run_in_worker", counted_hop)
    return taken
