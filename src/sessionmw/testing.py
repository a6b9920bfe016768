"""A pytest plugin: each test's writes roll back, and leaks fail the test.

Installed with the package (entry point ``pytest11``).  Tell it which sessions
your app uses with a fixture in your ``conftest.py``::

    @pytest.fixture
    def sessionmw_sessions():
        return [Session]            # the app's scoped_session(s)

Then ask for ``sessionmw_transaction`` (sync sessions) or
``async_sessionmw_transaction`` (any, in an ``anyio`` test): every session the
app opens during the test is bound to one connection inside an outer
transaction, with ``join_transaction_mode="create_savepoint"``, so the app's
own ``commit()`` calls, made through Flask's or Werkzeug's test client or
httpx's ``ASGITransport``, only release savepoints, and the test ends with a
rollback.  All sessions share the connection: drive the app one request at a
time, as test clients do.

``sessionmw_no_leaks`` fails the test if a session is left in a registry or a
connection out of a pool when it ends.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import pytest
from sqlalchemy import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .scope import ScopedSession, check_request_scoped, is_async

__all__ = ["assert_no_leaks", "bind_to_transaction"]


#: Connections held open by active bind_to_transaction blocks, per engine: not leaks.
_held: Counter[Engine | AsyncEngine] = Counter()


def _engine_of(session: ScopedSession) -> Engine | AsyncEngine:
    bind = session.session_factory.kw.get("bind")
    if isinstance(bind, (Connection, AsyncConnection)):
        return bind.engine
    if not isinstance(bind, (Engine, AsyncEngine)):
        raise TypeError(
            "sessionmw.testing needs the session factory bound to an engine: "
            "sessionmaker(bind=engine) or Session.session_factory.configure(bind=engine)."
        )
    return bind


def assert_no_leaks(sessions: Sequence[ScopedSession]) -> None:
    """No Session left in any registry; no connection out of any pool but a test transaction's."""
    sessions = [check_request_scoped(s, "assert_no_leaks()") for s in sessions]
    for session in sessions:
        leftover = session.registry.registry
        assert not leftover, f"sessions were never removed: {leftover!r}"
    for engine in {_engine_of(s) for s in sessions}:
        pool = engine.sync_engine.pool if isinstance(engine, AsyncEngine) else engine.pool
        counter = getattr(pool, "checkedout", None)
        if counter is None:  # SingletonThreadPool, StaticPool: nothing to count
            continue
        checked_out = counter()
        assert checked_out <= _held[engine], (
            f"{checked_out} connection(s) still checked out of {engine}"
        )


def _is_pysqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite" and engine.dialect.driver in ("pysqlite", "aiosqlite")


class bind_to_transaction:  # noqa: N801 - a context manager, used like a function
    """Bind ``sessions`` to one connection per engine, in a transaction rolled back on exit.

    Works as ``with`` for sync sessions and ``async with`` for any mix.  SQLite's
    driver would turn the first SAVEPOINT into the outer transaction (and its
    RELEASE into a commit), so on SQLite the outer BEGIN is emitted explicitly.
    """

    def __init__(self, sessions: Sequence[ScopedSession]) -> None:
        self.sessions = [check_request_scoped(s, "sessionmw.testing") for s in sessions]
        self._saved: list[tuple[ScopedSession, dict[str, Any]]] = []
        self._connections: dict[Engine | AsyncEngine, Any] = {}

    def _bind(self, session: ScopedSession, connection: Connection | AsyncConnection) -> None:
        kw = session.session_factory.kw
        self._saved.append(
            (session, {k: kw[k] for k in ("bind", "join_transaction_mode") if k in kw})
        )
        kw.pop("join_transaction_mode", None)
        session.session_factory.configure(bind=connection, join_transaction_mode="create_savepoint")

    def _unbind(self) -> None:
        for session, saved in reversed(self._saved):
            session.session_factory.kw.pop("join_transaction_mode", None)
            session.session_factory.kw.update(saved)
        self._saved.clear()

    def __enter__(self) -> bind_to_transaction:
        engines = [_engine_of(s) for s in self.sessions]  # refuse bad input before any change
        if any(is_async(s) for s in self.sessions):
            raise TypeError(
                "an async_scoped_session needs `async with bind_to_transaction(...)`, "
                "or the async_sessionmw_transaction fixture."
            )
        try:
            for session, engine in zip(self.sessions, engines, strict=True):
                if engine not in self._connections:
                    self._connections[engine] = _begin_sync(engine)  # type: ignore[arg-type]
                    _held[engine] += 1
                self._bind(session, self._connections[engine])
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._unbind()
        for engine, connection in self._connections.items():
            _held[engine] -= 1
            _rollback_sync(connection)
        self._connections.clear()

    async def __aenter__(self) -> bind_to_transaction:
        engines = [_engine_of(s) for s in self.sessions]  # refuse bad input before any change
        try:
            for session, engine in zip(self.sessions, engines, strict=True):
                if engine not in self._connections:
                    if isinstance(engine, AsyncEngine):
                        self._connections[engine] = await _begin_async(engine)
                    else:
                        self._connections[engine] = _begin_sync(engine)
                    _held[engine] += 1
                self._bind(session, self._connections[engine])
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._unbind()
        for engine, connection in self._connections.items():
            _held[engine] -= 1
            if isinstance(connection, AsyncConnection):
                await _rollback_async(connection)
            else:
                _rollback_sync(connection)
        self._connections.clear()


def _begin_sync(engine: Engine) -> Connection:
    connection = engine.connect()
    try:
        _begin(connection)
    except BaseException:
        connection.close()
        raise
    return connection


_SAVED_LEVEL = "sessionmw.isolation_level"


def _begin(connection: Connection) -> None:
    connection.begin()
    if _is_pysqlite(connection.engine):
        driver = connection.connection.driver_connection
        connection.info[_SAVED_LEVEL] = driver.isolation_level  # type: ignore[union-attr]
        driver.isolation_level = None  # type: ignore[union-attr]
        connection.exec_driver_sql("BEGIN")


def _rollback(connection: Connection) -> None:
    connection.rollback()
    if _SAVED_LEVEL in connection.info:
        level = connection.info.pop(_SAVED_LEVEL)
        connection.connection.driver_connection.isolation_level = level  # type: ignore[union-attr]


def _rollback_sync(connection: Connection) -> None:
    try:
        _rollback(connection)
    finally:
        connection.close()


async def _begin_async(engine: AsyncEngine) -> AsyncConnection:
    connection = await engine.connect()
    try:
        await connection.run_sync(_begin)
    except BaseException:
        await connection.close()
        raise
    return connection


async def _rollback_async(connection: AsyncConnection) -> None:
    try:
        await connection.run_sync(_rollback)
    finally:
        await connection.close()


@pytest.fixture
def sessionmw_sessions() -> Sequence[ScopedSession]:
    """Override in your conftest.py: the app's scoped_session(s)."""
    raise pytest.UsageError(
        "sessionmw's fixtures need to know your sessions: define a `sessionmw_sessions` "
        "fixture in conftest.py that returns a list of your app's scoped_session objects."
    )


@pytest.fixture
def sessionmw_transaction(sessionmw_sessions: Sequence[ScopedSession]) -> Iterator[None]:
    """Everything the test writes through the sessions rolls back when it ends."""
    with bind_to_transaction(sessionmw_sessions):
        yield


@pytest.fixture
async def async_sessionmw_transaction(
    sessionmw_sessions: Sequence[ScopedSession],
) -> AsyncIterator[None]:
    """:func:`sessionmw_transaction` for async (and mixed) sessions, in an anyio test."""
    async with bind_to_transaction(sessionmw_sessions):
        yield


@pytest.fixture
def sessionmw_no_leaks(sessionmw_sessions: Sequence[ScopedSession]) -> Iterator[None]:
    """Fail the test if it leaves a session in a registry or a connection checked out."""
    yield
    assert_no_leaks(sessionmw_sessions)
