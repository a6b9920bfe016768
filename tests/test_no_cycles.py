"""A served request leaves nothing for the cycle collector: reference counting frees it.

A cycle between a request's token and its unit of work kept both alive after the
request, and with them all they reach: the ASGI scope with the framework's state (three
of FastAPI's ``AsyncExitStack`` per request), or the WSGI environ. Fourteen objects per
request waited for the collector instead of being freed when the request ended. With the
collector off, nothing of a finished request may stay.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from werkzeug.test import Client
from werkzeug.wrappers import Request as WsgiRequest
from werkzeug.wrappers import Response as WsgiResponse

import sessionmw
from sessionmw.scope import RequestScope
from sessionmw.unit import UnitOfWork

REQUESTS = 20


@pytest.fixture
def engine(tmp_path: Any) -> Iterator[Engine]:
    created = create_engine(f"sqlite:///{tmp_path / 'cycles.db'}")
    yield created
    created.dispose()


def left_behind() -> list[object]:
    return [o for o in gc.get_objects() if isinstance(o, (RequestScope, UnitOfWork))]


def without_collector(serve: Any) -> list[object]:
    """What is left of ``serve()``'s requests once it returns, the collector kept off.

    A thread pool's worker drops its last reference to a request's context only after it
    handed the endpoint's result back, so on a busy machine that may come just after
    ``serve()`` returned: what reference counting frees within two seconds is not left
    behind, while an object in a cycle stays for good.
    """
    gc.collect()
    gc.disable()
    try:
        serve()
        deadline = time.monotonic() + 2.0
        while (left := left_behind()) and time.monotonic() < deadline:
            del left
            time.sleep(0.01)
        return left_behind()
    finally:
        gc.enable()


async def get(app: Any, path: str = "/") -> int:
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": [(b"host", b"t")], "client": ("127.0.0.1", 1),
        "server": ("t", 80), "state": {},
    }  # fmt: skip
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(scope, receive, send)
    return statuses[0]


@pytest.mark.parametrize("commit", ["manual", "on_success"])
def test_asgi_sync_sessions(engine: Engine, commit: Any) -> None:
    Session = sessionmw.request_scoped(sessionmaker(bind=engine))

    def read(request: Request) -> Response:
        Session.execute(text("select 1"))
        return PlainTextResponse("ok")

    app = sessionmw.ASGISessionMiddleware(
        Starlette(routes=[Route("/", read)]), session=Session, commit=commit
    )

    async def serve() -> None:
        for _ in range(REQUESTS):
            assert await get(app) == 200

    assert without_collector(lambda: asyncio.run(serve())) == []


def test_asgi_async_sessions(tmp_path: Any) -> None:
    async_engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'cycles.db'}")
    Session = sessionmw.request_scoped(async_sessionmaker(async_engine))

    async def read(request: Request) -> Response:
        await Session.execute(text("select 1"))
        return PlainTextResponse("ok")

    app = sessionmw.ASGISessionMiddleware(
        Starlette(routes=[Route("/", read)]), session=Session, commit="on_success"
    )

    async def serve() -> None:
        for _ in range(REQUESTS):
            assert await get(app) == 200

    loop = asyncio.new_event_loop()
    try:
        assert without_collector(lambda: loop.run_until_complete(serve())) == []
        loop.run_until_complete(async_engine.dispose())
    finally:
        loop.close()


@pytest.mark.parametrize("commit", ["manual", "on_success"])
def test_wsgi(engine: Engine, commit: Any) -> None:
    Session = sessionmw.request_scoped(sessionmaker(bind=engine))

    @WsgiRequest.application
    def read(request: WsgiRequest) -> WsgiResponse:
        Session.execute(text("select 1"))
        return WsgiResponse("ok")

    client = Client(sessionmw.WSGISessionMiddleware(read, session=Session, commit=commit))

    def serve() -> None:
        for _ in range(REQUESTS):
            assert client.get("/").status_code == 200

    assert without_collector(serve) == []
