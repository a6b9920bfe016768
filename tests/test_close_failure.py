"""A Session whose close fails once its response has gone out.

Closing a request's Session returns its connection, which rolls back what is left; when
the database went away in between (a restart, a failover, a replica stopped, a killed
backend) that rollback fails.  What the request saved was decided before, and the
database drops an open transaction with its connection anyway, so the response stands.
The failure is logged, the Session forgotten and its connection given back; it never
reaches the server, which would drop the kept-alive connection (uvicorn, gunicorn) and
with it the client's next request sent on it.

Each stack runs in a process of its own (``tests/close_failure_apps.py``), as in
production.  In process: a WSGI list body (removed before the server sends it) keeps its
status; with no worker thread left the Sessions are still closed; and an interrupt met
while removing still reaches the server after an earlier close failed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

import sessionmw
from tests import close_failure_apps
from tests.servers import answering, free_port, wait_until

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
UVICORN = "-m uvicorn --factory tests.close_failure_apps:{app} --timeout-keep-alive 75"
GUNICORN = "-m gunicorn -w 1 -k gthread --threads 4 --keep-alive 75 tests.close_failure_apps:{app}"
STACKS = {
    "uvicorn-sync": UVICORN.format(app="starlette_sync_app") + " --host 127.0.0.1 --port {port}",
    "uvicorn-async": UVICORN.format(app="starlette_async_app") + " --host 127.0.0.1 --port {port}",
    "gunicorn-flask": GUNICORN.format(app="flask_app()") + " -b 127.0.0.1:{port}",
}
#: What each server logs when an application's failure reaches it.
SERVER_ERRORS = ("Exception in ASGI application", "Error handling request")


@contextmanager
def serve(stack: str, url: str, log: Path) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, *STACKS[stack].format(port=port).split()]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=out)
    with answering(process, f"http://127.0.0.1:{port}", log) as base:
        yield base


@pytest.mark.parametrize("stack", list(STACKS))
def test_a_close_that_fails_after_the_response_keeps_the_connection(
    stack: str, pg_url: str, tmp_path: Path
) -> None:
    log = tmp_path / "server.log"
    with serve(stack, pg_url, log) as base:
        with httpx.Client(base_url=base, timeout=30) as client:
            first = client.get("/lose")
            assert first.status_code == 200
            wait_until(
                lambda: "closing the session of GET /lose failed" in log.read_text(),
                what="the failed close to be logged",
            )
            second = client.get("/port")  # on the same kept-alive connection
            assert (second.status_code, second.json()) == (200, first.json())
            third = client.get("/lose")  # the pool gives a live connection, not the dead one
            assert third.status_code == 200

        def drained() -> bool:
            return httpx.get(f"{base}/_state").json() == {"registry": 0, "checkedout": 0}

        wait_until(drained, what="the registry and the pool to drain")
    text = log.read_text()
    assert text.count("closing the session of GET /lose failed") == 2, text
    assert not [line for line in SERVER_ERRORS if line in text], text


def test_a_close_that_fails_does_not_turn_a_finished_list_response_into_a_500(
    pg_url: str,
) -> None:
    """A WSGI app that returns a list: its Session is removed before the server sends it,
    and a close that fails there still leaves the app's answer as it was."""
    admin = close_failure_apps._admin(pg_url)
    engine = create_engine(pg_url)
    Session = sessionmw.request_scoped(sessionmaker(bind=engine))

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        close_failure_apps.terminate(admin, Session.execute(close_failure_apps.PID).scalar_one())
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"read"]

    transport = httpx.WSGITransport(app=sessionmw.WSGISessionMiddleware(app, Session))
    with httpx.Client(transport=transport, base_url="http://testserver") as client:
        response = client.get("/")
    assert (response.status_code, response.text) == (200, "read")
    assert Session.registry.registry == {}
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    engine.dispose()
    admin.dispose()


def test_sessions_are_closed_when_no_worker_thread_can_take_them(
    pg_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker threads are gone (their executor is shut down, as at interpreter exit):
    the failure is logged, and the request's Sessions are closed on the loop instead of
    being left in the registry for good."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from sessionmw import offload

    engine = create_engine(pg_url)
    Session = sessionmw.request_scoped(sessionmaker(bind=engine))

    def read(request: Request) -> PlainTextResponse:
        Session.execute(close_failure_apps.PID)
        return PlainTextResponse("read")

    app = Starlette(routes=[Route("/", read)])
    app.add_middleware(sessionmw.ASGISessionMiddleware, session=Session)
    gone = ThreadPoolExecutor(1)
    gone.shutdown()
    monkeypatch.setattr(offload, "_executor", lambda: gone)

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get("/")

    response = asyncio.run(get())
    assert (response.status_code, response.text) == (200, "read")
    assert "removing the sessions of GET / failed" in caplog.text
    assert Session.registry.registry == {}
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    engine.dispose()


def test_an_interrupt_while_removing_is_raised_even_after_a_failed_close(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two databases: the first Session's close fails (logged), the second's is
    interrupted; the interrupt still reaches the server, and both are removed."""
    from sqlalchemy import text
    from sqlalchemy.orm import Session as OrmSession

    class FailingClose(OrmSession):
        def close(self) -> None:
            super().close()
            raise RuntimeError("the close failed")

    class InterruptedClose(OrmSession):
        def close(self) -> None:
            super().close()
            raise KeyboardInterrupt

    engines = [create_engine(f"sqlite:///{tmp_path}/{n}.db") for n in ("a", "b")]
    first = sessionmw.request_scoped(sessionmaker(bind=engines[0], class_=FailingClose))
    second = sessionmw.request_scoped(sessionmaker(bind=engines[1], class_=InterruptedClose))

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        first.execute(text("select 1"))
        second.execute(text("select 1"))
        start_response("200 OK", [])
        return [b"read"]

    inner = sessionmw.WSGISessionMiddleware(app, second, environ_key="second")
    outer = sessionmw.WSGISessionMiddleware(inner, first)
    with pytest.raises(KeyboardInterrupt):
        outer({"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, lambda *args: None)
    assert "closing the session of GET / failed" in caplog.text
    assert first.registry.registry == {}
    assert second.registry.registry == {}
    assert [engine.pool.checkedout() for engine in engines] == [0, 0]  # type: ignore[attr-defined]
