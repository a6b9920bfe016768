"""Bugs the fault-injection harness (``tests/faults``) found, each as its smallest
reproduction.  The harness run that found each one is named in its docstring."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import anyio
import anyio.to_thread
import pytest
from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker

import sessionmw
import sessionmw.lingering
from sessionmw.offload import wait_out
from tests.asgi_helpers import http_scope
from tests.models import Base, User

pytestmark = pytest.mark.anyio


class LostAfterCommitPrepared:
    """The connection drops right after the database acknowledged COMMIT PREPARED:
    SQLAlchemy's next statement on it (the ``BEGIN`` it sends after) fails."""

    def __init__(self, engine: Engine) -> None:
        self.armed = False
        self.fired = False
        event.listen(engine, "before_cursor_execute", self.check)

    def check(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("COMMIT PREPARED"):
            self.armed = True
        elif self.armed and not self.fired:
            self.fired = True
            conn.invalidate()
            raise OperationalError(statement, {}, ConnectionResetError("connection lost"))


class HeldStatement:
    """Holds the next statements on ``engine`` until released, and notes whether their
    connection was closed under them meanwhile."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.inside, self.release = threading.Event(), threading.Event()
        self.seen: dict[str, bool] = {}
        event.listen(engine, "before_cursor_execute", self.hold)

    def hold(self, conn: Any, *args: Any) -> None:
        self.inside.set()
        self.release.wait(5)
        self.seen["closed under it"] = conn.closed or conn.invalidated

    def remove(self) -> None:
        self.release.set()
        event.remove(self.engine, "before_cursor_execute", self.hold)


@pytest.fixture
async def two_databases(pg_url: str, second_pg_url: str) -> Any:
    """Two PostgreSQL databases behind asyncpg, whose generic two-phase commit sends
    ``COMMIT PREPARED`` and then ``BEGIN`` as statements."""
    engines = []
    for url in (pg_url, second_pg_url):
        sync = create_engine(url)
        Base.metadata.create_all(sync)
        sync.dispose()
        engines.append(create_async_engine(url.replace("+psycopg", "+asyncpg")))
    yield engines
    for engine in engines:
        await engine.dispose()


async def names(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        return set((await conn.scalars(select(User.name))).all())


async def test_a_connection_lost_after_commit_prepared_is_not_a_500(
    two_databases: list[AsyncEngine],
) -> None:
    """Found at ``asgi/async/postgresql two_databases`` ``db.execute#6`` with
    ``db_error`` and ``invalidate``: the COMMIT PREPARED had gone through, but the
    failure after it sent the middleware to commit the prepared transaction again on a
    fresh connection, which found none: it answered 500 for data that was saved."""
    engine_a, engine_b = two_databases
    lost = LostAfterCommitPrepared(engine_b.sync_engine)
    session_a = sessionmw.request_scoped(async_sessionmaker(engine_a, twophase=True))
    session_b = sessionmw.request_scoped(async_sessionmaker(engine_b, twophase=True))

    async def app(scope: Any, receive: Any, send: Any) -> None:
        session_a.add(User(name="a"))
        session_b.add(User(name="b"))
        await session_a.flush()
        await session_b.flush()
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"saved"})

    inner = sessionmw.ASGISessionMiddleware(app, session_b, commit="on_success")
    stacked = sessionmw.ASGISessionMiddleware(inner, session_a, commit="on_success")
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with anyio.fail_after(10):
        await stacked(http_scope("/", "POST"), receive, send)

    assert lost.fired
    assert (await names(engine_a), await names(engine_b)) == ({"a"}, {"b"})
    assert sent[0]["status"] == 201
    for session, engine in ((session_a, engine_a), (session_b, engine_b)):
        assert session.registry.registry == {}
        assert engine.sync_engine.pool.checkedout() == 0


async def test_a_cancelled_sync_endpoint_keeps_its_session_until_its_thread_is_done(
    Session: Any, engine: Engine
) -> None:
    """Found at ``asgi/sync/sqlite write`` ``db.begin#1`` with ``cancel`` (a segfault):
    ``anyio.to_thread.run_sync`` (how Starlette runs a ``def`` endpoint) stops waiting at
    a plain ``Task.cancel()`` and the middleware closed the Session that the endpoint's
    thread was still in, under its statement."""
    held, done = HeldStatement(engine), threading.Event()

    def endpoint() -> None:
        try:
            Session.execute(select(User.name))
        finally:
            done.set()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await anyio.to_thread.run_sync(endpoint)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        pass

    middleware = sessionmw.ASGISessionMiddleware(app, Session, commit="on_success")
    request = asyncio.ensure_future(middleware(http_scope("/"), receive, send))
    try:
        await anyio.to_thread.run_sync(held.inside.wait, 5)
        request.cancel()
        await asyncio.sleep(0.2)
        # The endpoint's thread is still inside: the Session stays, the request waits.
        assert not request.done()
        assert len(Session.registry.registry) == 1
        held.release.set()
        with anyio.fail_after(5), pytest.raises(asyncio.CancelledError):
            await request
    finally:
        held.remove()

    assert done.is_set()
    assert held.seen == {"closed under it": False}
    assert Session.registry.registry == {}
    assert engine.pool.checkedout() == 0


async def test_a_cancelled_endpoint_thread_that_never_touches_the_database_waits_for_nothing(
    Session: Any, engine: Engine
) -> None:
    """The wait looks for threads inside the request's Session, not for any thread: a
    thread of the request's that holds no Session of it does not hold up the removal."""
    started, release = threading.Event(), threading.Event()

    def endpoint() -> None:
        started.set()
        release.wait(5)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        Session.execute(select(User.name))  # the request holds a Session and connection
        await anyio.to_thread.run_sync(endpoint)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        pass

    middleware = sessionmw.ASGISessionMiddleware(app, Session)
    request = asyncio.ensure_future(middleware(http_scope("/"), receive, send))
    try:
        await anyio.to_thread.run_sync(started.wait, 5)
        request.cancel()
        with anyio.fail_after(2), pytest.raises(asyncio.CancelledError):
            await request
        assert Session.registry.registry == {}
        assert engine.pool.checkedout() == 0
    finally:
        release.set()


async def test_a_cancelled_child_scope_waits_for_its_thread(Session: Any, engine: Engine) -> None:
    """The same for ``async with request_scope(Session)`` around a thread: cancelled, the
    child scope closes its Session only once the thread is out of it."""
    held = HeldStatement(engine)

    async def child() -> None:
        async with sessionmw.request_scope(Session):
            await anyio.to_thread.run_sync(lambda: Session.execute(select(User.name)))

    task = asyncio.ensure_future(child())
    try:
        await anyio.to_thread.run_sync(held.inside.wait, 5)
        task.cancel()
        await asyncio.sleep(0.2)
        assert not task.done()
        held.release.set()
        with anyio.fail_after(5), pytest.raises(asyncio.CancelledError):
            await task
    finally:
        held.remove()

    assert held.seen == {"closed under it": False}
    assert Session.registry.registry == {}
    assert engine.pool.checkedout() == 0


@pytest.mark.parametrize("ending", ["a sibling fails", "the request is cancelled"])
async def test_a_gather_child_left_running_removes_its_session_when_it_ends(
    ending: str, tmp_path: Any
) -> None:
    """Found by ``tests/test_faults_stateful.py`` ``[sync]`` (15 requests on one SQLite
    file, four ``gather_children`` with ``db_error`` or ``cancel_scope``): "registry not
    empty: 1 Session(s) left", its connection checked out.  Not a leak: ``asyncio.gather``
    returns at the first child that fails or is cancelled and leaves the other running
    after its request ended, in a child scope of its own, which removes its Session when
    the child ends.  The harness had checked before that (its teardown waited only for
    the tasks that existed before the loop first ran, not for gather's children)."""
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    Base.metadata.create_all(engine)
    Session = sessionmw.request_scoped(sessionmaker(bind=engine))
    flushed, release = threading.Event(), threading.Event()
    children: list[asyncio.Task[None]] = []

    def save(name: str) -> None:
        Session.add(User(name=name))
        Session.flush()  # a connection checked out, SQLite's write lock held
        flushed.set()
        release.wait(5)
        Session.commit()

    async def slow_child() -> None:
        async with sessionmw.request_scope(Session):
            # Waits for its thread even when cancelled, as the harness's shapes do.
            await wait_out(asyncio.ensure_future(anyio.to_thread.run_sync(save, "g2")))

    async def other_child() -> None:
        async with sessionmw.request_scope(Session):
            await anyio.to_thread.run_sync(flushed.wait, 5)
            if ending == "a sibling fails":
                raise RuntimeError("a sibling failed")
            await asyncio.sleep(10)  # cancelled with its request

    async def app(scope: Any, receive: Any, send: Any) -> None:
        children[:] = [asyncio.ensure_future(slow_child()), asyncio.ensure_future(other_child())]
        await asyncio.gather(*children)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        pass

    middleware = sessionmw.ASGISessionMiddleware(app, Session, commit="on_success")
    request = asyncio.ensure_future(middleware(http_scope("/", "POST"), receive, send))
    try:
        if ending == "a sibling fails":
            expected: type[BaseException] = RuntimeError
        else:
            expected = asyncio.CancelledError
            await anyio.to_thread.run_sync(flushed.wait, 5)
            request.cancel()
        with anyio.fail_after(10), pytest.raises(expected):
            await request

        # The request is over; its orphaned child still runs, in its own (child) scope.
        orphan = children[0]
        assert not orphan.done()
        [scope] = Session.registry.registry
        assert scope.parent is not None
        assert scope.parent.ended
        assert not scope.ended
        assert engine.pool.checkedout() == 1

        release.set()
        with anyio.fail_after(10):
            await asyncio.wait([orphan])
        assert Session.registry.registry == {}
        assert engine.pool.checkedout() == 0
        with engine.connect() as conn:
            assert set(conn.scalars(select(User.name))) == {"g2"}
    finally:
        release.set()
        engine.dispose()


def test_a_session_held_below_the_event_loop_does_not_hold_up_a_cancelled_request(
    Session: Any, engine: Engine, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wait for threads inside a cancelled request's Session skips the event loop's
    own thread: frames below the loop (here the function that runs it, whose closure
    keeps the Session) hold it without being inside it, and stalled the removal for the
    whole limit, then closed it with an ERROR."""
    monkeypatch.setattr(sessionmw.lingering, "LINGER_LIMIT", 0.5)
    kept: list[Any] = []
    held = None
    opened: asyncio.Event = None  # type: ignore[assignment]  # made on the test's loop

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal held
        held = Session()  # a local of this test's frame, below asyncio.run()
        held.execute(select(User.name))
        kept.append(held)
        opened.set()
        await asyncio.sleep(30)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        pass

    async def main() -> None:
        nonlocal opened
        opened = asyncio.Event()
        middleware = sessionmw.ASGISessionMiddleware(app, Session)
        request = asyncio.ensure_future(middleware(http_scope("/"), receive, send))
        await opened.wait()
        request.cancel()
        with anyio.fail_after(5), pytest.raises(asyncio.CancelledError):
            await request

    with caplog.at_level("ERROR", logger="sessionmw"):
        asyncio.run(main())
    assert held is kept[0]
    assert not [r.getMessage() for r in caplog.records if "still inside" in r.getMessage()]
    assert Session.registry.registry == {}
    assert engine.pool.checkedout() == 0
