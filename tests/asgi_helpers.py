"""One Starlette test app, run with a sync or an async scoped_session, and a raw ASGI driver."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.to_thread
from asgiref.testing import ApplicationCommunicator
from sqlalchemy import Engine, insert, text
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

import sessionmw
from tests.conftest import Tracker
from tests.models import Note, User


class Db:
    """The same handful of operations on a sync or an async scoped_session.

    Sync work runs in a worker thread, as Starlette runs a plain ``def`` endpoint:
    blocking the event loop on a database lock would stall every other request.
    """

    def __init__(
        self,
        kind: str,
        session: Any,
        engine: Engine,
        tracker: Tracker,
        pool_engine: Engine | None = None,
    ) -> None:
        self.kind = kind
        self.session = session
        self.engine = engine  # for reading rows back
        self.pool_engine = pool_engine or engine  # whose pool the session draws from
        self.tracker = tracker

    @property
    def is_async(self) -> bool:
        return self.kind == "async"

    async def run(self, method: str, *args: Any) -> Any:
        if self.is_async:
            return await getattr(self.session, method)(*args)
        return await anyio.to_thread.run_sync(getattr(self.session, method), *args)

    async def execute(self, statement: Any) -> Any:
        return await self.run("execute", statement)

    async def add_user(self, name: str) -> None:
        self.session.add(User(name=name))
        await self.run("flush")

    async def commit(self) -> None:
        await self.run("commit")

    async def save_user(self, name: str) -> None:
        """Add and commit in one step: on SQLite a sync writer holds the one write lock
        from its INSERT to its COMMIT, so both run in a single worker-thread hop; a second
        hop could wait behind writers that wait for that very lock."""
        self.session.add(User(name=name))
        await self.run("commit")

    def current(self) -> Any:
        """The request's Session object (the sync one, for an AsyncSession)."""
        session = self.session()
        return session.sync_session if self.is_async else session


def build_app(db: Db, commit: Any = "on_success", **options: Any) -> Starlette:
    seen: list[Any] = []

    async def untouched(request: Request) -> Response:
        assert db.pool_engine.pool.checkedout() == 0
        return PlainTextResponse("ok")

    async def read(request: Request) -> Response:
        await db.execute(text("select 1"))
        seen.append((sessionmw.current_request(), db.current(), request.state.db))
        return PlainTextResponse("read")

    async def write(request: Request) -> Response:
        await db.add_user(request.path_params["name"])
        if "veto" in request.query_params:
            sessionmw.set_rollback()
        status = int(request.query_params.get("status", 201))
        return PlainTextResponse("written", status_code=status)

    async def raw_write(request: Request) -> Response:
        await db.execute(insert(User).values(name=request.path_params["name"]))
        return PlainTextResponse("written")

    async def crash(request: Request) -> Response:
        await db.add_user(request.path_params["name"])
        raise RuntimeError("crash after writing")

    async def commit_fails(request: Request) -> Response:
        await db.add_user(request.path_params["name"])
        db.session.add(Note(user_id=10**6, body="dangling: fails at COMMIT"))
        await db.run("flush")
        return PlainTextResponse("created", status_code=201)

    async def stream(request: Request) -> Response:
        count = int(request.query_params.get("n", 5))
        session = db.current()

        async def chunks() -> AsyncIterator[bytes]:
            for n in range(count):
                await db.execute(text("select 1"))
                assert db.current() is session
                yield f"chunk {n}\n".encode()
                await asyncio.sleep(0.001)

        return StreamingResponse(chunks())

    async def background(request: Request) -> Response:
        name = request.path_params["name"]
        session = db.current()

        async def task() -> None:
            assert db.current() is session
            await db.save_user(name)

        return PlainTextResponse("accepted", status_code=202, background=BackgroundTask(task))

    async def slow(request: Request) -> Response:
        if "read" in request.query_params:
            await db.execute(text("select 1"))
        else:
            await db.add_user(request.path_params["name"])
        await asyncio.sleep(float(request.query_params.get("seconds", 5)))
        return PlainTextResponse("slow")

    async def websocket(ws: WebSocket) -> None:
        await ws.accept()
        connection_session = db.current()
        try:
            while True:
                name = await ws.receive_text()
                async with sessionmw.request_scope(db.session):
                    assert db.current() is not connection_session
                    await db.save_user(name)
                await ws.send_text(name)
        except WebSocketDisconnect:
            pass

    app = Starlette(
        routes=[
            Route("/untouched", untouched),
            Route("/read", read),
            Route("/write/{name}", write, methods=["POST"]),
            Route("/raw/{name}", raw_write, methods=["POST"]),
            Route("/crash/{name}", crash, methods=["POST"]),
            Route("/commit-fails/{name}", commit_fails, methods=["POST"]),
            Route("/stream", stream),
            Route("/background/{name}", background, methods=["POST"]),
            Route("/slow/{name}", slow, methods=["POST"]),
            WebSocketRoute("/ws", websocket),
        ],
        middleware=[
            Middleware(
                sessionmw.ASGISessionMiddleware, session=db.session, commit=commit, **options
            )
        ],
    )
    app.state.seen = seen
    return app


def http_scope(path: str = "/", method: str = "GET", **extra: Any) -> dict[str, Any]:
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }
    scope.update(extra)
    return scope


async def open_websocket(app: Any, path: str = "/ws") -> ApplicationCommunicator:
    """Connect to ``app``'s websocket at ``path`` and check that it accepted."""
    scope = {
        "type": "websocket",
        "path": path,
        "headers": [],
        "query_string": b"",
        "asgi": {"version": "3.0"},
        "subprotocols": [],
    }
    comm = ApplicationCommunicator(app, scope)
    await comm.send_input({"type": "websocket.connect"})
    assert (await comm.receive_output(5))["type"] == "websocket.accept"
    return comm
