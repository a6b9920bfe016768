"""The databases, sessions and middleware stack a shape runs against, and what they
hold afterwards: rows, registries, pools, and PostgreSQL's own view of its sessions."""

from __future__ import annotations

import gc
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, delete, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import NullPool

import sessionmw
from tests.conftest import sqlite_pragmas
from tests.faults.probe import ProbedSession, instrument
from tests.faults.shapes import Db, Shape
from tests.models import Base, Note, User


def _async_url(url: str) -> str:
    if url.startswith("sqlite"):
        return url.replace("sqlite://", "sqlite+aiosqlite://", 1)
    return url.replace("+psycopg://", "+asyncpg://", 1)


@dataclass
class Database:
    """One database: the engine the request uses, and one of our own to look at it."""

    url: str
    is_async: bool
    engine: Any = None  # Engine or AsyncEngine
    checker: Engine = field(init=False)

    def __post_init__(self) -> None:
        connect_args = {"timeout": 0.5} if self.is_sqlite else {}
        self.checker = create_engine(self.url, poolclass=NullPool, connect_args=connect_args)
        Base.metadata.create_all(self.checker)

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")

    def open(self) -> None:
        options: dict[str, Any] = {"pool_size": 5, "max_overflow": 10, "pool_timeout": 5}
        if self.is_async:
            self.engine = create_async_engine(_async_url(self.url), **options)
        else:
            self.engine = create_engine(self.url, **options)
        if self.is_sqlite:
            sqlite_pragmas(self.sync_engine, busy_timeout_ms=2000)
        instrument(self.sync_engine)

    @property
    def sync_engine(self) -> Engine:
        engine = self.engine
        return engine.sync_engine if isinstance(engine, AsyncEngine) else engine  # type: ignore[no-any-return]

    def factory(self, twophase: bool) -> Any:
        if self.is_async:
            return async_sessionmaker(
                self.engine, sync_session_class=ProbedSession, twophase=twophase
            )
        return sessionmaker(bind=self.engine, class_=ProbedSession, twophase=twophase)

    async def close(self) -> None:
        if isinstance(self.engine, AsyncEngine):
            await self.engine.dispose()
        elif self.engine is not None:
            self.engine.dispose()

    def rows(self) -> Counter[str]:
        with self.checker.connect() as conn:
            return Counter(conn.scalars(select(User.name)))

    def clear(self) -> str | None:
        """Delete every row; say so when a lock left behind by the run prevents it (on
        SQLite the trace of a connection that still holds a transaction)."""
        if self._delete_all():
            return None
        gc.collect()  # a connection dropped unclosed lets go of its locks when collected
        if self._delete_all():
            return "the database stayed locked until a connection was garbage collected"
        return "the database is still locked after the request"

    def _delete_all(self) -> bool:
        try:
            with self.checker.begin() as conn:
                if not self.is_sqlite:
                    conn.execute(text("SET LOCAL lock_timeout = '2s'"))
                conn.execute(delete(Note))
                conn.execute(delete(User))
        except OperationalError:
            return False
        return True

    def leftovers(self) -> list[str]:
        """What PostgreSQL still holds for this database: sessions idle in a transaction,
        prepared transactions.  A backend whose client just vanished may need a moment
        to notice, so a non-zero count is read again before it counts."""
        if self.is_sqlite:
            return []
        found: list[str] = []
        for _ in range(20):
            with self.checker.connect() as conn:
                idle = conn.scalar(
                    text(
                        "select count(*) from pg_stat_activity where datname = "
                        "current_database() and state like 'idle in transaction%' "
                        "and pid <> pg_backend_pid()"
                    )
                )
                prepared = conn.scalar(
                    text(
                        "select count(*) from pg_prepared_xacts where database = current_database()"
                    )
                )
            found = []
            if idle:
                found.append(f"{idle} connection(s) idle in transaction")
            if prepared:
                found.append(f"{prepared} prepared transaction(s) left")
            if not found:
                return []
            time.sleep(0.05)
        return found

    def roll_back_prepared(self) -> None:
        if self.is_sqlite:
            return
        with self.checker.connect() as conn:
            gids = list(
                conn.scalars(
                    text("select gid from pg_prepared_xacts where database = current_database()")
                )
            )
        for gid in gids:
            with create_engine(self.url, isolation_level="AUTOCOMMIT").connect() as conn:
                conn.execute(text(f"ROLLBACK PREPARED '{gid}'"))


class World:
    """A shape's databases, its request-scoped registries and the middleware stack.

    Rebuilt with fresh engines after a run that broke an invariant, so one leak does
    not show up again in every later run.
    """

    def __init__(self, shape: Shape, protocol: str, kind: str, urls: list[str]) -> None:
        self.shape = shape
        self.protocol = protocol
        self.is_async = kind == "async"
        self.databases = [Database(url, self.is_async) for url in urls[: shape.databases]]
        #: Two-phase commit across databases where the database has it (PostgreSQL).
        self.twophase = shape.databases > 1 and not self.databases[0].is_sqlite
        self.dbs: list[Db] = []
        self.app: Any = None
        self.generation = 0
        self.built_with: tuple[Any, dict[str, Any]] = (None, {})

    def build(self, wrap_inner: Any, middleware_options: dict[str, Any]) -> None:
        from sessionmw import ASGISessionMiddleware, WSGISessionMiddleware

        self.built_with = (wrap_inner, middleware_options)
        for database in self.databases:
            database.open()
        self.dbs = [
            Db(sessionmw.request_scoped(d.factory(self.twophase)), self.is_async)
            for d in self.databases
        ]
        shape = self.shape
        make = shape.asgi if self.protocol == "asgi" else shape.wsgi
        assert make is not None
        app = wrap_inner(make(self.dbs))
        for index in reversed(range(len(self.dbs))):
            key = "db" if index == 0 else f"db{index}"
            options = {"commit": shape.commit, **middleware_options}
            if index == 0 and shape.retries:
                options["retries"] = shape.retries
            if self.protocol == "asgi":
                app = ASGISessionMiddleware(app, self.dbs[index].scoped, state_key=key, **options)
            else:
                app = WSGISessionMiddleware(
                    app, self.dbs[index].scoped, environ_key=f"sessionmw.{key}", **options
                )
        self.app = app

    async def close(self) -> None:
        for database in self.databases:
            await database.close()

    async def reset(self) -> list[str]:
        """Start the next run on empty tables and empty pools, so that it takes the very
        same steps (a connect, a checkout) as the run that recorded them."""
        problems = self.clear()
        for database in self.databases:
            if isinstance(database.engine, AsyncEngine):
                await database.engine.dispose()
            else:
                database.engine.dispose()
        return problems

    def clear(self) -> list[str]:
        return [p for p in (d.clear() for d in self.databases) if p is not None]

    def rows(self) -> Counter[str]:
        found: Counter[str] = Counter()
        for database in self.databases:
            found.update(database.rows())
        return found

    def registries(self) -> int:
        return sum(len(db.scoped.registry.registry) for db in self.dbs)

    def checked_out(self) -> int:
        return sum(d.sync_engine.pool.checkedout() for d in self.databases)

    def leftovers(self) -> list[str]:
        return [problem for d in self.databases for problem in d.leftovers()]

    async def relocate(self) -> None:
        """Carry on in fresh SQLite files when a connection outside our reach still
        locks the old ones."""
        await self.close()
        self.generation += 1
        self.databases = [
            Database(d.url.replace(".db", f"-{self.generation}.db"), self.is_async)
            if d.is_sqlite
            else d
            for d in self.databases
        ]
        self.build(*self.built_with)
        await self.reset()

    def scrub(self) -> None:
        """After a violation: drop what the broken run left, before the next build
        (a leaked connection goes back to its pool once collected, with its locks)."""
        for db in self.dbs:
            db.scoped.registry.registry.clear()
        self.dbs = []
        self.app = None
        gc.collect()
        for database in self.databases:
            database.roll_back_prepared()


def database_urls(request: Any, backend: str, count: int, tmp: Path) -> list[str]:
    """``count`` empty databases: SQLite files, or fresh databases on the tests'
    PostgreSQL server (``pg_url`` and ``second_pg_url`` from ``tests/conftest.py``)."""
    if backend == "sqlite":
        return [f"sqlite:///{tmp / f'db{n}.db'}" for n in range(count)]
    urls = [request.getfixturevalue("pg_url")]
    if count > 1:
        urls.append(request.getfixturevalue("second_pg_url"))
    return urls
