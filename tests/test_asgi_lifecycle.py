"""ASGISessionMiddleware against docs/lifecycle.md, with a sync and an async scoped_session."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from asgiref.testing import ApplicationCommunicator
from sqlalchemy import Engine, text
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

import sessionmw
from tests.asgi_helpers import Db, build_app, http_scope, open_websocket
from tests.conftest import Tracker, assert_clean, count_rows, user_names
from tests.models import Note, User

pytestmark = pytest.mark.anyio


def client(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def clean(db: Db) -> None:
    assert_clean(db.session, db.pool_engine, db.tracker)


async def test_untouched_request_creates_no_session(db: Db) -> None:
    async with client(build_app(db)) as c:
        assert (await c.get("/untouched")).text == "ok"
    assert db.tracker.created == []
    clean(db)


async def test_each_request_has_its_own_session_and_state_db_is_the_proxy(db: Db) -> None:
    app = build_app(db)
    async with client(app) as c:
        for _ in range(3):
            assert (await c.get("/read")).status_code == 200
    tokens = [token for token, _, _ in app.state.seen]
    sessions = [session for _, session, _ in app.state.seen]
    assert len(set(tokens)) == len({id(s) for s in sessions}) == 3
    assert all(token.kind == "http" for token in tokens)
    assert all(proxy is db.session for _, _, proxy in app.state.seen)
    clean(db)


@pytest.mark.parametrize(
    ("commit", "query", "status", "kept"),
    [
        ("manual", "", 201, False),
        ("on_success", "", 201, True),
        ("on_success", "?status=302", 302, True),
        ("on_success", "?veto=1", 201, False),
        ("on_success", "?status=404", 404, False),
        ("on_success", "?status=422", 422, False),
        (lambda status: status == 201, "", 201, True),
        (lambda status: status == 201, "?status=200", 200, False),
        (lambda status: status < 500, "?status=409", 409, True),
    ],
)
async def test_commit_policy(db: Db, commit: Any, query: str, status: int, kept: bool) -> None:
    async with client(build_app(db, commit=commit)) as c:
        assert (await c.post(f"/write/ann{query}")).status_code == status
    assert user_names(db.engine) == ({"ann"} if kept else set())
    clean(db)


async def test_on_success_commits_raw_sql(db: Db) -> None:
    async with client(build_app(db)) as c:
        assert (await c.post("/raw/raw")).status_code == 200
    assert user_names(db.engine) == {"raw"}
    clean(db)


async def test_exception_is_a_500_and_rolls_back(db: Db) -> None:
    async with client(build_app(db)) as c:
        assert (await c.post("/crash/lost")).status_code == 500
    assert count_rows(db.engine, User) == 0
    clean(db)


async def test_failed_commit_is_a_500_never_a_201(db: Db, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, "sessionmw"):
        async with client(build_app(db)) as c:
            response = await c.post("/commit-fails/ghost")
    assert response.status_code == 500
    assert "commit failed for POST /commit-fails/ghost" in caplog.text
    assert count_rows(db.engine, User) == count_rows(db.engine, Note) == 0
    clean(db)


async def test_streamed_body_uses_the_requests_session(db: Db) -> None:
    async with client(build_app(db)) as c:
        response = await c.get("/stream?n=20")
    assert response.text.count("chunk") == 20
    assert len(db.tracker.created) == 1
    clean(db)


async def test_background_task_uses_the_requests_session(db: Db) -> None:
    async with client(build_app(db)) as c:
        assert (await c.post("/background/later")).status_code == 202
    assert user_names(db.engine) == {"later"}
    assert len(db.tracker.created) == 1
    clean(db)


async def test_app_that_never_responds(db: Db) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await db.add_user("nobody")

    mw = sessionmw.ASGISessionMiddleware(app, session=db.session, commit="on_success")
    await mw(http_scope(), _no_body, _discard)
    assert count_rows(db.engine, User) == 0
    clean(db)


# -- disconnects and cancellation --------------------------------------------------


async def _no_body() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _discard(message: Any) -> None:
    pass


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
async def test_client_disconnect_mid_stream(db: Db, spec_version: str) -> None:
    """2.3: Starlette hears http.disconnect and cancels; 2.4: send raises OSError."""
    app = build_app(db)
    sent: list[Any] = []
    gone = anyio.Event()
    requested: list[bool] = []

    async def receive() -> dict[str, Any]:
        if not requested:
            requested.append(True)
            return await _no_body()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)
        if len(sent) >= 4:
            gone.set()
            if spec_version == "2.4":
                raise OSError("client went away")

    scope = http_scope(
        "/stream", query_string=b"n=100000", asgi={"version": "3.0", "spec_version": spec_version}
    )
    with anyio.fail_after(10):
        if spec_version == "2.4":
            with pytest.raises(ClientDisconnect):
                await app(scope, receive, send)
        else:
            await app(scope, receive, send)
    assert 4 <= len(sent) < 100
    clean(db)


async def test_native_task_cancellation_mid_stream_still_cleans_up(db: Db) -> None:
    app = build_app(db)
    streaming = anyio.Event()

    async def send(message: Any) -> None:
        if message["type"] == "http.response.body":
            streaming.set()

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(3600)
        raise AssertionError

    scope = http_scope(
        "/stream", query_string=b"n=100000", asgi={"version": "3.0", "spec_version": "2.4"}
    )
    task = asyncio.ensure_future(app(scope, receive, send))
    await streaming.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    clean(db)


async def test_cancel_scope_cancellation_while_the_handler_waits(db: Db) -> None:
    app = build_app(db)
    with anyio.move_on_after(0.2) as scope:
        await app(http_scope("/slow/cancelled", method="POST"), _no_body, _discard)
    assert scope.cancelled_caught
    assert count_rows(db.engine, User) == 0
    clean(db)


async def test_cancellation_during_close_is_held_until_close_completes(
    AsyncSession: Any, async_engine: Any, tracker: Tracker
) -> None:
    """The close of an AsyncSession is shielded: cancel it half-way, it still finishes."""
    closing = anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await AsyncSession.execute(text("select 1"))

    mw = sessionmw.ASGISessionMiddleware(app, session=AsyncSession)
    original_close = AsyncSession.registry.createfunc

    def factory() -> Any:
        session = original_close()
        real_close = session.close

        async def slow_close() -> None:
            closing.set()
            await asyncio.sleep(0.1)
            await real_close()

        session.close = slow_close
        return session

    AsyncSession.registry.createfunc = factory
    task = asyncio.ensure_future(mw(http_scope(), _no_body, _discard))
    await closing.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_clean(AsyncSession, async_engine.sync_engine, tracker)


# -- websockets, child scopes, several databases ----------------------------------


async def test_websocket_gets_one_scope_and_a_child_per_message(db: Db) -> None:
    app = build_app(db)
    comm = await open_websocket(app)
    for name in ("one", "two", "three"):
        await comm.send_input({"type": "websocket.receive", "text": name})
        assert (await comm.receive_output(5))["text"] == name
    await comm.send_input({"type": "websocket.disconnect", "code": 1000})
    await comm.wait(5)
    assert user_names(db.engine) == {"one", "two", "three"}
    assert len(db.tracker.created) == 4  # the connection's and one per message
    clean(db)


async def test_gathered_children_in_a_request_each_get_a_session(db: Db) -> None:
    seen: list[Any] = []

    async def endpoint(request: Request) -> Response:
        parent = db.current()

        async def child(n: int) -> None:
            async with sessionmw.request_scope(db.session):
                await db.execute(text("select 1"))
                await asyncio.sleep(0)
                seen.append(db.current())

        await asyncio.gather(*(child(n) for n in range(4)))
        assert db.current() is parent
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[Route("/", endpoint)],
        middleware=[Middleware(sessionmw.ASGISessionMiddleware, session=db.session)],
    )
    async with client(app) as c:
        assert (await c.get("/")).status_code == 200
    assert len({id(s) for s in seen}) == 4
    assert len(db.tracker.created) == 5
    clean(db)


async def test_stacked_middlewares_share_one_token(
    Session: Any, AsyncSession: Any, engine: Engine, async_engine: Any, tracker: Tracker
) -> None:
    tokens: list[Any] = []

    async def endpoint(request: Request) -> Response:
        request.state.db.add(User(name="sync"))
        request.state.adb.add(User(name="async"))
        await request.state.adb.flush()
        tokens.extend([*Session.registry.registry, *AsyncSession.registry.registry])
        return JSONResponse({})

    app = Starlette(
        routes=[Route("/", endpoint)],
        middleware=[
            Middleware(sessionmw.ASGISessionMiddleware, session=Session, commit="on_success"),
            Middleware(
                sessionmw.ASGISessionMiddleware,
                session=AsyncSession,
                commit="on_success",
                state_key="adb",
            ),
        ],
    )
    async with client(app) as c:
        assert (await c.get("/")).status_code == 200
    assert len(tokens) == 2
    assert tokens[0] is tokens[1]
    # SQLite allows one writer: the async session committed first, so only the sync one
    # could have conflicted; both rows are in.
    assert user_names(engine) == {"sync", "async"}
    assert_clean(Session, engine, tracker)
    assert_clean(AsyncSession, async_engine.sync_engine)


# -- raw ASGI: pass-through, state, spec ---------------------------------------------


async def test_lifespan_and_unlisted_scope_types_pass_through_untouched(Session: Any) -> None:
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope, sessionmw.scope._current.get()))
        if scope["type"] == "lifespan":
            message = await receive()
            assert message["type"] == "lifespan.startup"
            await send({"type": "lifespan.startup.complete"})

    mw = sessionmw.ASGISessionMiddleware(app, session=Session, scope_types=("http",))
    lifespan = {"type": "lifespan", "asgi": {"version": "3.0"}}
    comm = ApplicationCommunicator(mw, lifespan)
    await comm.send_input({"type": "lifespan.startup"})
    assert await comm.receive_output(5) == {"type": "lifespan.startup.complete"}
    await comm.wait(5)
    ws = {"type": "websocket", "path": "/"}
    await mw(ws, _no_body, _discard)  # type: ignore[arg-type]
    assert seen == [(lifespan, None), (ws, None)]
    assert "state" not in lifespan
    assert "state" not in ws


async def test_state_is_created_or_extended_and_messages_are_forwarded_unchanged(
    Session: Any,
) -> None:
    start = {"type": "http.response.start", "status": 200, "headers": [(b"x-a", b"1")]}
    body = {"type": "http.response.body", "body": b"hello", "more_body": False}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert scope["state"]["db"] is Session
        assert await receive() == {"type": "http.request", "body": b"in", "more_body": False}
        await send(start)
        await send(body)

    mw = sessionmw.ASGISessionMiddleware(app, session=Session)
    for scope in (http_scope(), http_scope(state={"lifespan": "kept"})):
        comm = ApplicationCommunicator(mw, scope)
        await comm.send_input({"type": "http.request", "body": b"in", "more_body": False})
        assert await comm.receive_output(5) is start
        assert await comm.receive_output(5) is body
        await comm.wait(5)
    assert scope["state"] == {"lifespan": "kept", "db": Session}


async def test_bad_options_name_the_fix(Session: Any) -> None:
    with pytest.raises(ValueError, match="scope_types"):
        sessionmw.ASGISessionMiddleware(_discard, session=Session, scope_types=("lifespan",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="on_success"):
        sessionmw.ASGISessionMiddleware(_discard, session=Session, commit="yes")  # type: ignore[arg-type]


# -- sync endpoints in the thread pool -------------------------------------------------


async def test_sync_endpoint_in_the_threadpool_sees_the_requests_session(
    Session: Any, engine: Engine, tracker: Tracker
) -> None:
    seen: list[Any] = []

    def endpoint(request: Request) -> Response:
        seen.append(("endpoint", Session(), request.state.db()))
        Session.add(User(name="from a thread"))
        return PlainTextResponse("ok", status_code=201)

    async def outer(scope: Any, receive: Any, send: Any) -> None:
        seen.append(("before", Session(), None))
        await app_inner(scope, receive, send)

    app_inner = Starlette(routes=[Route("/", endpoint, methods=["POST"])])
    mw = sessionmw.ASGISessionMiddleware(outer, session=Session, commit="on_success")
    async with client(mw) as c:
        assert (await c.post("/")).status_code == 201
    assert seen[0][1] is seen[1][1] is seen[1][2]
    assert user_names(engine) == {"from a thread"}
    assert_clean(Session, engine, tracker)


async def test_100_concurrent_sync_endpoints_on_a_pool_of_15_do_not_deadlock(
    Session: Any, engine: Engine, tracker: Tracker
) -> None:
    """More requests in flight than anyio's 40 threads plus the pool: all must succeed."""

    def endpoint(request: Request) -> Response:
        Session.add(User(name=request.path_params["name"]))
        Session.flush()
        return PlainTextResponse("ok", status_code=201)

    app = Starlette(
        routes=[Route("/{name}", endpoint, methods=["POST"])],
        middleware=[
            Middleware(sessionmw.ASGISessionMiddleware, session=Session, commit="on_success")
        ],
    )
    async with client(app) as c:
        with anyio.fail_after(60):
            responses = await asyncio.gather(*(c.post(f"/u{n}") for n in range(100)))
    assert [r.status_code for r in responses] == [201] * 100
    assert count_rows(engine, User) == 100
    assert_clean(Session, engine, tracker)


async def _lines(response: httpx.Response) -> AsyncIterator[str]:
    async for line in response.aiter_lines():
        yield line


async def test_debug_log_has_open_commit_and_remove(
    db: Db, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, "sessionmw"):
        async with client(build_app(db)) as c:
            assert (await c.post("/write/logged")).status_code == 201
    messages = [r.getMessage() for r in caplog.records if r.name == "sessionmw"]
    assert messages[:2] == ["open POST /write/logged", "commit POST /write/logged"]
    assert messages[2].startswith("remove POST /write/logged (status 201) after ")
