"""Work that outlives its request never gets a Session (docs/lifecycle.md, rule 5).

A task, a thread or an executor started by a handler carries the request's token.
Once the middleware has removed the request's sessions, the token opens none: the
work gets ``NoRequestScopeError`` and opens its own scope with ``request_scope``.
Before this rule the scoped_session built a new Session keyed by the dead token, and
nothing ever removed it: one Session and one pooled connection lost per such task.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select, text
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import sessionmw
from tests.asgi_helpers import Db
from tests.conftest import Tracker, assert_clean, user_names
from tests.models import User
from tests.wsgi_helpers import Server

pytestmark = pytest.mark.anyio


def client(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def starlette_app(db: Db, endpoint: Callable[[Request], Any]) -> Starlette:
    return Starlette(
        routes=[Route("/", endpoint)],
        middleware=[Middleware(sessionmw.ASGISessionMiddleware, session=db.session)],
    )


async def test_a_task_that_outlives_its_request_gets_no_session(db: Db) -> None:
    """``asyncio.create_task`` in a handler, still running after the response."""
    response_sent = asyncio.Event()
    late: list[asyncio.Task[None]] = []

    async def late_work() -> None:
        await response_sent.wait()
        await db.execute(text("select 1"))

    async def endpoint(request: Request) -> Response:
        await db.execute(text("select 1"))
        late.append(asyncio.create_task(late_work()))
        return PlainTextResponse("ok")

    async with client(starlette_app(db, endpoint)) as c:
        assert (await c.get("/")).status_code == 200
    response_sent.set()
    with pytest.raises(sessionmw.NoRequestScopeError, match="has ended"):
        await late[0]
    assert len(db.tracker.created) == 1  # the request's own, and no other
    assert_clean(db.session, db.pool_engine, db.tracker)


async def test_a_thread_that_outlives_its_request_gets_no_session(
    Session: Any, engine: Engine, tracker: Tracker
) -> None:
    """``asyncio.to_thread`` (which copies the context) running past the response."""
    response_sent = threading.Event()
    late: list[asyncio.Future[Any]] = []

    def late_work() -> Any:
        response_sent.wait(10)
        return Session.execute(text("select 1")).scalar()

    async def endpoint(request: Request) -> Response:
        late.append(asyncio.ensure_future(asyncio.to_thread(late_work)))
        return PlainTextResponse("ok")

    db = Db("sync", Session, engine, tracker)
    async with client(starlette_app(db, endpoint)) as c:
        assert (await c.get("/")).status_code == 200
    response_sent.set()
    with pytest.raises(sessionmw.NoRequestScopeError, match="request_scope"):
        await late[0]
    assert tracker.created == []
    assert_clean(Session, engine, tracker)


def test_wsgi_work_in_a_copied_context_after_the_response(
    Session: Any, engine: Engine, tracker: Tracker
) -> None:
    """A WSGI handler hands work to an executor with its context (as
    ``loop.run_in_executor`` or ``copy_context().run`` do); it runs after the response."""
    contexts: list[contextvars.Context] = []

    def app(environ: Any, start_response: Any) -> list[bytes]:
        Session.execute(text("select 1"))
        contexts.append(contextvars.copy_context())
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    status, _ = Server().get(sessionmw.WSGISessionMiddleware(app, Session))
    assert status == "200 OK"
    outcome: list[BaseException] = []

    def late_work() -> None:
        try:
            Session.execute(text("select 1"))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=contexts[0].run, args=(late_work,))
    thread.start()
    thread.join(10)
    assert [type(e) for e in outcome] == [sessionmw.NoRequestScopeError]
    assert len(tracker.created) == 1
    assert_clean(Session, engine, tracker)


def test_wsgi_streamed_body_iterated_after_close_gets_no_session(
    Session: Any, engine: Engine, tracker: Tracker
) -> None:
    """A server that goes on pulling a body generator in a worker thread after the
    client left (Litestar does so with sync streams) may not open a Session."""
    contexts: list[contextvars.Context] = []

    def chunks() -> Iterator[bytes]:
        contexts.append(contextvars.copy_context())
        Session.execute(text("select 1"))
        yield b"first"

    def app(environ: Any, start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [])
        return chunks()

    body = Server().call(sessionmw.WSGISessionMiddleware(app, Session))
    assert next(iter(body)) == b"first"
    body.close()  # type: ignore[attr-defined]  # the client went away
    with pytest.raises(sessionmw.NoRequestScopeError):
        contexts[0].run(Session)
    assert_clean(Session, engine, tracker)


async def test_late_work_opens_its_own_scope_with_request_scope(db: Db) -> None:
    """The fix the error names: ``request_scope`` gives the late work a Session of its
    own, removed when the block ends, and its commit is kept."""
    response_sent = asyncio.Event()
    late: list[asyncio.Task[None]] = []

    async def late_work() -> None:
        await response_sent.wait()
        async with sessionmw.request_scope(db.session):
            await db.save_user("written after the response")

    async def endpoint(request: Request) -> Response:
        await db.execute(text("select 1"))
        late.append(asyncio.create_task(late_work()))
        return PlainTextResponse("ok")

    async with client(starlette_app(db, endpoint)) as c:
        assert (await c.get("/")).status_code == 200
    response_sent.set()
    await late[0]
    assert user_names(db.engine) == {"written after the response"}
    assert len(db.tracker.created) == 2
    assert_clean(db.session, db.pool_engine, db.tracker)


def test_request_scope_ends_its_token_too(Session: Any, engine: Engine) -> None:
    with sessionmw.request_scope(Session) as scope:
        Session.execute(select(User))
        context = contextvars.copy_context()
    assert scope.ended
    with pytest.raises(sessionmw.NoRequestScopeError, match="has ended"):
        context.run(Session)
    assert_clean(Session, engine)


def test_registry_refuses_a_session_stored_after_its_scope_ended(Session: Any) -> None:
    """A thread that passed ``current_request()`` just before its request ended stores
    its new Session just after the middleware emptied the registry: refused."""
    scope = sessionmw.RequestScope("script")
    scope.ended = True
    with pytest.raises(sessionmw.NoRequestScopeError):
        Session.registry.registry.setdefault(scope, object())
    with pytest.raises(sessionmw.NoRequestScopeError):
        Session.registry.registry[scope] = object()
    assert Session.registry.registry == {}
