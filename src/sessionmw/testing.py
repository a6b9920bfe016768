"""A pytest plugin: each test's writes are undone, and leaks fail the test.

Installed with the package (entry point ``pytest11``).  Tell it which sessions
your app uses with a fixture in your ``conftest.py``::

    @pytest.fixture
    def sessionmw_sessions():
        return [Session]            # the app's scoped_session(s)

Then ask for ``sessionmw_transaction`` (sync sessions) or
``async_sessionmw_transaction`` (any, in an ``anyio`` test).  Two isolations:

* ``"savepoint"`` (the default, fast): every session the app opens during the test
  is bound to one connection inside an outer transaction, with
  ``join_transaction_mode="create_savepoint"``, so the app's own ``commit()`` calls
  only release savepoints, and the test ends with a rollback.  Sessions whose
  transactions overlap in a way one connection cannot reproduce are refused with
  :class:`OverlappingSessionsError`, which names the fix.
* ``"truncate"``: sessions use their engines as in production (a connection and a
  transaction each); when the test ends the tables are emptied and the rows they held
  before it are put back.

Choose per test with ``@pytest.mark.sessionmw_isolation("truncate")``, for all tests
with ``sessionmw_isolation = truncate`` in the ini file, or per directory by overriding
the ``sessionmw_isolation`` fixture.  ``sessionmw_no_leaks`` fails the test if a session
is left in a registry or a connection out of a pool when it ends.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Literal, cast, get_args

import pytest
from sqlalchemy import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .savepoint_guard import OverlappingSessionsError, SavepointGuard
from .scope import ScopedSession, check_request_scoped, is_async
from .table_restore import engine_of, restore_tables

__all__ = [
    "Isolation",
    "OverlappingSessionsError",
    "ScopedSession",
    "assert_no_leaks",
    "bind_to_transaction",
    "restore_tables",
]

#: How a test's writes are undone: see the module's docstring.
Isolation = Literal["savepoint", "truncate"]


#: Connections held open by active bind_to_transaction blocks, per engine: not leaks.
_held: Counter[Engine | AsyncEngine] = Counter()


def assert_no_leaks(sessions: Sequence[ScopedSession]) -> None:
    """No Session left in any registry; no connection out of any pool but a test transaction's."""
    sessions = [check_request_scoped(s, "assert_no_leaks()") for s in sessions]
    for session in sessions:
        leftover = session.registry.registry
        assert not leftover, f"sessions were never removed: {leftover!r}"
    for engine in {engine_of(s) for s in sessions}:
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
    Sessions that overlap in a way one connection cannot reproduce raise
    :class:`OverlappingSessionsError`, and so does the block's exit afterwards, in
    case the app swallowed it.
    """

    def __init__(self, sessions: Sequence[ScopedSession]) -> None:
        self.sessions = [check_request_scoped(s, "sessionmw.testing") for s in sessions]
        self._saved: list[tuple[ScopedSession, dict[str, Any]]] = []
        self._connections: dict[Engine | AsyncEngine, Any] = {}
        self._guards: list[SavepointGuard] = []

    def _bind(self, session: ScopedSession, connection: Connection | AsyncConnection) -> None:
        kw = session.session_factory.kw
        self._saved.append(
            (session, {k: kw[k] for k in ("bind", "join_transaction_mode") if k in kw})
        )
        kw.pop("join_transaction_mode", None)
        session.session_factory.configure(bind=connection, join_transaction_mode="create_savepoint")

    def _hold(self, engine: Engine | AsyncEngine, connection: Connection | AsyncConnection) -> None:
        self._connections[engine] = connection
        _held[engine] += 1
        sync = connection.sync_connection if isinstance(connection, AsyncConnection) else connection
        guard = SavepointGuard(sync)  # type: ignore[arg-type]
        guard.attach()
        self._guards.append(guard)

    def _release_guards(self, exc: tuple[object, ...]) -> None:
        """Stop watching; raise the first refusal if the block did not already fail."""
        violations = [v for guard in self._guards for v in guard.violations]
        for guard in self._guards:
            guard.detach()
        self._guards.clear()
        if violations and not (exc and exc[0] is not None):
            raise OverlappingSessionsError(violations[0])

    def _unbind(self) -> None:
        for session, saved in reversed(self._saved):
            session.session_factory.kw.pop("join_transaction_mode", None)
            session.session_factory.kw.update(saved)
        self._saved.clear()

    def __enter__(self) -> bind_to_transaction:
        engines = [engine_of(s) for s in self.sessions]  # refuse bad input before any change
        if any(is_async(s) for s in self.sessions):
            raise TypeError(
                "an async_scoped_session needs `async with bind_to_transaction(...)`, "
                "or the async_sessionmw_transaction fixture."
            )
        try:
            for session, engine in zip(self.sessions, engines, strict=True):
                if engine not in self._connections:
                    self._hold(engine, _begin_sync(engine))  # type: ignore[arg-type]
                self._bind(session, self._connections[engine])
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._unbind()
        try:
            for engine, connection in self._connections.items():
                _held[engine] -= 1
                _rollback_sync(connection)
            self._connections.clear()
        finally:
            self._release_guards(exc)

    async def __aenter__(self) -> bind_to_transaction:
        engines = [engine_of(s) for s in self.sessions]  # refuse bad input before any change
        try:
            for session, engine in zip(self.sessions, engines, strict=True):
                if engine not in self._connections:
                    if isinstance(engine, AsyncEngine):
                        self._hold(engine, await _begin_async(engine))
                    else:
                        self._hold(engine, _begin_sync(engine))
                self._bind(session, self._connections[engine])
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._unbind()
        try:
            for engine, connection in self._connections.items():
                _held[engine] -= 1
                if isinstance(connection, AsyncConnection):
                    await _rollback_async(connection)
                else:
                    _rollback_sync(connection)
            self._connections.clear()
        finally:
            self._release_guards(exc)


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


_ISOLATION_HELP = (
    "How sessionmw's fixtures undo a test's writes: 'savepoint' (one connection, one outer "
    "transaction rolled back; the default) or 'truncate' (a connection per session, as in "
    "production; the tables are put back after the test)."
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("sessionmw_isolation", _ISOLATION_HELP, default="savepoint")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "sessionmw_isolation(mode): 'savepoint' or 'truncate' for this test"
    )


def _isolation(value: object, where: str) -> Isolation:
    if value not in get_args(Isolation):
        raise pytest.UsageError(
            f"{where} is {value!r}; sessionmw_isolation takes 'savepoint' or 'truncate'."
        )
    return cast(Isolation, value)


@pytest.fixture
def sessionmw_isolation(request: pytest.FixtureRequest) -> Isolation:
    """The test's isolation: its ``sessionmw_isolation`` marker, else the ini option."""
    marker = request.node.get_closest_marker("sessionmw_isolation")
    if marker is not None and marker.args:
        return _isolation(marker.args[0], "@pytest.mark.sessionmw_isolation(...)")
    return _isolation(request.config.getini("sessionmw_isolation"), "sessionmw_isolation")


@pytest.fixture
def sessionmw_sessions() -> Sequence[ScopedSession]:
    """Override in your conftest.py: the app's scoped_session(s)."""
    raise pytest.UsageError(
        "sessionmw's fixtures need to know your sessions: define a `sessionmw_sessions` "
        "fixture in conftest.py that returns a list of your app's scoped_session objects."
    )


@pytest.fixture
def sessionmw_transaction(
    sessionmw_sessions: Sequence[ScopedSession], sessionmw_isolation: Isolation
) -> Iterator[None]:
    """Everything the test writes through the sessions is undone when it ends."""
    if sessionmw_isolation == "truncate":
        with restore_tables(sessionmw_sessions):
            yield
    else:
        with bind_to_transaction(sessionmw_sessions):
            yield


@pytest.fixture
async def async_sessionmw_transaction(
    sessionmw_sessions: Sequence[ScopedSession], sessionmw_isolation: Isolation
) -> AsyncIterator[None]:
    """:func:`sessionmw_transaction` for async (and mixed) sessions, in an anyio test."""
    if sessionmw_isolation == "truncate":
        async with restore_tables(sessionmw_sessions):
            yield
    else:
        async with bind_to_transaction(sessionmw_sessions):
            yield


@pytest.fixture
def sessionmw_no_leaks(sessionmw_sessions: Sequence[ScopedSession]) -> Iterator[None]:
    """Fail the test if it leaves a session in a registry or a connection checked out."""
    yield
    assert_no_leaks(sessionmw_sessions)
