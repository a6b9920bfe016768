"""Bad input through real servers: the middleware removes the session, leaks nothing, and
answers exactly as the app alone would (compared against the same app without it)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from examples import flask_app as flask_example
from examples import starlette_app as starlette_example
from tests.asgi_helpers import open_websocket
from tests.servers import uvicorn_server, wait_until, werkzeug_server

HUGE = b"x" * (8 * 1024 * 1024)


def raw_request(base: str, request_line: bytes) -> int:
    """Send bytes no HTTP client would (a non-UTF-8 path); return the status code."""
    url = urlsplit(base)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(request_line + b"\r\nHost: test\r\nConnection: close\r\n\r\n")
        reply = b""
        while b"\r\n" not in reply:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    return int(reply.split(b" ", 2)[1])


def answers(base: str, prefix: str) -> dict[str, int]:
    with httpx.Client(base_url=base, timeout=30) as client:
        return {
            "malformed json": client.post(prefix, content=b'{"name": ').status_code,
            "not an object": client.post(prefix, json=[1, 2]).status_code,
            "huge body": client.post(prefix, content=HUGE).status_code,
            "unrouted method": client.request("PUT", prefix).status_code,
            "unknown path": client.get(prefix + "/\u2603/x").status_code,
            "non-utf-8 path": raw_request(
                base, f"GET {prefix}/\xff\xfe HTTP/1.1".encode("latin-1")
            ),
        }


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'bad.db'}"


def test_wsgi_bad_input(sqlite_url: str) -> None:
    app = flask_example.create_app(sqlite_url)
    Session, engine = flask_example.Session, app.config["ENGINE"]
    with werkzeug_server(app) as base:
        with_middleware = answers(base, "/authors")
        wait_until(lambda: Session.registry.registry == {}, what="sessions removed")
    app.wsgi_app = app.wsgi_app.app  # type: ignore[attr-defined,method-assign]  # the bare app
    with werkzeug_server(app) as base:
        alone = answers(base, "/authors")
    assert with_middleware == alone
    assert with_middleware["malformed json"] == 400
    assert with_middleware["unrouted method"] == 405
    assert engine.pool.checkedout() == 0
    engine.dispose()


def test_asgi_bad_input(sqlite_url: str) -> None:
    app = starlette_example.create_app(sqlite_url)
    with uvicorn_server(app, on_stop=app.state.async_engine.dispose) as base:
        with_middleware = answers(base, "/notes")
        registries = (
            starlette_example.Session.registry.registry,
            starlette_example.AsyncSession.registry.registry,
        )
        wait_until(lambda: registries == ({}, {}), what="sessions removed")
        assert app.state.engine.pool.checkedout() == 0
    bare = starlette_example.create_app(sqlite_url)
    bare.user_middleware.clear()  # the same routes, no sessionmw
    with uvicorn_server(bare) as base:
        alone = answers(base, "/notes")
    assert with_middleware == alone
    assert with_middleware["malformed json"] == 400
    assert with_middleware["unrouted method"] == 405
    app.state.engine.dispose()


@pytest.mark.anyio
async def test_websocket_frames_after_close(sqlite_url: str) -> None:
    app = starlette_example.create_app(sqlite_url)
    comm = await open_websocket(app)
    await comm.send_input({"type": "websocket.receive", "text": "kept"})
    assert (await comm.receive_output(5))["text"] == "kept"
    await comm.send_input({"type": "websocket.disconnect", "code": 1001})
    for late in ("after", "close"):
        await comm.send_input({"type": "websocket.receive", "text": late})
    await comm.wait(5)
    assert starlette_example.AsyncSession.registry.registry == {}
    assert starlette_example.Session.registry.registry == {}
    assert app.state.async_engine.sync_engine.pool.checkedout() == 0
    with app.state.engine.connect() as conn:
        rows: list[Any] = list(conn.exec_driver_sql("select text from messages"))
    assert [r[0] for r in rows] == ["kept"]
    await app.state.async_engine.dispose()
    app.state.engine.dispose()
