"""Request shapes: what a request does with its sessions, as a raw ASGI and WSGI app.

Each shape also says what its rows mean, so the harness can tell a correct outcome
from a broken one after any fault: ``auto`` rows are committed by the middleware's
policy (in the database if and only if a 2xx was sent), ``manual`` rows are committed
by the app before it answers, ``after`` rows by work that runs after the response, and
``callbacks`` rows carry an ``on_commit`` callback that must run exactly when the row
is committed.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

import sessionmw
from sessionmw.offload import wait_out
from tests.faults.probe import actor
from tests.models import User

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
WSGIApp = Callable[[dict[str, Any], Any], Any]


@dataclass
class Run:
    """What one request did, as the app itself saw it."""

    tag: str = ""
    #: Rows whose commit by the app returned.
    confirmed: set[str] = field(default_factory=set)
    #: How often the on_commit callback of each row ran.
    callbacks: Counter[str] = field(default_factory=Counter)
    attempts: int = 0
    #: The app returned normally (a websocket may then commit).
    app_returned: bool = False
    #: The status the app itself answered, and how many steps were recorded once it was
    #: done with the request (returned; for a WSGI iterable, once its body was closed).
    app_status: int | None = None
    done_at: int | None = None
    #: The Session objects the request used, and the rows it saw (isolation checks).
    sessions: list[Any] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)

    def row(self, name: str) -> str:
        return f"{self.tag}{name}"


current_run: ContextVar[Run] = ContextVar("fault_run")


class ClientGone(Exception):  # noqa: N818 - named like Starlette's ClientDisconnect
    """The client left before the request body was read."""


async def in_thread(func: Callable[..., Any], *args: Any) -> Any:
    """Run ``func`` in a worker thread, as Starlette runs a ``def`` endpoint, and wait
    for the thread even when the task is cancelled meanwhile.

    ``anyio.to_thread.run_sync`` alone stops waiting at a plain ``Task.cancel()`` while
    the thread goes on.  The middleware then waits for the thread before it closes the
    Session (``tests/test_fault_regressions.py``); the shapes wait as well, so that what
    a run did (the rows it confirmed) is final when its request returns.
    """
    return await wait_out(asyncio.ensure_future(anyio.to_thread.run_sync(func, *args)))


class Db:
    """One database's request-scoped registry, used the same way by every shape.

    Sync Sessions run in a worker thread under ASGI, and in place under WSGI.
    """

    def __init__(self, scoped: Any, is_async: bool) -> None:
        self.scoped = scoped
        self.is_async = is_async

    def _note(self) -> None:
        run = current_run.get()
        session = self.scoped()
        if session not in run.sessions:
            run.sessions.append(session)

    def _names_now(self) -> set[str]:
        self._note()
        return set(self.scoped.execute(select(User.name)).scalars())

    def _add_now(self, name: str) -> None:
        self._note()
        self.scoped.add(User(name=current_run.get().row(name)))
        self.scoped.flush()

    def _save_now(self, name: str) -> None:
        self._add_now(name)
        self.scoped.commit()
        current_run.get().confirmed.add(name)

    # -- in place (WSGI) ---------------------------------------------------------

    def names_now(self) -> None:
        current_run.get().seen.update(self._names_now())

    def add_now(self, name: str) -> None:
        self._add_now(name)

    def save_now(self, name: str) -> None:
        self._save_now(name)

    # -- awaited (ASGI) ------------------------------------------------------------

    async def names(self) -> None:
        if self.is_async:
            self._note()
            found = set((await self.scoped.execute(select(User.name))).scalars())
        else:
            found = await in_thread(self._names_now)
        current_run.get().seen.update(found)

    async def add(self, name: str) -> None:
        if not self.is_async:
            await in_thread(self._add_now, name)
            return
        self._note()
        self.scoped.add(User(name=current_run.get().row(name)))
        await self.scoped.flush()

    async def save(self, name: str) -> None:
        """Add and commit in one worker-thread hop (SQLite's write lock is held from the
        INSERT to the COMMIT: a second hop could queue behind other writers)."""
        if not self.is_async:
            await in_thread(self._save_now, name)
            return
        await self.add(name)
        await self.scoped.commit()
        current_run.get().confirmed.add(name)


def transient_error() -> OperationalError:
    """What SQLite says when another connection holds the write lock: worth a replay."""
    return OperationalError("-- write", {}, sqlite3.OperationalError("database is locked"))


def count_callback(name: str) -> Callable[[], None]:
    run = current_run.get()

    def ran() -> None:
        run.callbacks[name] += 1

    return ran


# -- ASGI --------------------------------------------------------------------------


async def read_body(receive: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone("the client left before its body was read")
        if not message.get("more_body", False):
            return


async def respond(send: Any, status: int, *chunks: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": []})
    parts = chunks or (b"",)
    for index, chunk in enumerate(parts):
        await send(
            {"type": "http.response.body", "body": chunk, "more_body": index < len(parts) - 1}
        )


def asgi_read(dbs: list[Db]) -> ASGIApp:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await read_body(receive)
        await dbs[0].names()
        await respond(send, 200, b"read")

    return app


def asgi_write(status: int, name: str) -> Callable[[list[Db]], ASGIApp]:
    def build(dbs: list[Db]) -> ASGIApp:
        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            await read_body(receive)
            await dbs[0].add(name)
            await respond(send, status, b"written")

        return app

    return build


def asgi_stream_async(dbs: list[Db]) -> ASGIApp:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await read_body(receive)
        await dbs[0].add("st")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for n in range(2):
            await dbs[0].names()
            await send({"type": "http.response.body", "body": b"%d" % n, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


def asgi_stream_sync(dbs: list[Db]) -> ASGIApp:
    """A sync generator for the body, each chunk made in a worker thread."""

    def chunks() -> Iterator[bytes]:
        for n in range(2):
            dbs[0].names_now()
            yield b"%d" % n

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await read_body(receive)
        await dbs[0].add("ss")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        body = chunks()
        while True:
            chunk = await in_thread(next, body, None)
            if chunk is None:
                break
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


def asgi_abandoned(dbs: list[Db]) -> ASGIApp:
    """The client reads one chunk and leaves; the app stops at the OSError from send."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await read_body(receive)
        await dbs[0].add("ab")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            for n in range(4):
                await dbs[0].names()
                await send({"type": "http.response.body", "body": b"%d" % n, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            return

    return app


def asgi_background(dbs: list[Db]) -> ASGIApp:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await read_body(receive)
        await dbs[0].add("bk")
        await respond(send, 202, b"accepted")
        await dbs[0].save("bg")  # a background task: after the response, same Session

    return app


def asgi_websocket(dbs: list[Db]) -> ASGIApp:
    """One message, written and committed in a child scope; the connection's own
    Session writes when the client leaves, committed if the socket ended normally."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                break
            async with sessionmw.request_scope(dbs[0].scoped):
                await dbs[0].save("wm")
            await send({"type": "websocket.send", "text": "saved"})
        await dbs[0].add("wc")

    return app


def asgi_gather(dbs: list[Db]) -> ASGIApp:
    async def child(name: str) -> None:
        actor.set(name)
        async with sessionmw.request_scope(dbs[0].scoped):
            await dbs[0].save(name)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await read_body(receive)
        await asyncio.gather(child("g1"), child("g2"))
        await dbs[0].add("gp")  # after the children: SQLite has one write lock
        await respond(send, 201, b"gathered")

    return app


def asgi_two_databases(dbs: list[Db]) -> ASGIApp:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await read_body(receive)
        await dbs[0].add("a")
        await dbs[1].add("b")
        await respond(send, 201, b"both")

    return app


def asgi_manual(dbs: list[Db]) -> ASGIApp:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await read_body(receive)
        await dbs[0].save("m1")
        await dbs[0].save("m2")
        await respond(send, 201, b"saved")

    return app


def asgi_on_commit(dbs: list[Db]) -> ASGIApp:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await read_body(receive)
        await dbs[0].add("oc")
        sessionmw.on_commit(dbs[0].scoped, count_callback("oc"))
        await respond(send, 201, b"noted")

    return app


def asgi_retried(dbs: list[Db]) -> ASGIApp:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        run = current_run.get()
        await read_body(receive)
        attempt, run.attempts = run.attempts, run.attempts + 1
        await dbs[0].add("rt")
        if attempt == 0:
            raise transient_error()
        await respond(send, 201, b"replayed")

    return app


# -- WSGI --------------------------------------------------------------------------


def wsgi_read(dbs: list[Db]) -> WSGIApp:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        dbs[0].names_now()
        start_response("200 OK", [])
        return [b"read"]

    return app


def wsgi_write(status: str, name: str) -> Callable[[list[Db]], WSGIApp]:
    def build(dbs: list[Db]) -> WSGIApp:
        def app(environ: dict[str, Any], start_response: Any) -> Any:
            dbs[0].add_now(name)
            start_response(status, [])
            return [b"written"]

        return app

    return build


def wsgi_stream(name: str) -> Callable[[list[Db]], WSGIApp]:
    def build(dbs: list[Db]) -> WSGIApp:
        def app(environ: dict[str, Any], start_response: Any) -> Any:
            dbs[0].add_now(name)
            start_response("200 OK", [])

            def chunks() -> Iterator[bytes]:
                for n in range(3):
                    dbs[0].names_now()
                    yield b"%d" % n

            return chunks()

        return app

    return build


def wsgi_legacy_write(dbs: list[Db]) -> WSGIApp:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        dbs[0].add_now("lw")
        write = start_response("200 OK", [])
        write(b"written")
        return []

    return app


def wsgi_child_scope(dbs: list[Db]) -> WSGIApp:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        with sessionmw.request_scope(dbs[0].scoped):
            actor.set("child")
            dbs[0].save_now("cs")
        actor.set("request")
        dbs[0].add_now("cp")
        start_response("201 Created", [])
        return [b"both"]

    return app


def wsgi_two_databases(dbs: list[Db]) -> WSGIApp:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        dbs[0].add_now("a")
        dbs[1].add_now("b")
        start_response("201 Created", [])
        return [b"both"]

    return app


def wsgi_manual(dbs: list[Db]) -> WSGIApp:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        dbs[0].save_now("m1")
        dbs[0].save_now("m2")
        start_response("201 Created", [])
        return [b"saved"]

    return app


def wsgi_on_commit(dbs: list[Db]) -> WSGIApp:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        dbs[0].add_now("oc")
        sessionmw.on_commit(dbs[0].scoped, count_callback("oc"))
        start_response("201 Created", [])
        return [b"noted"]

    return app


def wsgi_retried(dbs: list[Db]) -> WSGIApp:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        run = current_run.get()
        attempt, run.attempts = run.attempts, run.attempts + 1
        dbs[0].add_now("rt")
        if attempt == 0:
            raise transient_error()
        start_response("201 Created", [])
        return [b"replayed"]

    return app


@dataclass(frozen=True)
class Shape:
    """A request shape, its apps, and what its rows mean."""

    name: str
    status: int
    asgi: Callable[[list[Db]], ASGIApp] | None = None
    wsgi: Callable[[list[Db]], WSGIApp] | None = None
    kind: str = "http"
    auto: tuple[str, ...] = ()
    manual: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    callbacks: tuple[str, ...] = ()
    #: Rows of the database committed first, kept when a later one fails without 2PC.
    partial: tuple[str, ...] = ()
    commit: str = "on_success"
    retries: int = 0
    databases: int = 1
    #: The client reads this many body chunks, then leaves.
    abandon_after: int | None = None
    #: The Session kinds the shape runs with under ASGI.
    session_kinds: tuple[str, ...] = ("sync", "async")


SHAPES = (
    Shape("read", 200, asgi_read, wsgi_read),
    Shape("write", 201, asgi_write(201, "w"), wsgi_write("201 Created", "w"), auto=("w",)),
    Shape(
        "write_then_4xx",
        409,
        asgi_write(409, "x"),
        wsgi_write("409 Conflict", "x"),
        auto=("x",),
    ),
    Shape("stream_async", 200, asgi_stream_async, auto=("st",)),
    Shape(
        "stream_sync",
        200,
        asgi_stream_sync,
        wsgi_stream("ss"),
        auto=("ss",),
        session_kinds=("sync",),
    ),
    Shape(
        "abandoned_stream", 200, asgi_abandoned, wsgi_stream("ab"), auto=("ab",), abandon_after=1
    ),
    Shape("background_task", 202, asgi_background, auto=("bk",), after=("bg",)),
    Shape("websocket", 101, asgi_websocket, kind="websocket", auto=("wc",), manual=("wm",)),
    Shape("gather_children", 201, asgi_gather, auto=("gp",), manual=("g1", "g2")),
    Shape("legacy_write", 200, wsgi=wsgi_legacy_write, auto=("lw",)),
    Shape("child_scope", 201, wsgi=wsgi_child_scope, auto=("cp",), manual=("cs",)),
    Shape(
        "two_databases",
        201,
        asgi_two_databases,
        wsgi_two_databases,
        auto=("a", "b"),
        partial=("b",),
        databases=2,
    ),
    Shape("manual_commit", 201, asgi_manual, wsgi_manual, manual=("m1", "m2"), commit="manual"),
    # The commonest manual request: it reads, and its close rolls back after the response.
    Shape("manual_read", 200, asgi_read, wsgi_read, commit="manual"),
    Shape("on_commit", 201, asgi_on_commit, wsgi_on_commit, auto=("oc",), callbacks=("oc",)),
    Shape("retried", 201, asgi_retried, wsgi_retried, auto=("rt",), retries=1),
)

ASGI_SHAPES = tuple(s for s in SHAPES if s.asgi is not None)
WSGI_SHAPES = tuple(s for s in SHAPES if s.wsgi is not None)
