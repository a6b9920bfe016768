"""``retries=``: a request that met a transient database error is replayed when safe.

The transient error here is SQLite's real "database is locked": another connection
holds the write lock, and lets go of it once the request has failed.  The PostgreSQL
cases (write skew at SERIALIZABLE under real servers) are in ``test_retries_pg.py``.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio.to_thread
import httpx
import pytest
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import sessionmaker
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

import sessionmw
from tests.conftest import Tracker, assert_clean, user_names
from tests.models import Base, User
from tests.wsgi_helpers import Server

pytestmark = pytest.mark.anyio


class Lock:
    """Another connection holding SQLite's write lock until ``failures`` writes failed."""

    def __init__(self, path: Path, failures: int) -> None:
        self.blocker = sqlite3.connect(path, isolation_level=None)
        self.blocker.execute("BEGIN IMMEDIATE")
        self.failures = failures

    def seen(self, context: Any) -> None:
        self.failures -= 1
        if self.failures == 0:
            self.blocker.execute("ROLLBACK")

    def close(self) -> None:
        self.blocker.close()


@pytest.fixture
def locked_db(tmp_path: Path) -> Iterator[tuple[Engine, Path]]:
    path = tmp_path / "locked.db"
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.05})
    Base.metadata.create_all(engine)
    yield engine, path
    engine.dispose()


def sessions(engine: Engine, tracker: Tracker) -> Any:
    return sessionmw.request_scoped(sessionmaker(bind=engine, class_=tracker.session_class()))


def starlette_app(Session: Any, **options: Any) -> Starlette:
    attempts: list[int] = []

    async def write(request: Request) -> Response:
        attempts.append(1)
        data = await request.json()
        committed = []
        sessionmw.on_commit(Session, lambda: committed.append(data["name"]))
        request.state.db.add(User(name=data["name"]))
        request.state.db.flush()  # "database is locked" while the other holds the lock
        return JSONResponse({"attempts": len(attempts)}, status_code=201)

    async def handled(request: Request) -> Response:
        try:
            request.state.db.add(User(name="handled"))
            request.state.db.flush()
        except OperationalError:
            return PlainTextResponse("handled by the app", status_code=503)
        return PlainTextResponse("ok", status_code=201)

    async def committed_first(request: Request) -> Response:
        request.state.db.add(User(name="committed by hand"))
        request.state.db.commit()
        request.state.db.add(User(name="after"))
        request.state.db.flush()
        return PlainTextResponse("never", status_code=201)

    app = Starlette(
        routes=[
            Route("/write", write, methods=["POST"]),
            Route("/handled", handled, methods=["POST"]),
            Route("/committed-first", committed_first, methods=["POST"]),
        ],
        middleware=[
            Middleware(
                sessionmw.ASGISessionMiddleware, session=Session, commit="on_success", **options
            )
        ],
    )
    app.state.attempts = attempts
    return app


def client(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://t")


async def test_asgi_replays_with_the_body_until_it_succeeds(
    locked_db: tuple[Engine, Path], tracker: Tracker, caplog: pytest.LogCaptureFixture
) -> None:
    engine, path = locked_db
    lock = Lock(path, failures=2)
    event.listen(engine, "handle_error", lock.seen)
    Session = sessions(engine, tracker)
    app = starlette_app(Session, retries=3)
    with caplog.at_level(logging.WARNING, "sessionmw"):
        async with client(app) as c:
            response = await c.post("/write", json={"name": "replayed"})
    lock.close()
    assert response.status_code == 201
    assert response.json() == {"attempts": 3}
    assert user_names(engine) == {"replayed"}
    replays = [r for r in caplog.records if "replaying POST /write" in r.getMessage()]
    assert len(replays) == 2
    assert len(tracker.created) == 3  # a fresh Session per attempt
    assert_clean(Session, engine, tracker)


async def test_asgi_without_retries_answers_the_failure(
    locked_db: tuple[Engine, Path], tracker: Tracker
) -> None:
    engine, path = locked_db
    lock = Lock(path, failures=1)
    event.listen(engine, "handle_error", lock.seen)
    Session = sessions(engine, tracker)
    async with client(starlette_app(Session)) as c:
        response = await c.post("/write", json={"name": "not replayed"})
    lock.close()
    assert response.status_code == 500
    assert user_names(engine) == set()
    assert_clean(Session, engine, tracker)


async def test_asgi_gives_up_after_the_last_replay(
    locked_db: tuple[Engine, Path], tracker: Tracker
) -> None:
    engine, path = locked_db
    lock = Lock(path, failures=5)
    event.listen(engine, "handle_error", lock.seen)
    Session = sessions(engine, tracker)
    app = starlette_app(Session, retries=2)
    async with client(app) as c:
        response = await c.post("/write", json={"name": "gave up"})
    lock.close()
    assert response.status_code == 500
    assert len(app.state.attempts) == 3
    assert user_names(engine) == set()
    assert_clean(Session, engine, tracker)


async def test_asgi_replays_a_5xx_the_app_answered_itself(
    locked_db: tuple[Engine, Path], tracker: Tracker
) -> None:
    """The app caught the error and answered 503: the signal is the database error seen
    on the way, not the exception alone; the held-back 503 never reaches the client."""
    engine, path = locked_db
    lock = Lock(path, failures=1)
    event.listen(engine, "handle_error", lock.seen)
    Session = sessions(engine, tracker)
    async with client(starlette_app(Session, retries=1)) as c:
        response = await c.post("/handled")
    lock.close()
    assert (response.status_code, response.text) == (201, "ok")
    assert user_names(engine) == {"handled"}
    assert_clean(Session, engine, tracker)


async def test_asgi_never_replays_a_request_that_committed(
    locked_db: tuple[Engine, Path], tracker: Tracker
) -> None:
    engine, path = locked_db
    Session = sessions(engine, tracker)
    blocked: list[sqlite3.Connection] = []

    @event.listens_for(engine, "commit")
    def lock_after_the_manual_commit(conn: Any) -> None:
        if not blocked:
            blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            blocked.append(blocker)

    @event.listens_for(Session.session_factory, "after_commit")
    def take_the_lock(session: Any) -> None:
        if blocked and not blocked[0].in_transaction:
            blocked[0].execute("BEGIN IMMEDIATE")

    app = starlette_app(Session, retries=3)
    async with client(app) as c:
        response = await c.post("/committed-first")
    blocked[0].close()
    assert response.status_code == 500
    assert user_names(engine) == {"committed by hand"}  # kept, once
    assert_clean(Session, engine, tracker)


async def test_asgi_body_over_the_limit_is_not_replayed(
    locked_db: tuple[Engine, Path], tracker: Tracker
) -> None:
    engine, path = locked_db
    lock = Lock(path, failures=1)
    event.listen(engine, "handle_error", lock.seen)
    Session = sessions(engine, tracker)
    app = starlette_app(Session, retries=3, retry_body_limit=10)
    async with client(app) as c:
        response = await c.post("/write", json={"name": "a body longer than ten bytes"})
    lock.close()
    assert response.status_code == 500
    assert len(app.state.attempts) == 1
    assert_clean(Session, engine, tracker)


def test_wsgi_replays_with_the_body_until_it_succeeds(
    locked_db: tuple[Engine, Path], tracker: Tracker
) -> None:
    engine, path = locked_db
    lock = Lock(path, failures=2)
    event.listen(engine, "handle_error", lock.seen)
    Session = sessions(engine, tracker)
    bodies: list[bytes] = []
    callbacks: list[str] = []

    def app(environ: Any, start_response: Any) -> list[bytes]:
        body = environ["wsgi.input"].read(int(environ["CONTENT_LENGTH"]))
        bodies.append(body)
        sessionmw.on_commit(Session, lambda: callbacks.append(f"attempt {len(bodies)}"))
        Session.add(User(name=body.decode()))
        Session.flush()
        start_response("201 Created", [])
        return [b"created"]

    mw = sessionmw.WSGISessionMiddleware(app, Session, commit="on_success", retries=3)
    status, body = Server().get(mw, method="POST", data=b"wsgi replayed")
    lock.close()
    assert (status, body) == ("201 Created", b"created")
    assert bodies == [b"wsgi replayed"] * 3  # byte for byte, every attempt
    assert callbacks == ["attempt 3"]  # never for an attempt that did not commit
    assert user_names(engine) == {"wsgi replayed"}
    assert_clean(Session, engine, tracker)


def test_wsgi_replays_a_streamed_body_failing_before_its_first_chunk(
    locked_db: tuple[Engine, Path], tracker: Tracker
) -> None:
    engine, path = locked_db
    lock = Lock(path, failures=1)
    event.listen(engine, "handle_error", lock.seen)
    Session = sessions(engine, tracker)
    server = Server()

    def app(environ: Any, start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [])
        Session.add(User(name="streamed"))
        Session.flush()
        yield b"first"
        yield b"second"

    mw = sessionmw.WSGISessionMiddleware(app, Session, commit="on_success", retries=1)
    status, body = server.get(mw)
    lock.close()
    assert (status, body) == ("200 OK", b"firstsecond")
    assert server.statuses == ["200 OK"]  # the failed attempt's status never reached it
    assert user_names(engine) == {"streamed"}
    assert_clean(Session, engine, tracker)


def test_is_transient_on_real_errors(locked_db: tuple[Engine, Path]) -> None:
    engine, path = locked_db
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    with pytest.raises(OperationalError) as locked, engine.begin() as conn:
        conn.execute(text("insert into users (name) values ('x')"))
    blocker.close()
    assert sessionmw.is_transient(locked.value)
    assert sessionmw.is_transient(locked.value.orig)  # type: ignore[arg-type]
    with pytest.raises(OperationalError) as other, engine.connect() as conn:
        conn.execute(text("select * from no_such_table"))
    assert not sessionmw.is_transient(other.value)
    assert not sessionmw.is_transient(ValueError("database is locked"))


def test_bad_retry_arguments_name_the_fix(Session: Any) -> None:
    with pytest.raises(ValueError, match="retries="):
        sessionmw.WSGISessionMiddleware(lambda e, s: [], Session, retries=-1)
    with pytest.raises(TypeError, match="retry_on="):
        sessionmw.WSGISessionMiddleware(lambda e, s: [], Session, retry_on="yes")  # type: ignore[arg-type]


def _write_skew(url: str) -> BaseException:
    """Two SERIALIZABLE transactions that each read what the other writes: the second
    commit fails with a serialization failure (SQLSTATE 40001)."""
    engine = create_engine(url, isolation_level="SERIALIZABLE")
    try:
        with engine.begin() as conn:
            conn.execute(text("create table if not exists skew (n int)"))
        first, second = engine.connect(), engine.connect()
        for conn, n in ((first, 1), (second, 2)):
            conn.execute(text("select count(*) from skew"))
            conn.execute(text("insert into skew values (:n)"), {"n": n})
        first.commit()
        with pytest.raises(OperationalError) as failure:
            second.commit()
        first.close()
        second.close()
        return failure.value
    finally:
        engine.dispose()


def test_is_transient_on_postgresql_serialization_failures(pg_url: str) -> None:
    assert sessionmw.is_transient(_write_skew(pg_url))


async def test_is_transient_on_asyncpg_serialization_failures(pg_url: str) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    await anyio.to_thread.run_sync(_write_skew, pg_url)  # the table exists
    engine = create_async_engine(
        pg_url.replace("+psycopg", "+asyncpg"), isolation_level="SERIALIZABLE"
    )
    first, second = await engine.connect(), await engine.connect()
    for conn, n in ((first, 3), (second, 4)):
        await conn.execute(text("select count(*) from skew"))
        await conn.execute(text("insert into skew values (:n)"), {"n": n})
    await first.commit()
    with pytest.raises(Exception) as failure:  # noqa: PT011 - the driver's own class
        await second.commit()
    await first.close()
    await second.close()
    await engine.dispose()
    assert sessionmw.is_transient(failure.value)
