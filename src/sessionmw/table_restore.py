"""Truncate isolation: sessions use their engines as in production; the tables are put back.

Each session keeps its own connection and transaction, so a commit of one is durable
even if another rolls back, and sessions may open and close in any order, exactly as in
production.  The price: the test's writes are really committed, so when the test ends
every table of the engine's default schema is emptied (``TRUNCATE`` on PostgreSQL,
``DELETE`` on SQLite) and the rows it held when the test began (data seeded before the
tests) are inserted again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from sqlalchemy import Connection, Engine, MetaData, Table, insert, inspect, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .scope import ScopedSession, check_request_scoped

__all__ = ["engine_of", "restore_tables"]

#: How long the clean-up waits for a lock on a table before it says which one is held.
LOCK_TIMEOUT_SECONDS = 10


@dataclass
class Snapshot:
    """The rows of the tables that held any when the test began, in insertion order."""

    tables: list[Table] = field(default_factory=list)
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def _quote(connection: Connection, name: str) -> str:
    return connection.dialect.identifier_preparer.quote(name)


def take_snapshot(connection: Connection) -> Snapshot:
    """Read the rows of every non-empty table of the default schema."""
    names = inspect(connection).get_table_names()
    filled = [
        name
        for name in names
        if connection.execute(text(f"SELECT 1 FROM {_quote(connection, name)} LIMIT 1")).first()
    ]
    snapshot = Snapshot()
    if filled:
        metadata = MetaData()
        metadata.reflect(connection, only=filled)
        snapshot.tables = [t for t in metadata.sorted_tables if t.name in filled]
        for table in snapshot.tables:
            rows = connection.execute(select(table)).mappings()
            snapshot.rows[table.name] = [dict(row) for row in rows]
    connection.rollback()
    return snapshot


def restore(connection: Connection, snapshot: Snapshot) -> None:
    """Empty every table of the default schema, then insert the snapshot's rows again."""
    names = inspect(connection).get_table_names()
    sqlite = connection.dialect.name == "sqlite"
    foreign_keys = None
    if sqlite:
        connection.rollback()  # PRAGMA foreign_keys is ignored inside a transaction
        foreign_keys = connection.exec_driver_sql("PRAGMA foreign_keys").scalar()
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
    try:
        if sqlite:
            for name in names:
                connection.execute(text(f"DELETE FROM {_quote(connection, name)}"))
        elif names:
            if connection.dialect.name == "postgresql":
                connection.exec_driver_sql(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT_SECONDS}s'")
            connection.execute(
                text("TRUNCATE " + ", ".join(_quote(connection, name) for name in names))
            )
        for table in snapshot.tables:
            connection.execute(insert(table), snapshot.rows[table.name])
        connection.commit()
    except OperationalError as exc:
        connection.rollback()
        raise RuntimeError(
            "sessionmw.testing could not empty the tables after the test: a connection "
            "still holds a lock on them, most likely a session that was never removed "
            "(add the sessionmw_no_leaks fixture to find it)."
        ) from exc
    finally:
        if sqlite and foreign_keys:
            connection.rollback()
            connection.exec_driver_sql("PRAGMA foreign_keys=ON")


def engine_of(session: ScopedSession) -> Engine | AsyncEngine:
    """The engine a scoped_session's factory is bound to (even while bound to a connection)."""
    bind = session.session_factory.kw.get("bind")
    if isinstance(bind, (Connection, AsyncConnection)):
        return bind.engine
    if not isinstance(bind, (Engine, AsyncEngine)):
        raise TypeError(
            "sessionmw.testing needs the session factory bound to an engine: "
            "sessionmaker(bind=engine) or Session.session_factory.configure(bind=engine)."
        )
    return bind


def _engines(sessions: Sequence[ScopedSession]) -> list[Engine | AsyncEngine]:
    engines: list[Engine | AsyncEngine] = []
    for session in sessions:
        engine = engine_of(check_request_scoped(session, "sessionmw.testing"))
        if engine not in engines:
            engines.append(engine)
    return engines


class restore_tables:  # noqa: N801 - a context manager, used like a function
    """Put every table of the sessions' databases back as it was when the block began.

    Nothing is rebound: the app's sessions use their engines exactly as in production.
    ``with`` for sync engines, ``async with`` for any mix.
    """

    def __init__(self, sessions: Sequence[ScopedSession]) -> None:
        self.engines = _engines(sessions)
        self._snapshots: dict[Engine | AsyncEngine, Snapshot] = {}

    def __enter__(self) -> restore_tables:
        if any(isinstance(e, AsyncEngine) for e in self.engines):
            raise TypeError(
                "an async engine needs `async with restore_tables(...)`, "
                "or the async_sessionmw_transaction fixture."
            )
        for engine in self.engines:
            with engine.connect() as connection:  # type: ignore[union-attr]
                self._snapshots[engine] = take_snapshot(connection)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for engine, snapshot in self._snapshots.items():
            with engine.connect() as connection:  # type: ignore[union-attr]
                restore(connection, snapshot)
        self._snapshots.clear()

    async def __aenter__(self) -> restore_tables:
        for engine in self.engines:
            if isinstance(engine, AsyncEngine):
                async with engine.connect() as connection:
                    self._snapshots[engine] = await connection.run_sync(take_snapshot)
            else:
                with engine.connect() as connection:
                    self._snapshots[engine] = take_snapshot(connection)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for engine, snapshot in self._snapshots.items():
            if isinstance(engine, AsyncEngine):
                async with engine.connect() as connection:
                    await connection.run_sync(restore, snapshot)
            else:
                with engine.connect() as connection:
                    restore(connection, snapshot)
        self._snapshots.clear()
