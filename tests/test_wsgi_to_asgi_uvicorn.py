"""Flask behind asgiref's WsgiToAsgi behind the ASGI middleware, served by a real uvicorn.

WsgiToAsgi calls the middleware's ``send`` from the task that asgiref's ``AsyncToSync``
runs on the event loop, and that task's context names the request's
``CurrentThreadExecutor``.  When the response ends, uvicorn, still inside ``send``,
resumes reading the connection and starts a request the client already sent on it;
asyncio keeps the current context for both.  Unless the middleware forwards ``send`` in
the server's own context, the next request on a kept-alive connection starts with an
executor that has quit, and a request that did nothing wrong gets a 500
(``RuntimeError: CurrentThreadExecutor already quit or is broken``).

``/linger`` widens the window the way any streamed body with a ``Content-Length`` does:
the client has the whole body, and sends its next request on the same connection, before
the generator has finished.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from asgiref.wsgi import WsgiToAsgi
from flask import Flask, Response
from sqlalchemy import Engine, text

import sessionmw
from tests.conftest import count_rows
from tests.models import Note, User
from tests.servers import uvicorn_server, wait_until

pytestmark = pytest.mark.slow

CLIENTS = 4  # concurrent clients, one kept-alive connection each
ROUNDS = 3
ROUND = ("linger", "write", "fail", "write", "abandon", "linger", "write")
EXPECTED = {"linger": 200, "write": 201, "fail": 500, "abandon": 200}
CHUNK = b"x" * 65536


def build_app(Session: Any) -> Any:
    flask_app = Flask(__name__)

    @flask_app.post("/write/<name>")
    def write(name: str) -> Any:
        Session.add(User(name=name))
        Session.flush()
        return "written", 201

    @flask_app.post("/fail/<name>")
    def fail(name: str) -> Any:
        Session.add(User(name=name))
        Session.add(Note(user_id=10**6, body="dangling: fails at COMMIT"))
        Session.flush()
        return "created", 201

    @flask_app.get("/linger")
    def linger() -> Any:
        Session.execute(text("select 1"))

        def body() -> Iterator[bytes]:
            yield b"done"
            time.sleep(0.02)  # work after the last byte, which the client already has

        return Response(body(), headers={"Content-Length": "4"})

    @flask_app.get("/stream")
    def stream() -> Any:
        def chunks() -> Iterator[bytes]:
            for _ in range(40):
                Session.execute(text("select 1"))
                yield CHUNK

        return Response(chunks())

    return sessionmw.ASGISessionMiddleware(
        WsgiToAsgi(flask_app), session=Session, commit="on_success"
    )


async def one(client: httpx.AsyncClient, kind: str, name: str) -> int:
    if kind == "linger":
        return (await client.get("/linger")).status_code
    if kind == "abandon":  # the client goes away mid-stream
        async with client.stream("GET", "/stream") as response:
            async for _ in response.aiter_bytes():
                break
        return response.status_code
    return (await client.post(f"/{kind}/{name}")).status_code


async def run_client(base: str, number: int) -> list[tuple[str, int]]:
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    results = []
    async with httpx.AsyncClient(base_url=base, timeout=15, limits=limits) as client:
        for step, kind in enumerate(ROUND * ROUNDS):
            results.append((kind, await one(client, kind, f"c{number}s{step}")))
    return results


async def load(base: str) -> list[tuple[str, int]]:
    per_client = await asyncio.gather(*(run_client(base, n) for n in range(CLIENTS)))
    return [result for results in per_client for result in results]


class ServerErrors(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.messages.append(f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}")


def test_requests_on_a_kept_alive_connection_get_no_500_from_a_stale_executor(
    Session: Any, engine: Engine
) -> None:
    errors = ServerErrors()
    uvicorn_log = logging.getLogger("uvicorn.error")
    with uvicorn_server(build_app(Session)) as base:
        uvicorn_log.addHandler(errors)  # after start: uvicorn configures its loggers then
        try:
            results = asyncio.run(load(base))
            wait_until(lambda: engine.pool.checkedout() == 0, what="connections back in the pool")
        finally:
            uvicorn_log.removeHandler(errors)

    assert len(results) == CLIENTS * ROUNDS * len(ROUND)
    unexpected = [(kind, status) for kind, status in results if status != EXPECTED[kind]]
    stale = [message for message in errors.messages if "CurrentThreadExecutor" in message]
    assert unexpected == [], f"{len(unexpected)} unexpected statuses; server errors: {stale}"
    assert stale == []
    written = sum(1 for kind, status in results if kind == "write" and status == 201)
    assert written == CLIENTS * ROUNDS * ROUND.count("write")
    assert count_rows(engine, User) == written
    assert count_rows(engine, Note) == 0
    assert Session.registry.registry == {}
    assert engine.pool.checkedout() == 0
