"""``sessionmw.on_commit``: after the outermost commit, once; never after a rollback.

Outside a request the callbacks run right after the commit; in a request served by a
middleware they run after the response has been sent, whoever committed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, text
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import sessionmw
from tests.asgi_helpers import Db
from tests.conftest import assert_clean, user_names
from tests.models import Note, User
from tests.servers import uvicorn_server
from tests.wsgi_helpers import Server

pytestmark = pytest.mark.anyio


# -- outside a request: right after the commit ---------------------------------------


def test_runs_once_after_the_commit(Session: Any, engine: Engine) -> None:
    ran: list[str] = []
    with sessionmw.request_scope(Session):
        Session.add(User(name="a"))
        sessionmw.on_commit(Session, lambda: ran.append(f"rows={len(user_names(engine))}"))
        assert ran == []
        Session.commit()
        assert ran == ["rows=1"]  # after the commit returned: the row is visible
        Session.add(User(name="b"))
        Session.commit()
    assert ran == ["rows=1"]  # never twice
    assert_clean(Session, engine)


def test_dropped_on_rollback_failed_commit_and_close(Session: Any, engine: Engine) -> None:
    ran: list[str] = []
    with sessionmw.request_scope(Session):
        Session.add(User(name="rolled back"))
        sessionmw.on_commit(Session, lambda: ran.append("rollback"))
        Session.rollback()
        Session.add(Note(user_id=10**6, body="dangling: the commit fails"))
        sessionmw.on_commit(Session, lambda: ran.append("failed commit"))
        with pytest.raises(Exception, match=r"(?i)foreign key"):
            Session.commit()
        Session.rollback()
        Session.add(User(name="never committed"))
        sessionmw.on_commit(Session, lambda: ran.append("closed"))
    with sessionmw.request_scope(Session):
        Session.commit()  # a later transaction does not inherit them
    assert ran == []
    assert_clean(Session, engine)


def test_savepoints(Session: Any, engine: Engine) -> None:
    """Registered in a savepoint that rolls back: dropped.  In one that is released: runs
    with the outer commit, not at the release."""
    ran: list[str] = []
    with sessionmw.request_scope(Session):
        Session.add(User(name="outer"))
        with Session.begin_nested() as failed:
            Session.add(User(name="inner, rolled back"))
            sessionmw.on_commit(Session, lambda: ran.append("rolled-back savepoint"))
            failed.rollback()
        with Session.begin_nested():
            sessionmw.on_commit(Session, lambda: ran.append("released savepoint"))
        assert ran == []
        sessionmw.on_commit(Session, lambda: ran.append("outer"))
        Session.commit()
    assert ran == ["released savepoint", "outer"]
    assert user_names(engine) == {"outer"}
    assert_clean(Session, engine)


async def test_async_session_awaits_coroutine_callbacks(
    AsyncSession: Any, engine: Engine, async_engine: Any
) -> None:
    ran: list[str] = []

    async def notify() -> None:
        await asyncio.sleep(0)
        ran.append("awaited")

    async with sessionmw.request_scope(AsyncSession):
        AsyncSession.add(User(name="async"))
        sessionmw.on_commit(AsyncSession, notify)
        sessionmw.on_commit(AsyncSession(), lambda: ran.append("sync"))
        await AsyncSession.commit()
        assert ran == ["awaited", "sync"]
    assert_clean(AsyncSession, async_engine.sync_engine)


def test_bad_arguments_name_the_fix(Session: Any) -> None:
    with sessionmw.request_scope(Session), pytest.raises(TypeError, match="callable"):
        sessionmw.on_commit(Session, "send mail")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="scoped_session"):
        sessionmw.on_commit(object(), print)  # type: ignore[arg-type]


# -- WSGI: after the response ---------------------------------------------------------


def test_wsgi_runs_after_the_body_was_sent(Session: Any, engine: Engine) -> None:
    events: list[str] = []

    def app(environ: Any, start_response: Any) -> Iterator[bytes]:
        start_response("201 Created", [])
        Session.add(User(name="streamed"))
        sessionmw.on_commit(Session, lambda: events.append("callback"))
        yield b"one"
        events.append("last chunk made")
        yield b"two"

    body = Server().call(sessionmw.WSGISessionMiddleware(app, Session, commit="on_success"))
    chunks = list(body)
    events.append("server sent the body")
    assert events == ["last chunk made", "server sent the body"]
    body.close()  # type: ignore[attr-defined]
    assert events[-1] == "callback"
    assert chunks == [b"one", b"two"]
    assert_clean(Session, engine)


def test_wsgi_list_body_runs_them_when_the_server_closes_it(Session: Any, engine: Engine) -> None:
    ran: list[str] = []

    def app(environ: Any, start_response: Any) -> list[bytes]:
        Session.add(User(name="listed"))
        sessionmw.on_commit(Session, lambda: ran.append("callback"))
        start_response("201 Created", [])
        return [b"created"]

    body = Server().call(sessionmw.WSGISessionMiddleware(app, Session, commit="on_success"))
    assert user_names(engine) == {"listed"}  # committed before the server got the body
    assert list(body) == [b"created"]
    assert ran == []
    body.close()  # type: ignore[attr-defined]
    assert ran == ["callback"]
    assert_clean(Session, engine)


def test_wsgi_manual_commit_runs_them_even_if_the_request_then_fails(
    Session: Any, engine: Engine
) -> None:
    ran: list[str] = []

    def app(environ: Any, start_response: Any) -> list[bytes]:
        Session.add(User(name="committed by hand"))
        sessionmw.on_commit(Session, lambda: ran.append("committed"))
        Session.commit()
        Session.add(User(name="then failed"))
        sessionmw.on_commit(Session, lambda: ran.append("never committed"))
        raise RuntimeError("after the manual commit")

    with pytest.raises(RuntimeError):
        Server().call(sessionmw.WSGISessionMiddleware(app, Session))
    assert ran == ["committed"]
    assert user_names(engine) == {"committed by hand"}
    assert_clean(Session, engine)


def test_wsgi_rollback_by_policy_drops_them(Session: Any, engine: Engine) -> None:
    ran: list[str] = []

    def app(environ: Any, start_response: Any) -> list[bytes]:
        Session.add(User(name="404"))
        sessionmw.on_commit(Session, lambda: ran.append("callback"))
        start_response("404 Not Found", [])
        return [b""]

    Server().get(sessionmw.WSGISessionMiddleware(app, Session, commit="on_success"))
    assert ran == []
    assert_clean(Session, engine)


# -- ASGI ---------------------------------------------------------------------------------


def asgi_app(db: Db, record: list[Any], commit: str = "on_success") -> Starlette:
    async def notify() -> None:
        record.append(("async callback", threading.get_ident()))

    def failing() -> None:
        raise RuntimeError("a callback that fails")

    async def write(request: Request) -> Response:
        await db.add_user(request.path_params["name"])
        sessionmw.on_commit(db.session, lambda: record.append(("sync", threading.get_ident())))
        sessionmw.on_commit(db.session, failing)
        sessionmw.on_commit(db.session, notify)
        status = int(request.query_params.get("status", 201))
        return PlainTextResponse("w", status_code=status)

    async def manual_then_crash(request: Request) -> Response:
        await db.add_user(request.path_params["name"])
        sessionmw.on_commit(db.session, lambda: record.append(("manual", 0)))
        await db.commit()
        raise RuntimeError("after the manual commit")

    return Starlette(
        routes=[
            Route("/write/{name}", write, methods=["POST"]),
            Route("/crash/{name}", manual_then_crash, methods=["POST"]),
        ],
        middleware=[Middleware(sessionmw.ASGISessionMiddleware, session=db.session, commit=commit)],
    )


def client(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://t")


async def test_asgi_runs_them_in_order_after_the_response(
    db: Db, caplog: pytest.LogCaptureFixture
) -> None:
    record: list[Any] = []
    loop_thread = threading.get_ident()
    with caplog.at_level(logging.ERROR, "sessionmw"):
        async with client(asgi_app(db, record)) as c:
            assert (await c.post("/write/ok")).status_code == 201
            assert (await c.post("/write/gone?status=404")).status_code == 404
    assert [name for name, _ in record] == ["sync", "async callback"]
    assert record[0][1] != loop_thread  # sync callbacks run in a worker thread
    assert "an on_commit callback failed after POST /write/ok" in caplog.text
    assert user_names(db.engine) == {"ok"}
    assert_clean(db.session, db.pool_engine)


async def test_asgi_manual_commit_then_crash_still_runs_them(db: Db) -> None:
    record: list[Any] = []
    async with client(asgi_app(db, record, commit="manual")) as c:
        assert (await c.post("/crash/kept")).status_code == 500
    assert record == [("manual", 0)]
    assert user_names(db.engine) == {"kept"}
    assert_clean(db.session, db.pool_engine)


async def test_asgi_request_cancelled_after_its_commit_still_runs_them(db: Db) -> None:
    """The client goes away while the response streams: the commit is done, so the
    callbacks run, shielded from the cancellation."""
    ran = asyncio.Event()
    streaming = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await db.add_user("cancelled after commit")
        sessionmw.on_commit(db.session, ran.set)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        streaming.set()
        await asyncio.sleep(30)  # cancelled here

    mw = sessionmw.ASGISessionMiddleware(app, db.session, commit="on_success")
    scope = {"type": "http", "method": "GET", "path": "/", "headers": []}
    sent: list[Any] = []

    async def receive() -> Any:
        await asyncio.sleep(60)

    async def send(message: Any) -> None:
        sent.append(message)

    task = asyncio.ensure_future(mw(scope, receive, send))
    await streaming.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ran.is_set()
    assert user_names(db.engine) == {"cancelled after commit"}
    assert_clean(db.session, db.pool_engine)


@pytest.mark.slow
def test_a_slow_callback_does_not_delay_the_response(Session: Any, engine: Engine) -> None:
    """On a real server: the client has its answer while the callback is still blocked
    waiting for that very answer; a callback run before the response would time out."""
    answered = threading.Event()
    finished: list[bool] = []

    def wait_for_the_answer() -> None:
        finished.append(answered.wait(20))

    def endpoint(request: Request) -> Response:
        Session.add(User(name="slow callback"))
        sessionmw.on_commit(Session, wait_for_the_answer)
        return PlainTextResponse("created", status_code=201)

    app = Starlette(
        routes=[Route("/", endpoint, methods=["POST"])],
        middleware=[
            Middleware(sessionmw.ASGISessionMiddleware, session=Session, commit="on_success")
        ],
    )
    with uvicorn_server(app) as base:
        response = httpx.post(base, timeout=10)
        answered.set()
        assert response.status_code == 201
        for _ in range(200):
            if finished:
                break
            threading.Event().wait(0.05)
    assert finished == [True]
    assert user_names(engine) == {"slow callback"}
    with engine.connect() as conn:
        assert conn.scalar(text("select count(*) from users")) == 1
